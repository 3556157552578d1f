"""What a build prints: one progress bar (samples, shards, rejections, samples/s), the summary table
at the end, and nothing of Ray's own unless ``-v``.

Ray's Python side is quietened with its own knobs: ``ray.init(log_to_driver=..., logging_level=...)`` in
``pipeline/runner.py`` (the one module that imports Ray), and :func:`quiet_ray`, which the runner hands
Ray to (``DataContext.enable_progress_bars``, the ``ray.data`` console handler's level).
Ray's C++ core worker in the driver has no such knob: it prints every ERROR-level line to the process's
stderr (file descriptor 2), e.g. the ``core_worker.cc`` warning about actor constructor arguments that
every Ray Data actor pool triggers (ray-project/ray#57733), and ``RAY_BACKEND_LOG_LEVEL`` prints a line
of its own. :func:`drop_native_log_lines` therefore passes fd 2 through a pipe for the duration of the
plan and leaves out the lines in Ray's native log format (``[2026-01-01 10:00:00,000 E 123 123] ...``);
everything else (the progress bar, our log lines, tracebacks) goes through unchanged.
"""
from __future__ import annotations

import logging
import os
import re
import sys
import threading
from contextlib import ExitStack, contextmanager

from rich import box
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.table import Table
from rich.text import Text

# Ray's C++ log line: [YYYY-MM-DD HH:MM:SS,mmm L pid tid] file.cc:line: message
RAY_NATIVE_LINE = re.compile(rb"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [TDIWEF] \d+ \d+\] ")


def rate_text(samples: int, seconds: float) -> str:
    """``12.3 samples/s``, or what to say instead when there is no rate (never ``None``)."""
    if samples <= 0:
        return "no samples to process"
    if seconds <= 0:
        return "-"
    rate = samples / seconds
    return f"{rate:.2f} samples/s" if rate < 100 else f"{rate:,.0f} samples/s"


class _RateColumn(ProgressColumn):
    """Samples done / time since the start: batches arrive in bursts (a Ray plan returns whole blocks),
    so rich's windowed speed would swing between 0 and hundreds."""

    def render(self, task) -> Text:
        elapsed = task.finished_time if task.finished else task.elapsed
        text = rate_text(int(task.completed), elapsed or 0.0) if task.completed else "- samples/s"
        return Text(text, style="progress.data.speed")


class BuildProgress:
    """The one progress bar of a build (rich, on stderr): samples done of all, shards written of all,
    inputs rejected, samples/s, elapsed and remaining time. A disabled bar does nothing."""

    def __init__(self, samples: int, shards: int, enabled: bool = True, console: Console | None = None):
        self.enabled = enabled and samples > 0
        self.shards_total, self.shards = shards, 0
        self.rejected = 0
        if not self.enabled:
            return
        self._progress = Progress(
            TextColumn("[bold]building"), BarColumn(), MofNCompleteColumn(), TextColumn("samples"),
            TextColumn("• shards {task.fields[shards]}"), TextColumn("• rejected {task.fields[rejected]}"),
            TextColumn("•"), _RateColumn(), TextColumn("•"), TimeElapsedColumn(), TextColumn("<"),
            TimeRemainingColumn(), console=console or _stderr_console(), transient=False)
        self._task = self._progress.add_task("build", total=samples, shards=f"0/{shards}", rejected=0)

    def __enter__(self) -> "BuildProgress":
        if self.enabled:
            self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self._progress.stop()

    def advance(self, samples: int, rejected: int = 0, shards: int = 0) -> None:
        self.rejected += rejected
        self.shards += shards
        if self.enabled:
            self._progress.update(self._task, advance=samples, rejected=self.rejected,
                                  shards=f"{self.shards}/{self.shards_total}")


