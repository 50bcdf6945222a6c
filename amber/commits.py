"""The commit-marker protocol (brief section 5).

A checkpoint or a stage output is a folder of files plus a `COMMIT.json` manifest (step,
files with sizes and SHA-256 checksums, metrics). The manifest is written last, by one
writer (rank 0), after every file is in place: a folder without it is a partial write and
is never read. Resuming takes the newest committed checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from amber.storage import StorageError, Store

MARKER = "COMMIT.json"
CHECKPOINTS = "checkpoints"


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
) -> Manifest:
    """Commit `folder`: call only after every file in `files` is uploaded."""
    manifest = Manifest(
        step=step, files=files, metrics=metrics or {}, spec_hash=spec_hash, folder=folder
    )
    store.write_text(f"{folder}/{MARKER}", manifest.model_dump_json(indent=2))
    return manifest


def commit(
    store: Store,
    folder: str,
    local_dir: Path,
    step: int,
    metrics: dict | None = None,
    spec_hash: str = "",
) -> Manifest:
    """Upload every file under `local_dir` to `folder`, then write the marker last."""
    files = upload_files(store, folder, local_dir)
    return write_marker(store, folder, step, files, metrics, spec_hash)


def read_manifest(store: Store, folder: str) -> Manifest | None:
    """The committed manifest of `folder`, or None when it was never committed."""
    try:
        data = json.loads(store.read_text(f"{folder}/{MARKER}"))
    except StorageError:
        return None
    return Manifest.model_validate({**data, "folder": folder})


def is_complete(manifest: Manifest, listing: dict[str, int]) -> bool:
    """Every file the manifest names is present with its recorded size."""
    return all(
        listing.get(f"{manifest.folder}/{name}") == entry.size
        for name, entry in manifest.files.items()
    )


def latest_checkpoint(store: Store, stage: str, spec_hash: str | None = None) -> Manifest | None:
    """The newest committed, complete checkpoint of `stage`; partial ones are skipped, and so
    are those of another spec when `spec_hash` is given."""
    listing = store.list(f"{stage}/{CHECKPOINTS}")
    folders = sorted(
        (key.removesuffix(f"/{MARKER}") for key in listing if key.endswith(f"/{MARKER}")),
        reverse=True,
    )
    for folder in folders:
        manifest = read_manifest(store, folder)
        if manifest is None or (spec_hash is not None and manifest.spec_hash != spec_hash):
            continue
        if is_complete(manifest, listing):
            return manifest
    return None


def fetch(store: Store, manifest: Manifest, dest: Path) -> Path:
    """Download a committed folder to `dest`, verifying every checksum."""
    dest = Path(dest)
    for name, entry in manifest.files.items():
        target = dest / name
        store.download(f"{manifest.folder}/{name}", target)
        if sha256_file(target) != entry.sha256:
            raise StorageError(f"{manifest.folder}/{name}: checksum mismatch")
    return dest


def prune_checkpoints(store: Store, stage: str, keep: int) -> None:
    """Delete all but the newest `keep` committed checkpoints (partial ones are left alone)."""
    listing = store.list(f"{stage}/{CHECKPOINTS}")
    committed = sorted(k.removesuffix(f"/{MARKER}") for k in listing if k.endswith(f"/{MARKER}"))
    for folder in committed[:-keep] if keep > 0 else committed:
        # The marker goes first, so a crash mid-delete leaves a partial (ignored) folder.
        store.delete(f"{folder}/{MARKER}")
        store.delete(folder)
