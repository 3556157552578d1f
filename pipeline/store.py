"""Object storage for a build's output: ``output.path`` as an fsspec URL (``s3://``, ``gs://``, ...).

* :func:`is_url`: whether an output path names object storage (``file://`` does not: it is made a
  plain local path by the manifest, and a local folder keeps its own rules, ``pipeline/outdir.py``).
* :class:`Store`: the few operations a build needs (exists, read, put, list with sizes, remove),
  relative to the URL. Each ``put`` is one whole-object upload: on S3 and GCS an object appears
  only when complete (a multipart upload too), so a reader never sees half a file.
* :func:`remote_lock`: object stores have no ``flock``. ``OUT/.lock`` is an object naming its owner
  (host, pid, token) with a heartbeat renewed every :data:`HEARTBEAT_S`; a lock whose owner is a
  dead process on this host, or whose heartbeat is older than :data:`STALE_S`, is taken over. It
  is advisory: two builds started within the same second could both take it (S3 has no
  create-if-absent for every store); the token read back after writing catches most such races.

Credentials come from the environment (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``,
``AWS_ENDPOINT_URL``, ``GOOGLE_APPLICATION_CREDENTIALS``...) or ``output.storage_options``; they
are never written to the output and :func:`redact` removes them from error messages.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from pathlib import Path

from pipeline.manifest import ManifestError

HEARTBEAT_S = 15.0
STALE_S = 60.0
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")
_SECRET_WORDS = ("secret", "token", "password", "key", "credential")


def is_url(path) -> bool:
    """True for an object-storage URL (``scheme://...`` other than ``file://``)."""
    text = str(path)
    return "://" in text and not text.startswith("file://")


def _secrets(storage_options: dict | None) -> list[str]:
    found = [os.environ[name] for name in _SECRET_ENV if os.environ.get(name)]

    def walk(node, key=""):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, str(k))
        elif isinstance(node, str) and any(word in key.lower() for word in _SECRET_WORDS) and len(node) >= 4:
            found.append(node)

    walk(storage_options or {})
    return found


def redact(text: str, storage_options: dict | None = None) -> str:
    """``text`` with every credential (AWS_* secrets of the environment, secret-looking
    ``storage_options`` values) replaced by ``***``."""
    for secret in _secrets(storage_options):
        text = text.replace(secret, "***")
    return text


class Store:
    """A build's output in object storage: paths are relative to ``url`` (``shards/x.tar``)."""

    def __init__(self, url: str, storage_options: dict | None = None):
        import fsspec

        self.url = url.rstrip("/")
        self._options = dict(storage_options or {})
        try:
            self.fs, root = fsspec.core.url_to_fs(self.url, **self._options)
        except (ImportError, ValueError) as exc:
            raise ManifestError(f"output.path {self.url}: {redact(str(exc), self._options)} "
                                f"(s3:// needs `pip install look-and-learn[s3]`)") from None
        self.root = root.rstrip("/")

    def __repr__(self) -> str:  # never the storage options
        return f"Store({self.url!r})"

    def _path(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def refresh(self) -> None:
        """Forget cached listings (another process may have written since)."""
        self.fs.invalidate_cache()

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self._path(rel))

    def read_bytes(self, rel: str) -> bytes | None:
        """The object's bytes, or None when it does not exist."""
        try:
            return self.fs.cat_file(self._path(rel))
        except FileNotFoundError:
            return None

    def read_json(self, rel: str):
        data = self.read_bytes(rel)
        try:
            return None if data is None else json.loads(data)
        except ValueError:
            return None

    def put_bytes(self, rel: str, data: bytes) -> None:
        """One whole-object write (atomic per object on S3 and GCS)."""
        self.fs.pipe_file(self._path(rel), data)

    def put_file(self, local: str | os.PathLike, rel: str) -> None:
        """Upload a local file as one object (S3: a single PUT, or a multipart upload that
        appears only when completed)."""
        self.fs.put_file(str(local), self._path(rel))

    def get_file(self, rel: str, local: str | os.PathLike) -> None:
        self.fs.get_file(self._path(rel), str(local))

    def sizes(self, folder: str) -> dict[str, int]:
        """``{file name: size}`` of the objects directly in ``folder`` (empty when there is none)."""
        try:
            entries = self.fs.ls(self._path(folder), detail=True, refresh=True)
        except FileNotFoundError:
            return {}
        return {e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0)
                for e in entries if e.get("type") != "directory"}

    def top_level(self) -> set[str]:
        """Names directly under the URL (files and folders)."""
        try:
            return {e.rstrip("/").rsplit("/", 1)[-1] for e in self.fs.ls(self.root, detail=False, refresh=True)}
        except FileNotFoundError:
            return set()

    def remove(self, rel: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._path(rel))

    def remove_tree(self, folder: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self._path(folder), recursive=True)

    def download(self, local: str | os.PathLike) -> Path:
        """Copy the whole build into the local folder ``local`` (inspect, publish of a URL)."""
        local = Path(local)
        local.mkdir(parents=True, exist_ok=True)
        base = len(self.root) + 1
        for path in self.fs.find(self.root):
            target = local / path[base:]
            target.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(path, str(target))
        return local


