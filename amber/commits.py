"""The commit-marker protocol (docs/design.md, "Storage and commits").

A checkpoint or a stage output is a folder of files plus a `COMMIT.json` manifest (step,
files with sizes and SHA-256 checksums, metrics). The manifest is written last, by one
writer (rank 0), after every file is in place: a folder without it is a partial write and
is never read. Resuming takes the newest committed checkpoint that is whole.

A damaged commit (a marker that does not parse, a file missing, of another size or another
checksum) is never trusted and never silently deleted: `quarantine` moves its marker to
`quarantine/` beside a note of what was wrong, which makes the folder a partial write, and
readers go on to the next older commit (checkpoints) or re-run the stage (outputs).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from amber import lease
from amber.errors import CorruptCommit
from amber.layout import QUARANTINE
from amber.storage import Store

MARKER = "COMMIT.json"
CHECKPOINTS = "checkpoints"
CHECKSUM_LOCAL_MAX = 4 << 30  # reuse on a local store re-hashes outputs up to this size


class FileEntry(BaseModel):
    size: int
    sha256: str


class Manifest(BaseModel):
    """What a commit marker records."""

    step: int = Field(..., ge=0)
    files: dict[str, FileEntry]
    metrics: dict[str, Any] = Field(default_factory=dict)
    spec_hash: str = Field("", description="The stage spec it was produced under.")
    created: float = Field(default_factory=time.time)
    fence: int | None = Field(
        None, description="The fencing token of the lease holder that wrote it (amber.lease)."
    )
    folder: str = Field("", exclude=True, description="Where it was read from (not stored).")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as src:
        for chunk in iter(lambda: src.read(8 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_folder(step: int) -> str:
    # Zero-padded so that lexical and numeric order agree in any S3 browser.
    return f"{CHECKPOINTS}/step-{step:010d}"


def upload_files(store: Store, folder: str, local_dir: Path) -> dict[str, FileEntry]:
    """Upload every file under `local_dir` to `folder`; their entries for a manifest."""
    local_dir = Path(local_dir)
    files = {}
    for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
        name = path.relative_to(local_dir).as_posix()
        if name == MARKER:
            continue
        files[name] = FileEntry(size=path.stat().st_size, sha256=sha256_file(path))
        store.upload(path, f"{folder}/{name}")
    return files


def write_marker(
    store: Store,
    folder: str,
    step: int,
    files: dict[str, FileEntry],
    metrics: dict | None = None,
    spec_hash: str = "",
    fence: lease.Fence | None = None,
) -> Manifest:
    """Commit `folder`: call only after every file in `files` is uploaded. With a `fence`
    (the run lease's holder this process works for) only while that holder still holds the
    run folder's lease, and never over a marker of a newer holder."""
    manifest = Manifest(
        step=step,
        files=files,
        metrics=metrics or {},
        spec_hash=spec_hash,
        folder=folder,
        fence=fence.token if fence else None,
    )
    data = manifest.model_dump_json(indent=2).encode()
    if fence is None:
        store.write_bytes(f"{folder}/{MARKER}", data)
    else:
        _fenced_write(store, f"{folder}/{MARKER}", data, fence)
    return manifest


def _fenced_write(store: Store, key: str, data: bytes, fence: lease.Fence) -> None:
    """Write `key` (in the run folder `store`) only while `fence`'s holder holds the lease,
    with a conditional write over what was read, never over a newer holder's marker."""
    holder, _ = lease.read(store)
    if holder is None or holder.released or holder.id != fence.id:
        raise lease.LeaseLost(
            f"{store.uri}/{lease.KEY} no longer names the run this process works for "
            f"(token {fence.token}); {key} not written"
        )
    current = store.read_versioned(key)
    if current is None:
        written = store.create(key, data)
    else:
        try:
            theirs = json.loads(current[0]).get("fence") or 0
        except (ValueError, AttributeError):
            theirs = 0  # a damaged marker: ours replaces it
        if theirs > fence.token:
            raise lease.LeaseLost(f"{store.uri}/{key} was written by a newer holder")
        written = store.replace(key, data, current[1])
    if not written:
        raise lease.LeaseLost(f"{store.uri}/{key} changed while it was written: another holder")


def commit(
    store: Store,
    folder: str,
    local_dir: Path,
    step: int,
    metrics: dict | None = None,
    spec_hash: str = "",
    fence: lease.Fence | None = None,
) -> Manifest:
    """Upload every file under `local_dir` to `folder`, then write the marker last."""
    files = upload_files(store, folder, local_dir)
    return write_marker(store, folder, step, files, metrics, spec_hash, fence)


def read_manifest(store: Store, folder: str) -> Manifest | None:
    """The committed manifest of `folder`, or None when it was never committed; a marker
    that does not parse is a `CorruptCommit`."""
    key = f"{folder}/{MARKER}"
    if not store.exists(key):
        return None
    raw = store.read_bytes(key)
    try:
        data = json.loads(raw.decode())
        return Manifest.model_validate({**data, "folder": folder})
    except (UnicodeDecodeError, ValueError, TypeError) as err:
        reason = err.errors()[0]["msg"] if isinstance(err, ValidationError) else str(err)
        raise CorruptCommit(folder, f"{MARKER} is not a commit marker ({reason})") from None


def problems(manifest: Manifest, listing: dict[str, int]) -> list[str]:
    """What is missing or of the wrong size, by file (empty: complete)."""
    found = []
    for name, entry in manifest.files.items():
        size = listing.get(f"{manifest.folder}/{name}")
        if size is None:
            found.append(f"{name} is missing")
        elif size != entry.size:
            found.append(f"{name} has {size} bytes, the marker says {entry.size}")
    return found


def is_complete(manifest: Manifest, listing: dict[str, int]) -> bool:
    """Every file the manifest names is present with its recorded size."""
    return not problems(manifest, listing)


def verify(store: Store, manifest: Manifest, checksums: bool | None = None) -> None:
    """Raise `CorruptCommit` unless every file is there with its size and, when `checksums`
    (default: on a local store, for folders up to CHECKSUM_LOCAL_MAX), its SHA-256."""
    listing = store.list(manifest.folder)
    found = problems(manifest, listing)
    if found:
        raise CorruptCommit(manifest.folder, "; ".join(found))
    if checksums is None:
        size = sum(e.size for e in manifest.files.values())
        checksums = store.local_path(manifest.folder) is not None and size <= CHECKSUM_LOCAL_MAX
    if not checksums:
        return
    for name, entry in manifest.files.items():
        path = store.local_path(f"{manifest.folder}/{name}")
        if path is None:  # remote: checked as it is downloaded (`fetch`)
            return
        if sha256_file(path) != entry.sha256:
            raise CorruptCommit(manifest.folder, f"{name}: checksum mismatch")


def quarantine(store: Store, folder: str, reason: str) -> str:
    """Make a damaged commit a partial write, keeping the evidence: its marker (when there
    is one) and a note of `reason` go to quarantine/<folder>-<time>/. Returns that folder."""
    place = f"{QUARANTINE}/{folder}-{time.strftime('%Y%m%dT%H%M%S')}-{time.time_ns() % 10**9}"
    note = {"folder": folder, "reason": reason, "time": time.time()}
    marker = f"{folder}/{MARKER}"
    if store.exists(marker):
        store.copy(marker, f"{place}/{MARKER}")
        note["files"] = store.list(folder)
    store.write_text(f"{place}/REASON.json", json.dumps(note, indent=2))
    store.delete(marker)
    return place


def read_output(
    store: Store, folder: str, log=print, checksums: bool | None = None, repair: bool = True
) -> Manifest | None:
    """A committed output folder that is whole (`verify`), else None: a damaged one is
    logged and (with `repair`) quarantined, so its stage runs again. Observers that must
    not write (the operator's status pass) read with repair=False."""
    try:
        manifest = read_manifest(store, folder)
        if manifest is not None:
            verify(store, manifest, checksums)
        return manifest
    except CorruptCommit as err:
        if not repair:
            log(f"{store.uri}/{folder} is damaged ({err.reason})")
            return None
        place = quarantine(store, folder, err.reason)
        log(f"{store.uri}/{folder} is damaged ({err.reason}): quarantined in {place}")
        return None


def checkpoints(
    store: Store, stage: str, spec_hash: str | None = None, log=print, repair: bool = True
):
    """The committed, complete checkpoints of `stage`, newest first (of `spec_hash` when
    given); damaged ones met on the way are logged and (with `repair`) quarantined."""
    listing = store.list(f"{stage}/{CHECKPOINTS}")
    folders = sorted(
        (key.removesuffix(f"/{MARKER}") for key in listing if key.endswith(f"/{MARKER}")),
        reverse=True,
    )
    for folder in folders:
        try:
            manifest = read_manifest(store, folder)
            if manifest is None or (spec_hash is not None and manifest.spec_hash != spec_hash):
                continue
            found = problems(manifest, listing)
            if found:
                raise CorruptCommit(folder, "; ".join(found))
        except CorruptCommit as err:
            if not repair:
                continue
            place = quarantine(store, folder, err.reason)
            log(
                f"checkpoint {store.uri}/{folder} is damaged ({err.reason}): quarantined in "
                f"{place}; trying an older one"
            )
            continue
        yield manifest


def latest_checkpoint(
    store: Store, stage: str, spec_hash: str | None = None, log=print, repair: bool = True
) -> Manifest | None:
    """The newest committed, complete checkpoint of `stage`; partial ones are skipped, and so
    are those of another spec when `spec_hash` is given."""
    return next(checkpoints(store, stage, spec_hash, log, repair), None)


def fetch(store: Store, manifest: Manifest, dest: Path) -> Path:
    """Download a committed folder to `dest`, verifying every checksum (`CorruptCommit`)."""
    dest = Path(dest)
    for name, entry in manifest.files.items():
        target = dest / name
        store.download(f"{manifest.folder}/{name}", target)
        if sha256_file(target) != entry.sha256:
            raise CorruptCommit(manifest.folder, f"{name}: checksum mismatch")
    return dest


def prune_checkpoints(store: Store, stage: str, keep: int) -> None:
    """Delete all but the newest `keep` committed checkpoints (partial ones are left alone)."""
    listing = store.list(f"{stage}/{CHECKPOINTS}")
    committed = sorted(k.removesuffix(f"/{MARKER}") for k in listing if k.endswith(f"/{MARKER}"))
    for folder in committed[:-keep] if keep > 0 else committed:
        # The marker goes first, so a crash mid-delete leaves a partial (ignored) folder.
        store.delete(f"{folder}/{MARKER}")
        store.delete(folder)
