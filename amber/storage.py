"""One interface over S3 and local folders.

A `Store` is rooted at a URI (`s3://bucket/prefix`, `file:///path` or a plain path) and
addresses objects by '/'-separated keys below it. Local writes are atomic (temporary file,
fsync, rename); S3 writes are atomic by nature. S3 goes through boto3 with its standard retry
mode (exponential backoff with jitter), so transient errors and throttling are retried
without code of ours; a body cut off mid-read is read again here, since boto3 retries only
the request. Every failure is a `StorageError` naming the URI. Credentials come from the
environment (`AWS_ACCESS_KEY_ID`, ...), boto3's usual chain, or files in
`$AMBER_S3_SECRET_DIR` (a mounted Secret).

Local files are created readable by the group and others as the umask allows (0644 under
the usual 022), so a store or a final model can be shared by a team.

`create` and `replace` are the two conditional writes a lease needs: create only where
nothing is, replace only what was read (`read_versioned`). S3 does them with If-None-Match
and If-Match; a local store with an exclusive lock on a file beside the object.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import shutil
import tempfile
import time
from abc import ABC, abstractmethod
from pathlib import Path
from urllib.parse import unquote, urlparse

from amber.errors import StorageError

__all__ = ["LocalStore", "S3Store", "StorageError", "Store", "open_store", "s3_client"]

SECRET_DIR_ENV = "AMBER_S3_SECRET_DIR"
BODY_READS = 5  # attempts at reading one object's body before giving up


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _umask()


class Store(ABC):
    uri: str

    @abstractmethod
    def write_bytes(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def read_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def upload(self, path: Path, key: str) -> None: ...

    @abstractmethod
    def download(self, key: str, path: Path) -> None: ...

    @abstractmethod
    def list(self, prefix: str = "") -> dict[str, int]:
        """Keys below `prefix` (relative to the store) with their sizes in bytes."""

    def download_prefix(self, prefix: str, dest: Path) -> list[Path]:
        """Every object below `prefix` to `dest`, each under its own key; the local paths
        (none when nothing is there)."""
        paths = [dest / key for key in self.list(prefix)]
        for path in paths:
            self.download(str(path.relative_to(dest)), path)
        return paths

    @abstractmethod
    def delete(self, prefix: str) -> None:
        """Remove every object below `prefix`."""

    @abstractmethod
    def copy(self, source: str, key: str) -> None:
        """Copy an object within this store (server-side on S3)."""

    @abstractmethod
    def child(self, prefix: str) -> Store:
        """A store rooted at `prefix` below this one."""

    @abstractmethod
    def read_versioned(self, key: str) -> tuple[bytes, str] | None:
        """The object and a version tag for `replace`; None when it is not there."""

    @abstractmethod
    def create(self, key: str, data: bytes) -> bool:
        """Write `key` only if nothing is there; whether it was written."""

    @abstractmethod
    def replace(self, key: str, data: bytes, version: str) -> bool:
        """Overwrite `key` only if it is still at `version`; whether it was written."""

    @abstractmethod
    def sha256(self, key: str) -> str:
        """The object's SHA-256, read in chunks (a 16 GB text encoder never whole in memory)."""

    def copy_from(self, other: Store, source: str, key: str) -> None:
        """Copy `other`'s object `source` to `key` here: by path from a local store, else
        through a temporary file (S3 to S3 is server-side: `S3Store.copy_from`)."""
        path = other.local_path(source)
        if path is not None:
            if not path.is_file():
                raise StorageError(f"{other.uri}/{source} does not exist")
            self.upload(path, key)
            return
        with tempfile.TemporaryDirectory(prefix="amber-copy-") as tmp:
            other.download(source, Path(tmp) / "object")
            self.upload(Path(tmp) / "object", key)

    def exists(self, key: str) -> bool:
        return key in self.list(key)

    def local_path(self, key: str) -> Path | None:
        """Where the object already is on this machine's file system (None: remote)."""
        return None

    def write_text(self, key: str, text: str) -> None:
        self.write_bytes(key, text.encode())

    def read_text(self, key: str) -> str:
        return self.read_bytes(key).decode()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