def open_store(url: str, storage_options: dict | None = None) -> Store:
    return Store(url, storage_options)


@contextlib.contextmanager
def local_copy(spec: str):
    """``spec`` itself when it is a local folder; for a URL, a temporary local copy of the build
    (removed afterwards): ``inspect`` and ``publish`` read a build in object storage this way."""
    if not is_url(spec):
        yield spec[len("file://"):] if spec.startswith("file://") else spec
        return
    tmp = tempfile.mkdtemp(prefix="lookandlearn-read-")
    try:
        store = open_store(spec)
        if not store.exists("shards"):
            from stages.record.shards import NotAnOutputError

            raise NotAnOutputError(f"{spec} is not a Look&Learn output (no shards/ in it)")
        yield str(store.download(Path(tmp) / Path(store.root).name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --- the lock ------------------------------------------------------------------------------

LOCK = ".lock"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_stale(held: dict, now: float) -> bool:
    if not isinstance(held, dict):
        return True
    if held.get("host") == socket.gethostname() and isinstance(held.get("pid"), int) and not pid_alive(held["pid"]):
        return True  # its owner died here (kill -9): the kernel would have dropped a flock too
    return now - float(held.get("heartbeat") or 0) > STALE_S


@contextlib.contextmanager
def remote_lock(store: Store):
    """Hold ``OUT/.lock`` in the store for the block (see the module doc: advisory, heartbeat)."""
    now = time.time()
    held = store.read_json(LOCK)
    if held is not None and not _is_stale(held, now):
        raise ManifestError(
            f"another build is running into {store.url} (its {LOCK} names {held.get('host')} pid {held.get('pid')}, "
            f"heartbeat {now - float(held.get('heartbeat') or 0):.0f} s ago); wait for it (a lock left by a "
            f"killed build on another host expires after {STALE_S:.0f} s) or choose another output")
    me = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex, "started": now, "heartbeat": now}
    store.put_bytes(LOCK, json.dumps(me).encode())
    if (store.read_json(LOCK) or {}).get("token") != me["token"]:
        raise ManifestError(f"another build took {store.url}/{LOCK} at the same moment; choose another output")
    stop = threading.Event()

    def beat():
        while not stop.wait(HEARTBEAT_S):
            with contextlib.suppress(Exception):
                store.put_bytes(LOCK, json.dumps({**me, "heartbeat": time.time()}).encode())

    thread = threading.Thread(target=beat, name="lookandlearn-lock-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
        with contextlib.suppress(Exception):
            if (store.read_json(LOCK) or {}).get("token") == me["token"]:
                store.remove(LOCK)