def _stderr_console() -> Console:
    """A console on stderr whose terminal-or-not and width are fixed now: while a Ray plan runs,
    fd 2 is a pipe (:func:`drop_native_log_lines`) and must not turn the bar into a log."""
    probe = Console(stderr=True)
    terminal = probe.is_terminal
    return Console(stderr=True, force_terminal=terminal, width=probe.width if terminal else max(probe.width, 120))


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def summary_table(stats: dict, top: int = 5) -> Table:
    """The table a build ends with: this run (shards written / kept / redone, samples processed, kept,
    rejected, wall time, samples/s) and the whole output folder (samples, shards, top rejection reasons)."""
    run = stats.get("last_run") or {}
    processed = int(run.get("samples_processed") or 0)
    rejected = int(run.get("samples_rejected") or 0)
    seconds = float(run.get("wall_seconds") or 0.0)
    redone = run.get("shards_redone") or {}
    table = Table(show_header=False, box=box.SIMPLE)
    table.add_column(style="bold")
    table.add_column()
    shards = f"{run.get('shards_written', 0)} written, {run.get('shards_skipped', 0)} already complete (kept)"
    if redone:
        why_text = ", ".join(f"{n} {why}" for why, n in sorted(redone.items()))
        shards += f", {sum(redone.values())} redone ({why_text}: incomplete or corrupt, written again)"
    table.add_row("shards this run", shards)
    table.add_row("samples this run", f"{processed} in, {processed - rejected} out, {rejected} rejected"
                  if processed else "none: every shard was already complete")
    table.add_row("wall time", f"{seconds:.1f} s ({rate_text(processed, seconds)})")
    table.add_row("output", f"{_n(stats.get('samples_out', 0), 'sample')} in {_n(stats.get('shards', 0), 'shard')}, "
                            f"{_n(stats.get('samples_rejected', 0), 'input')} rejected")
    reasons = sorted((stats.get("rejected_by_reason") or {}).items(), key=lambda kv: (-kv[1], kv[0]))
    if reasons:
        shown = ", ".join(f"{why} {n}" for why, n in reasons[:top])
        more = f" (+{len(reasons) - top} more: lookandlearn inspect)" if len(reasons) > top else ""
        table.add_row("top rejections", shown + more)
    return table


def print_summary(stats: dict, out: str, console: Console | None = None) -> None:
    console = console or Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 120))
    console.print(f"[bold]build summary[/bold]: {out}", highlight=False, soft_wrap=True)
    console.print(summary_table(stats))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


@contextmanager
def drop_native_log_lines(pattern: re.Pattern = RAY_NATIVE_LINE):
    """Inside the block, lines written to file descriptor 2 that match ``pattern`` (Ray's native log
    lines) are left out; the rest reaches the real stderr unchanged. Yields the list of left-out lines.
    Does nothing (yields an empty list) where fd 2 cannot be redirected."""
    dropped: list[str] = []
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield dropped
        return
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 2)
    os.close(write_fd)

    def pump() -> None:
        pending = b""
        while True:
            try:
                chunk = os.read(read_fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            *lines, pending = (pending + chunk).split(b"\n")
            out = []
            for line in lines:
                if pattern.match(line):
                    dropped.append(line.decode("utf-8", "replace"))
                else:
                    out.append(line + b"\n")
            # a partial line that cannot become a native log line goes on now (progress bars redraw
            # without a newline); one that may is held until its newline
            if pending and not pending.startswith(b"["):
                out.append(pending)
                pending = b""
            if out:
                _write_all(saved, b"".join(out))
        if pending:
            _write_all(saved, pending)

    thread = threading.Thread(target=pump, name="stderr-filter", daemon=True)
    thread.start()
    try:
        yield dropped
    finally:
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(saved, 2)  # closes the pipe's last write end: the pump reads to the end and stops
        thread.join(timeout=5)
        if not thread.is_alive():
            os.close(read_fd)
        os.close(saved)


@contextmanager
def quiet_transformers(verbose: bool):
    """transformers' "Loading weights" bars (the local executor loads the models in this process)
    only with ``-v``; restored after."""
    import transformers.utils.logging as hf_logging

    if verbose or not hf_logging.is_progress_bar_enabled():
        yield
        return
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()


def quiet_ray(ray):
    """Ray's own console output off until ``.close()``: Ray Data's progress bars / progress log lines
    (``DataContext.enable_progress_bars``) and its console log handler (below ERROR; its log files in
    the Ray session folder are untouched), and the C++ core worker's native log lines on fd 2
    (:func:`drop_native_log_lines`). Restores the previous settings on close."""
    stack = ExitStack()
    ctx = ray.data.DataContext.get_current()
    before = ctx.enable_progress_bars
    ctx.enable_progress_bars = False
    stack.callback(setattr, ctx, "enable_progress_bars", before)
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            stack.callback(handler.setLevel, handler.level)
            handler.setLevel(logging.ERROR)
    stack.enter_context(drop_native_log_lines())
    return stack