@contextlib.contextmanager
def local_errors(what: str):
    """The machine's refusals (a read-only or full disk, permissions, a symlink loop, a name
    too long) as one StorageError line naming the path and the cause."""
    try:
        yield
    except StorageError:
        raise
    except OSError as err:
        raise StorageError(f"{what}: {describe(err, what)}") from None


def resolved(path: Path, what: str) -> Path:
    """`path` with its symlinks followed; a loop is a StorageError (Python 3.11 raises
    RuntimeError for one, later versions OSError)."""
    try:
        return path.resolve()
    except (OSError, RuntimeError) as err:
        cause = describe(err) if isinstance(err, OSError) else "symlink loop"
        raise StorageError(f"{what}: {cause}") from None


def describe(err: OSError, said: str = "") -> str:
    """An OSError's cause in words, with the path it names unless `said` names it."""
    cause = err.strerror or errno.errorcode.get(err.errno or 0) or str(err)
    if err.filename is None or str(err.filename) in said:
        return cause
    return f"{err.filename}: {cause}"


def _sidecar(name: str) -> bool:
    return name.endswith(".tmp") or (name.startswith(".") and name.endswith(".lock"))


class LocalStore(Store):
    """A folder. Paths stay as the user wrote them (a store below `/data -> /mnt/disk1`
    names `/data/...` everywhere); they are resolved only to refuse keys that escape it."""

    def __init__(self, root: str | Path):
        self.root = Path(os.path.normpath(Path(root).expanduser().absolute()))
        self.uri = str(self.root)
        with local_errors(f"store {self.root}"):
            self._check_parents()

    def _check_parents(self) -> None:
        """A store's nearest existing folder must be one: a dangling symlink or a file on
        the way is said now, not when the first write fails minutes in."""
        for parent in (self.root, *self.root.parents):
            if parent.is_symlink():
                target = resolved(parent, f"store {self.root}: {parent}")
                if not parent.exists():
                    raise StorageError(
                        f"store {self.root}: {parent} is a symlink to {target}, which does "
                        "not exist"
                    )
            if parent.exists():
                if not parent.is_dir():
                    raise StorageError(f"store {self.root}: {parent} is a file, not a folder")
                break

    def _path(self, key: str) -> Path:
        path = self.root / key
        real = resolved(path, f"{self.uri}/{key}")
        root = resolved(self.root, f"store {self.root}")
        if not real.is_relative_to(root):
            raise StorageError(f"key {key!r} escapes {self.root}")
        return Path(os.path.normpath(path))

    def _atomic(self, key: str, fill) -> None:
        target = self._path(key)
        with local_errors(f"writing {target}"):
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
            try:
                os.fchmod(fd, 0o666 & ~UMASK)  # mkstemp makes 0600: shared stores need more
                with os.fdopen(fd, "wb") as out:
                    fill(out)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise

    @contextlib.contextmanager
    def _locked(self, key: str):
        """An exclusive lock on `key`'s sidecar `.lock` file (the read-compare-write of the
        conditional writes; holders on one file system)."""
        target = self._path(key)
        with local_errors(f"locking {target}"):
            target.parent.mkdir(parents=True, exist_ok=True)
            lock = os.open(target.parent / f".{target.name}.lock", os.O_CREAT | os.O_WRONLY, 0o666)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield target
        finally:
            os.close(lock)  # closing lets the lock go

    def read_versioned(self, key: str) -> tuple[bytes, str] | None:
        path = self._path(key)
        try:
            with local_errors(f"reading {path}"):
                data = path.read_bytes()
        except StorageError:
            if not path.exists() and not path.is_symlink():
                return None
            raise
        return data, hashlib.sha256(data).hexdigest()

    def create(self, key: str, data: bytes) -> bool:
        with self._locked(key) as target:
            if target.exists():
                return False
            self.write_bytes(key, data)
            return True

    def replace(self, key: str, data: bytes, version: str) -> bool:
        with self._locked(key):
            current = self.read_versioned(key)
            if current is None or current[1] != version:
                return False
            self.write_bytes(key, data)
            return True

    def write_bytes(self, key: str, data: bytes) -> None:
        self._atomic(key, lambda out: out.write(data))

    def read_bytes(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise StorageError(f"{self.uri}/{key} does not exist") from None
        except OSError as err:
            raise StorageError(f"reading {path}: {describe(err, str(path))}") from None

    def upload(self, path: Path, key: str) -> None:
        def copy(out):
            with open(path, "rb") as src:
                shutil.copyfileobj(src, out, 16 << 20)

        self._atomic(key, copy)

    def download(self, key: str, path: Path) -> None:
        source = self._path(key)
        if not source.is_file():
            raise StorageError(f"{self.uri}/{key} does not exist")
        with local_errors(f"copying {source} to {path}"):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, path)

    def local_path(self, key: str) -> Path | None:
        return self._path(key)

    def sha256(self, key: str) -> str:
        digest = hashlib.sha256()
        path = self._path(key)
        with local_errors(f"reading {path}"), open(path, "rb") as f:
            while chunk := f.read(16 << 20):
                digest.update(chunk)
        return digest.hexdigest()

    def list(self, prefix: str = "") -> dict[str, int]:
        base = self._path(prefix) if prefix else self.root
        with local_errors(f"listing {base}"):
            if base.is_file():
                return {prefix: base.stat().st_size}
            if not base.is_dir():
                return {}
            found = {}
            for path in base.rglob("*"):
                # Temporary files of writes in flight are not objects yet, and the lock
                # files of conditional writes (`_locked`) never are.
                if path.is_file() and not _sidecar(path.name):
                    found[path.relative_to(self.root).as_posix()] = path.stat().st_size
        return dict(sorted(found.items()))

    def delete(self, prefix: str) -> None:
        target = self._path(prefix)
        with local_errors(f"deleting {target}"):
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)

    def copy(self, source: str, key: str) -> None:
        src = self._path(source)
        if not src.is_file():
            raise StorageError(f"{self.uri}/{source} does not exist")
        self.upload(src, key)

    def child(self, prefix: str) -> Store:
        return LocalStore(self._path(prefix))


