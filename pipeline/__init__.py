"""Look&Learn orchestration: CLI, manifests, sources, the Ray runner, resume, publish, inspect."""


def __getattr__(name: str):
    # ``pipeline.__version__`` is the record module's PIPELINE_VERSION (pyproject.toml is its one
    # source), looked up on first use so that ``import pipeline`` stays light
    if name == "__version__":
        from stages.record.schema import PIPELINE_VERSION

        return PIPELINE_VERSION
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
