"""Pipeline stages: each a ``stages.base.Stage`` (name, declared resources, ``setup()``, one batch
method) with its pydantic config beside it, plus the judges and the record module.

Every stage runs without Ray; ``pipeline/runner.py`` runs the same list locally or as a Ray Data
plan. Nothing here imports ``pipeline/`` (docs/architecture.md).
"""
