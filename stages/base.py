"""The one shape every stage has (NeMo-Curator's ``ProcessingStage``, datatrove's ``PipelineStep``).

A stage is a class with

* ``name``: what the runner, the progress lines and ``stats.json`` call it;
* ``resources``: what it needs from an executor, *declared* (:class:`Resources`): a CPU task,
  a model actor (one model copy per actor, a GPU share when the cluster has GPUs) or an I/O
  actor (waits on the network, reserves no CPU). The runner reads nothing else to place it;
* ``setup()``: the expensive part (load a model, open a client), once per worker;
* ``process(rows)``: the one batch method. It sees only the rows still alive (status ``ok``)
  as :class:`Row` objects, reads and edits their ``record`` dict and columns, and rejects a row
  with ``row.reject("reason: detail")``;
* ``__call__(batch)``: the shared row loop, the same for every stage (below).

The row loop turns a columnar batch (dict of lists, or of numpy arrays when Ray hands it over)
into rows, calls ``process`` on the live ones, and writes back only what changed, in the
container type each column came in. Rejected rows pass through untouched. When ``process``
raises, the batch is retried one row at a time from the original values, and a row that still
fails is rejected with ``<stage>_failed: <Error>: <message>``: one bad row never takes its
batch-mates (or the build) down with it. The wall time of the call is shared equally among the
batch's rows and added to their ``times`` column (when the batch has one), under the stage's name.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Literal

import numpy as np

from stages.record import BATCH_COLUMNS, ROW_OK, ROW_REJECTED, dumps, loads

_UNSET = object()


@dataclass(frozen=True)
class Resources:
    """What a stage asks of an executor.

    ``kind``: ``cpu`` = stateless-per-call CPU work, as many parallel tasks as CPUs allow;
    ``model`` = an actor pool of ``workers`` actors, one model copy each, ``gpus`` of a GPU per
    actor when the cluster has GPUs and ``memory_mb`` of host memory reserved for it; ``io`` = an
    actor pool of ``workers`` actors that wait on the network and reserve no CPU.
    ``batch_size``: rows per call (``None``: the runtime's ``cpu_batch_size``).
    """

    kind: Literal["cpu", "model", "io"] = "cpu"
    workers: int = 1
    batch_size: int | None = None
    gpus: float = 0.0
    memory_mb: int = 0


def column(values: list, like: Any = None) -> Any:
    """``values`` as a batch column: in the container of ``like`` (an object array when ``like``
    is a numpy array; Ray hands batches over so), else a list, or an object array when the values
    are arrays themselves (ragged images cannot be one numpy array)."""
    if isinstance(like, np.ndarray) or (like is None and any(isinstance(v, np.ndarray) for v in values)):
        out = np.empty(len(values), dtype=object)
        out[:] = values
        return out
    return values


def _plain(value: Any) -> Any:
    """numpy scalars (what Ray hands over) -> Python values; bytes of a text column -> str."""
    if isinstance(value, np.generic):
        return value.item()
    return value


class Row:
    """One row of a batch: its columns by name, its sample ``record`` parsed on first use, and
    ``reject()``. Edits are kept on the row until the batch is written back."""

    __slots__ = ("_batch", "index", "_record", "_set", "_dirty_record")

    def __init__(self, batch: dict, index: int):
        self._batch = batch
        self.index = index
        self._record = None
        self._set: dict[str, Any] = {}
        self._dirty_record = False

    def __getitem__(self, name: str) -> Any:
        if name in self._set:
            return self._set[name]
        return _plain(self._batch[name][self.index])

    def get(self, name: str, default: Any = None) -> Any:
        if name in self._set or name in self._batch:
            return self[name]
        return default

    def __setitem__(self, name: str, value: Any) -> None:
        self._set[name] = value
        if name == "record":
            self._record, self._dirty_record = None, False

    @property
    def ok(self) -> bool:
        status = self.get("status", ROW_OK)
        return (status.decode() if isinstance(status, bytes) else str(status)) == ROW_OK

    @property
    def record(self) -> dict:
        """The sample record (a dict); edits to it are written back as JSON."""
        if self._record is None:
            self._record = loads(self["record"])
            self._dirty_record = True
        return self._record

    def reject(self, reason: str) -> None:
        """Reject the sample with ``reason`` (``short_snake_case: detail``); its record is left
        as it came into this stage."""
        self._set["status"] = ROW_REJECTED
        self._set["reason"] = reason
        self._record, self._dirty_record = None, False

    def changes(self) -> dict[str, Any]:
        out = dict(self._set)
        if self._dirty_record and self._record is not None:
            out["record"] = dumps(self._record)
        return out


class Stage:
    """Base class of every stage (see the module docstring)."""

    name: ClassVar[str] = ""
    # columns that no later stage needs: dropped from the batch after this stage (frees memory)
    drops: ClassVar[tuple[str, ...]] = ()
    # columns this stage adds to every batch, with the value they take in the rows it did not
    # touch (rejected ones): Ray Data needs the same columns, of one type, in every block
    fills: ClassVar[dict[str, Any]] = {}

    resources: Resources = Resources()

    def setup(self) -> None:
        """Load what the stage needs, once per worker. Must be idempotent."""

    def process(self, rows: list[Row]) -> None:
        raise NotImplementedError

    # -- the shared row loop ---------------------------------------------------------------
    def __call__(self, batch: dict) -> dict:
        if not getattr(self, "_ready", False):
            self.setup()
            self._ready = True
        started = time.perf_counter()
        n = len(next(iter(batch.values()))) if batch else 0
        rows = [Row(batch, i) for i in range(n)]
        live = [row for row in rows if row.ok]
        if live:
            try:
                self.process(live)
            except Exception:
                rows = [Row(batch, i) for i in range(n)]
                for row in rows:
                    if row.ok:
                        self._process_alone(row)
        out = self._write_back(batch, rows)
        for name in self.drops:
            out.pop(name, None)
        _add_time(out, self.name, time.perf_counter() - started, n)
        return out

    def _process_alone(self, row: Row) -> None:
        try:
            self.process([row])
        except Exception as exc:  # the row's own failure: a recorded rejection, not a lost batch
            row._set.clear()
            row.reject(f"{self.name}_failed: {type(exc).__name__}: {_short(exc)}")

    def _write_back(self, batch: dict, rows: list[Row]) -> dict:
        changes = [row.changes() for row in rows]
        # New columns in one fixed order, whatever row set them first: Ray concatenates blocks
        # by column position, so two blocks with the same columns in another order would mix them.
        # a column with a fill value exists in every batch out of this stage, even one whose rows
        # were all rejected before it (Ray Data needs every block to have the same columns)
        names = sorted({k for change in changes for k in change} | set(self.fills),
                       key=lambda k: (BATCH_COLUMNS.index(k) if k in BATCH_COLUMNS else len(BATCH_COLUMNS), k))
        out = dict(batch)
        for name in names:
            old = batch.get(name)
            fill = self.fills.get(name)
            values = [change[name] if name in change else (_plain(old[i]) if old is not None else fill)
                      for i, change in enumerate(changes)]
            out[name] = column(values, old)
        return out


def _short(exc: Exception, limit: int = 200) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _add_time(batch: dict, name: str, seconds: float, n: int) -> None:
    """Add ``seconds / n`` to each row's ``times[name]`` (JSON text), when the batch has that column."""
    times = batch.get("times")
    if not n or times is None:
        return
    share = seconds / n
    new = []
    for i in range(n):
        t = json.loads(times[i] or "{}")
        t[name] = t.get(name, 0.0) + share
        new.append(json.dumps(t))
    batch["times"] = column(new, times)


def run_stages(stages: Iterable[Stage], batch: dict) -> dict:
    """A batch through stages in order, in this process (the local executor, tests)."""
    for stage in stages:
        batch = stage(batch)
    return batch


__all__ = ["Resources", "Row", "Stage", "column", "run_stages"]
