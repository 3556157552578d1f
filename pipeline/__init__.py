"""Look&Learn orchestration: CLI, manifests, sources, the Ray runner, resume, publish, inspect."""
__version__ = "0.1.0"
