"""Optional dependencies: what a command needs beyond a data-only install, with the fix in the error.

``pip install look-and-learn`` builds datasets (read → parse → ground → segment → adjudicate →
write); training and its read-outs need the ``train`` extra (pyproject.toml). Those modules are
imported lazily where they are used, and each command that needs them calls :func:`require`
first, so a data-only install fails in one line naming the packages and the install command.
"""
from __future__ import annotations

import importlib.util

# import name -> distribution name, for the message
_DISTRIBUTIONS = {"skimage": "scikit-image"}


class MissingExtraError(ImportError):
    """An optional dependency a command needs is not installed (the message says how to get it)."""


def require(what: str, *modules: str, extra: str = "train") -> None:
    """Raise :class:`MissingExtraError` when any of ``modules`` (import names) is not installed."""
    missing = [_DISTRIBUTIONS.get(m, m) for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtraError(
            f"{what} needs {', '.join(missing)}, not installed (a data-only install leaves "
            f"{'it' if len(missing) == 1 else 'them'} out): pip install 'look-and-learn[{extra}]'")