class S3Store(Store):
    def __init__(self, bucket: str, prefix: str = "", client=None, **client_options):
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.uri = f"s3://{_join(bucket, self.prefix)}"
        self.client = client or s3_client(**client_options)

    def _key(self, key: str) -> str:
        return _join(self.prefix, key)

    def _call(self, what: str, fn, *args, again=(), **kwargs):
        """`fn(*args, **kwargs)`, its failures a StorageError naming `what`, but for those
        of `again`, which a caller reads again (`_read_again`)."""
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError
        from s3transfer.exceptions import RetriesExceededError, S3DownloadFailedError

        try:
            return fn(*args, **kwargs)
        except again:
            raise
        except ClientError as err:
            code = err.response.get("Error", {}).get("Code", "")
            raise StorageError(f"{what}: {code or err}") from err
        except (
            BotoCoreError,
            Boto3Error,
            RetriesExceededError,
            S3DownloadFailedError,
            OSError,
        ) as err:
            # s3transfer raises its own errors once its retries are spent; sockets, OSError.
            raise StorageError(f"{what}: {err}") from err

    def _get(self, key: str, **conditions) -> dict | None:
        """get_object with the whole body read (`body`), read again when cut off or when it
        fails its checksum; None when the object is not there."""
        from botocore.exceptions import ClientError, FlexibleChecksumError

        def read() -> dict | None:
            try:
                response = self.client.get_object(
                    Bucket=self.bucket, Key=self._key(key), **conditions
                )
            except ClientError as err:
                if err.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    return None
                raise StorageError(f"{what}: {err.response['Error'].get('Code', err)}") from err
            except FlexibleChecksumError:
                raise  # a small body is checked as it arrives: read again
            except Exception as err:  # boto3 has retried the request already
                raise StorageError(f"{what}: {err}") from err
            body = response["Body"].read()
            if len(body) != response.get("ContentLength", len(body)):
                raise OSError(f"{len(body)} of {response['ContentLength']} bytes")
            return {**response, "body": body}

        what = f"reading {self.uri}/{key}"
        return self._read_again(what, read)

    def _read_again(self, what: str, read):
        """`read()`, again while its body arrives damaged: cut off (botocore's streaming
        errors, urllib3's, sockets') or failing its checksum (boto3 retries neither: only
        the request)."""
        for attempt in range(BODY_READS):
            try:
                return read()
            except StorageError:
                raise
            except Exception as err:
                problem = err
            if attempt < BODY_READS - 1:
                time.sleep(0.2 * 2**attempt)
        raise StorageError(f"{what}: body damaged or cut off {BODY_READS} times: {problem}")

    def _put(self, key: str, data: bytes, **conditions) -> bool:
        """put_object; False when a condition (If-None-Match, If-Match) does not hold."""
        from botocore.exceptions import ClientError

        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, **conditions)
        except ClientError as err:
            code = err.response.get("Error", {}).get("Code", "")
            if conditions and code in ("PreconditionFailed", "ConditionalRequestConflict", "412"):
                return False
            raise StorageError(f"writing {self.uri}/{key}: {code or err}") from err
        except Exception as err:
            raise StorageError(f"writing {self.uri}/{key}: {err}") from err
        return True

    def write_bytes(self, key: str, data: bytes) -> None:
        self._put(key, data)

    def read_bytes(self, key: str) -> bytes:
        response = self._get(key)
        if response is None:
            raise StorageError(f"reading {self.uri}/{key}: NoSuchKey")
        return response["body"]

    def read_versioned(self, key: str) -> tuple[bytes, str] | None:
        response = self._get(key)
        return None if response is None else (response["body"], response["ETag"])

    def create(self, key: str, data: bytes) -> bool:
        return self._put(key, data, IfNoneMatch="*")

    def replace(self, key: str, data: bytes, version: str) -> bool:
        return self._put(key, data, IfMatch=version)

    def upload(self, path: Path, key: str) -> None:
        # upload_file switches to parallel multipart uploads for large files.
        self._call(
            f"uploading {path} to {self.uri}/{key}",
            self.client.upload_file,
            str(path),
            self.bucket,
            self._key(key),
        )

    def download(self, key: str, path: Path) -> None:
        from botocore.exceptions import FlexibleChecksumError

        what = f"downloading {self.uri}/{key}"
        with local_errors(what):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        args = (self.bucket, self._key(key), str(path))
        fetch = self.client.download_file
        self._read_again(what, lambda: self._call(what, fetch, *args, again=FlexibleChecksumError))

    def list(self, prefix: str = "") -> dict[str, int]:
        root = f"{self.prefix}/" if self.prefix else ""
        wanted = _join(prefix)
        paginator = self.client.get_paginator("list_objects_v2")
        pages = self._call(
            f"listing {self.uri}/{prefix}",
            lambda: list(paginator.paginate(Bucket=self.bucket, Prefix=root + wanted)),
        )
        found = {}
        for page in pages:
            for obj in page.get("Contents", []):
                key = obj["Key"][len(root) :]
                # S3 prefixes are plain string prefixes: "a/b" must not match "a/bc/...".
                if not wanted or key == wanted or key.startswith(wanted + "/"):
                    found[key] = obj["Size"]
        return dict(sorted(found.items()))

    def delete(self, prefix: str) -> None:
        keys = [self._key(k) for k in self.list(prefix)]
        for start in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[start : start + 1000]]
            self._call(
                f"deleting {self.uri}/{prefix}",
                self.client.delete_objects,
                Bucket=self.bucket,
                Delete={"Objects": batch, "Quiet": True},
            )

    def copy(self, source: str, key: str) -> None:
        # Managed copy: multipart and server-side for large objects, nothing downloaded.
        self._call(
            f"copying {self.uri}/{source}",
            self.client.copy,
            {"Bucket": self.bucket, "Key": self._key(source)},
            self.bucket,
            self._key(key),
        )

    def copy_from(self, other: Store, source: str, key: str) -> None:
        if not isinstance(other, S3Store):
            super().copy_from(other, source, key)
            return
        # Server-side across buckets and prefixes of the same endpoint: nothing downloaded.
        self._call(
            f"copying {other.uri}/{source} to {self.uri}/{key}",
            self.client.copy,
            {"Bucket": other.bucket, "Key": other._key(source)},
            self.bucket,
            self._key(key),
        )

    def sha256(self, key: str) -> str:
        what = f"reading {self.uri}/{key}"

        def read() -> str:
            response = self._call(
                what, self.client.get_object, Bucket=self.bucket, Key=self._key(key)
            )
            digest, size = hashlib.sha256(), 0
            for chunk in response["Body"].iter_chunks(16 << 20):
                digest.update(chunk)
                size += len(chunk)
            if size != response["ContentLength"]:
                raise OSError(f"{size} of {response['ContentLength']} bytes")
            return digest.hexdigest()

        return self._read_again(what, read)

    def child(self, prefix: str) -> Store:
        return S3Store(self.bucket, self._key(prefix), client=self.client)


