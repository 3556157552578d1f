"""Pipeline stages: plain Python classes with ``setup()`` and ``__call__(batch) -> batch``.

Every stage runs without Ray; the runner in ``pipeline/`` wraps them for Ray Data.
"""
