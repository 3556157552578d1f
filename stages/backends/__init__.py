"""Adapters that run the ORIGINAL research packages behind the stages' model interface.

``segment.backend: segment-anything`` (:mod:`stages.backends.segment_anything`) and
``detect.backend: groundingdino`` (:mod:`stages.backends.groundingdino`) load the original
checkpoints (``sam_vit_h_4b8939.pth``, ``groundingdino_swint_ogc.pth``) with the original
packages and expose the calls the stages make on the transformers models, so ``stages/segment.py``
and ``stages/ground.py`` run the same batching, thresholds and post-processing for both backends.
The packages are optional extras (``pip install 'look-and-learn[sam]'`` / ``[groundingdino]``)
and imported only when a backend is chosen. :mod:`stages.backends.checkpoints` reads checkpoint
files safely (``torch.load(weights_only=True)``) and turns every way a file can be wrong into a
:class:`~stages.models.ModelUnavailableError` naming the manifest field (CLI exit 2).
"""