def s3_client(
    endpoint: str | None = None,
    region: str | None = None,
    access_key: str | None = None,
    secret_key: str | None = None,
):
    """A boto3 S3 client with retries; explicit settings win over the environment."""
    import boto3
    from botocore.config import Config

    credentials = {}
    secret_dir = os.environ.get(SECRET_DIR_ENV)
    if access_key and secret_key:
        credentials = {"aws_access_key_id": access_key, "aws_secret_access_key": secret_key}
    elif secret_dir:
        folder = Path(secret_dir)
        credentials = {
            "aws_access_key_id": (folder / "AWS_ACCESS_KEY_ID").read_text().strip(),
            "aws_secret_access_key": (folder / "AWS_SECRET_ACCESS_KEY").read_text().strip(),
        }
    config = Config(
        retries={"max_attempts": 8, "mode": "standard"},
        connect_timeout=10,
        read_timeout=120,
        s3={"addressing_style": "path"} if endpoint or os.environ.get("AWS_ENDPOINT_URL") else {},
    )
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        region_name=region or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        config=config,
        **credentials,
    )


def file_path(uri: str) -> str:
    """The path of a `file://` URI, percent-decoded (`file:///st%20ore` is `/st ore`), as
    RFC 8089 writes paths."""
    parsed = urlparse(uri)
    if parsed.netloc not in ("", "localhost"):
        raise StorageError(f"{uri}: a file:// URI names no host (write file:///path)")
    return unquote(parsed.path)


def open_store(
    uri: str, endpoint: str | None = None, region: str | None = None, client=None
) -> Store:
    """The store at `uri`: `s3://bucket/prefix`, `file:///path` or a plain path. `client`
    reuses an S3 client (building one reads credentials and costs milliseconds)."""
    if uri.startswith("s3://"):
        parsed = urlparse(uri)
        if not parsed.netloc:
            raise StorageError(f"{uri}: no bucket (write s3://bucket/prefix)")
        if "@" in parsed.netloc:
            raise StorageError(f"{uri}: credentials in a URI are refused (use a Secret)")
        if client is not None:
            return S3Store(parsed.netloc, parsed.path, client=client)
        return S3Store(parsed.netloc, parsed.path, endpoint=endpoint, region=region)
    if uri.startswith("file://"):
        return LocalStore(file_path(uri))
    if "://" in uri:
        raise StorageError(f"{uri}: only s3://, file:// and plain paths are supported")
    return LocalStore(uri)
