"""Earlier answers of the LLM judge, keyed by (model, prompt hash, input hash).

They are read back from a build's adjudication logs (``OUT/logs``) and from the answer journal
``OUT/cache/judge-answers-*.jsonl``, which is appended as answers arrive, so even a killed
build's unfinished shard is not asked again.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import uuid
from pathlib import Path

log = logging.getLogger("lookandlearn.judge")

JOURNAL_DIR = "cache"
JOURNAL_GLOB = "judge-answers-*.jsonl"


def cache_key(model: str, prompt_hash: str, input_hash: str) -> str:
    return f"{model}\x1f{prompt_hash}\x1f{input_hash}"


def load_answers(out_dirs) -> dict[str, str]:
    """Valid earlier answers ``{cache_key: raw reply}`` from output folders: their adjudication
    logs (``logs/adjudication-*.parquet``) and answer journals (``cache/judge-answers-*.jsonl``)."""
    answers: dict[str, str] = {}
    for out in out_dirs:
        out = Path(out)
        for path in sorted((out / "logs").glob("adjudication-*.parquet")):
            try:
                import pyarrow.parquet as pq

                names = set(pq.read_schema(path).names)
                cols = ["model", "prompt_hash", "input_hash", "raw", "decided_by", "error"]
                if not set(cols) <= names:
                    continue  # written before the LLM judge existed
                for row in pq.read_table(path, columns=cols).to_pylist():
                    if row["decided_by"] == "llm" and not row["error"] and row["input_hash"]:
                        answers[cache_key(row["model"], row["prompt_hash"], row["input_hash"])] = row["raw"]
            except Exception as exc:  # noqa: BLE001 - a damaged log only costs cache hits
                log.warning("judge cache: cannot read %s: %s", path, exc)
        for path in sorted((out / JOURNAL_DIR).glob(JOURNAL_GLOB)):
            with open(path, encoding="utf-8") as fh:
                for line in fh:
                    try:
                        row = json.loads(line)
                        answers[cache_key(row["model"], row["prompt_hash"], row["input_hash"])] = row["raw"]
                    except (ValueError, KeyError, TypeError):
                        continue  # a line cut short by a kill
    return answers


class AnswerJournal:
    """Appends each new answer to ``DIR/judge-answers-HOST-PID-RANDOM.jsonl`` (opened on the first
    answer, one file per judge worker, flushed per line); ``directory=None`` writes nothing."""

    def __init__(self, directory: str | os.PathLike | None):
        self.directory = Path(directory) if directory else None
        self._file = None

    def write(self, model: str, prompt_hash: str, input_hash: str, raw: str) -> None:
        if self.directory is None:
            return
        if self._file is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            name = f"judge-answers-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
            self._file = open(self.directory / name, "a", encoding="utf-8")
        self._file.write(json.dumps({"model": model, "prompt_hash": prompt_hash,
                                     "input_hash": input_hash, "raw": raw}, ensure_ascii=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
