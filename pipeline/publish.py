"""``lookandlearn publish OUT --repo USER/NAME | --to URL``: ship a built dataset.

What is uploaded (:data:`INCLUDE`, in this order; the card last, so a destination that has a
README.md has everything it describes):

* ``shards/*.tar``                 the data (the card's ``configs`` entry points ``load_dataset`` here)
* ``index/*.parquet``              one row per sample (cheap filtering without opening shards)
* ``logs/adjudication-*.parquet``  every judge decision (audit trail; ``--exclude 'logs/*'`` to leave out)
* ``rejected/*.parquet``           inputs that could not be used, with the reason
* ``stats/*.json``, ``stats.json`` per-shard and total counts
* ``manifest.resolved.yaml``       how it was built (models with revisions, prompt version)
* ``README.md``                    the dataset card (Hub YAML header)

Never uploaded: temporary files of interrupted writes (``.*``), the HTML gallery and anything
else in the folder. Publishing refuses an output with incomplete shards (rerun the build).

Hub: ``huggingface_hub`` (``HfApi.upload_large_folder`` where the installed version has it,
else ``HfApi.upload_folder``, which in huggingface_hub >= 1.x streams many files in several
commits); both resume when rerun. The token comes from ``HF_TOKEN`` or ``hf auth login`` and is
never printed. ``--to URL``: any fsspec destination (a local path, ``file://``, ``s3://``,
``gs://``, ... with the matching fsspec backend installed, e.g. ``s3fs``/``gcsfs``); a rerun
skips data files already there with the same size. ``--dry-run`` lists exactly what would be
uploaded (paths and sizes) and where, and touches no network.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from stages.record.shards import NotAnOutputError, shard_files

INCLUDE = ("shards/*.tar", "index/*.parquet", "logs/adjudication-*.parquet", "rejected/*.parquet",
           "stats/*.json", "stats.json", "manifest.resolved.yaml", "README.md")
REQUIRED = ("stats.json", "manifest.resolved.yaml", "README.md")
# small files that describe the whole dataset: always rewritten (a rerun may have changed them)
ALWAYS_COPY = ("stats.json", "manifest.resolved.yaml", "README.md")
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


class PublishError(ValueError):
    """The output or the arguments cannot be published (exit code 2)."""


@dataclass
class Plan:
    out: Path
    files: list[tuple[str, int]]           # (path relative to OUT, bytes), in upload order
    left_out: list[str]                    # files in OUT that are not uploaded
    excludes: list[str]

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)

    @property
    def ignore_patterns(self) -> list[str]:
        """For the Hub uploader: with :data:`INCLUDE` as allow patterns, selects exactly ``files``."""
        # The uploader's globs let ``*`` cross ``/``; no INCLUDE pattern has two ``/``, so
        # ``*/*/*`` keeps out nested folders (e.g. an earlier ``publish --to OUT/shards/copy``).
        return [".*", "*/.*", "*/*/*", *self.excludes]


def _glob(rel: str, pattern: str) -> bool:
    """``fnmatch`` one path segment at a time: ``*`` never matches ``/`` (``shards/*.tar`` is not
    ``shards/copy/x.tar``)."""
    parts, globs = rel.split("/"), pattern.split("/")
    return len(parts) == len(globs) and all(fnmatch.fnmatchcase(a, g) for a, g in zip(parts, globs))


def _matches(rel: str, patterns) -> bool:
    """``--exclude`` patterns: as the Hub uploader applies them (``*`` crosses ``/``, so
    ``*.parquet`` leaves out every parquet file)."""
    return any(fnmatch.fnmatchcase(rel, p) for p in patterns)


def plan(out: str | Path, exclude: list[str] | None = None) -> Plan:
    """What would be uploaded from ``out``; raises :class:`PublishError` when it is not ready."""
    out = Path(out)
    try:
        complete, incomplete = shard_files(out, hashes=True)  # sizes and sha256 against each completion record
    except NotAnOutputError as exc:
        raise PublishError(str(exc)) from None
    if incomplete:
        raise PublishError(f"{out} has {len(incomplete)} incomplete shard(s) ({', '.join(map(str, incomplete[:10]))}): "
                           "rerun the build to finish them before publishing")
    if not complete:
        raise PublishError(f"{out} has no complete shard: nothing to publish")
    missing = [name for name in REQUIRED if not (out / name).is_file()]
    if missing:
        raise PublishError(f"{out} lacks {', '.join(missing)}: rerun the build to write them")
    excludes = list(exclude or [])
    files: list[tuple[str, int]] = []
    everything = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    for pattern in INCLUDE:
        for rel in everything:
            name = rel.rsplit("/", 1)[-1]
            if _glob(rel, pattern) and not name.startswith(".") and not _matches(rel, excludes):
                files.append((rel, (out / rel).stat().st_size))
    for rel in ["README.md", *(f"shards/{f['tar'].name}" for f in complete.values())]:
        if _matches(rel, excludes):
            raise PublishError(f"--exclude would leave out {rel}: the card and every shard are always published")
    chosen = {rel for rel, _ in files}
    left_out = [rel for rel in everything if rel not in chosen]
    # upload order: data first, the card last
    files.sort(key=lambda f: (f[0] in ALWAYS_COPY, f[0] == "README.md", INCLUDE.index(_pattern_of(f[0])), f[0]))
    return Plan(out=out, files=files, left_out=left_out, excludes=excludes)


def _pattern_of(rel: str) -> str:
    return next(p for p in INCLUDE if _glob(rel, p))


def human(n: int) -> str:
    size = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"


def safe_url(url: str) -> str:
    """The destination without any credentials embedded in it (user:password@host)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<destination>"
    if parts.username or parts.password:
        host = parts.hostname or ""
        if parts.port:
            host += f":{parts.port}"
        parts = parts._replace(netloc=host)
    if parts.query:
        parts = parts._replace(query="…")
    return urlunsplit(parts)


def describe(p: Plan, destination: str, note: str = "") -> str:
    lines = [f"would upload {len(p.files)} files ({human(p.total_bytes)}, {p.total_bytes} bytes) "
             f"from {p.out} to {destination}{note}:"]
    width = max(len(rel) for rel, _ in p.files)
    for rel, size in p.files:
        lines.append(f"  {rel:<{width}}  {size:>12} B  {human(size):>9}")
    if p.left_out:
        shown = ", ".join(p.left_out[:20]) + (f", … ({len(p.left_out) - 20} more)" if len(p.left_out) > 20 else "")
        lines.append(f"not uploaded: {shown}")
    return "\n".join(lines)


# --- Hugging Face Hub -------------------------------------------------------------------------

def check_repo_id(repo: str) -> None:
    if not _REPO_ID.match(repo or "") or ".." in repo or repo.endswith((".", "-")):
        raise PublishError(f"--repo must be USER/NAME (a Hub dataset id), got {repo!r}")


def publish_hub(p: Plan, repo: str, private: bool = False, revision: str | None = None,
                message: str | None = None, log=print) -> str:
    """Upload to the Hub dataset repo ``repo`` (created if absent). Rerun to resume."""
    from huggingface_hub import HfApi

    api = HfApi()
    # glob patterns, not the file list: the uploader matches every file against every pattern
    allow, ignore = list(INCLUDE), p.ignore_patterns
    api.create_repo(repo, repo_type="dataset", private=private, exist_ok=True)
    if hasattr(api, "upload_large_folder") and revision is None:
        # huggingface_hub < 1.x: the resumable, many-file, multi-commit uploader
        api.upload_large_folder(repo_id=repo, folder_path=str(p.out), repo_type="dataset",
                                allow_patterns=allow, ignore_patterns=ignore, private=private)
    else:
        # huggingface_hub >= 1.x: upload_folder itself streams, splits into commits and resumes
        api.upload_folder(repo_id=repo, folder_path=str(p.out), repo_type="dataset", revision=revision,
                          allow_patterns=allow, ignore_patterns=ignore, commit_message=message or f"Upload {p.out.name} with Look&Learn")
    url = f"https://huggingface.co/datasets/{repo}"
    log(f"uploaded {len(p.files)} files ({human(p.total_bytes)}) to {url}")
    return url


# --- fsspec destinations ----------------------------------------------------------------------

def open_destination(url: str):
    """``(filesystem, root path)`` for an fsspec URL; a missing backend is a clear error."""
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as exc:
        raise PublishError(f"cannot open destination {safe_url(url)}: {exc}") from None
    return fs, root.rstrip("/") or "/"


def publish_fsspec(p: Plan, url: str, log=print) -> dict:
    """Copy the planned files to ``url``; data files already there with the same size are
    skipped (an interrupted copy leaves a shorter file, so a rerun redoes it)."""
    fs, root = open_destination(url)
    copied = skipped = 0
    made: set[str] = set()
    for rel, size in p.files:
        target = f"{root}/{rel}"
        if rel not in ALWAYS_COPY:
            try:
                if fs.exists(target) and fs.size(target) == size:
                    skipped += 1
                    continue
            except FileNotFoundError:
                pass
        parent = target.rsplit("/", 1)[0]
        if parent not in made:
            fs.makedirs(parent, exist_ok=True)
            made.add(parent)
        fs.put_file(str(p.out / rel), target)
        copied += 1
    dest = safe_url(url)
    log(f"copied {copied} files to {dest} ({skipped} already there)")
    return {"copied": copied, "skipped": skipped, "destination": dest}


def run(out: str, repo: str | None = None, to: str | None = None, private: bool = False, dry_run: bool = False,
        exclude: list[str] | None = None, revision: str | None = None, message: str | None = None,
        log=print) -> int:
    """The ``publish`` command; returns the exit code (2 for :class:`PublishError`)."""
    if bool(repo) == bool(to):
        raise PublishError("give exactly one of --repo USER/NAME or --to URL")
    if repo:
        check_repo_id(repo)
    p = plan(out, exclude)
    if repo:
        destination = f"https://huggingface.co/datasets/{repo}"
        note = f" ({'private' if private else 'public'} dataset repo, created if absent" + \
               (f", branch {revision}" if revision else "") + ")"
    else:
        destination, note = safe_url(to), ""
    if dry_run:
        log(describe(p, destination, note))
        log("dry run: nothing was uploaded")
        return 0
    if to:
        open_destination(to)  # fail early on a missing backend (s3fs, gcsfs, ...)
    log(f"uploading {len(p.files)} files ({human(p.total_bytes)}) to {destination}{note}")
    if repo:
        publish_hub(p, repo, private=private, revision=revision, message=message, log=log)
    else:
        publish_fsspec(p, to, log=log)
    return 0
