"""Look&Learn from Python.

    from lookandlearn import build, Labeler, label, decode_mask

    build("manifests/sample.yaml", out="out/sample")            # = lookandlearn build
    labeler = Labeler({"name": "demo", "detect": {...}, ...})   # models loaded once
    record = labeler.label("photo.jpg", "a dog on a red sofa")   # the record a shard holds

See README.md, "Python API", and :mod:`lookandlearn.api`.
"""
from lookandlearn.api import BuildResult, Labeler, Rejected, build, decode_mask, label, load
from pipeline.manifest import Manifest, ManifestError
from stages.record.schema import PIPELINE_VERSION as __version__  # pyproject.toml's version

__all__ = ["BuildResult", "Labeler", "Manifest", "ManifestError", "Rejected", "__version__", "build",
           "decode_mask", "label", "load"]
