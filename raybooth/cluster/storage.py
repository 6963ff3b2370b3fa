"""One way to name data: local paths (or `file://`) and `s3://bucket/key`.

Every job reads and writes through these functions, so the same config runs on a laptop (a folder
under the work dir) and on a cluster (an S3 prefix every node can see):

    from raybooth.cluster import storage
    root = storage.storage_root(cfg.storage)                  # "/.../.raybooth/storage" or "s3://b/p"
    storage.write_text_atomic(storage.join(root, "run", "done.txt"), "ok")
    fs, path = storage.pyarrow_filesystem(root)                # for Ray Data / Ray Train

S3 settings come only from the standard AWS environment / config files, never from repo YAML:
`AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL` (an S3-compatible server such as MinIO), `AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_PROFILE`, and `AWS_REGION` / `AWS_DEFAULT_REGION`.
botocore reads the endpoint and the credentials itself, but only `AWS_DEFAULT_REGION` for the region,
so the endpoint and the region are passed explicitly (the endpoint is also what error messages name).

Failures the user can fix (unreachable endpoint, missing credentials or bucket, access denied) are
`StorageError`s naming the URI and the fix. Timeouts and retries are short so a wrong endpoint fails
in about a second instead of botocore's default minute of back-off.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

import fsspec
import pyarrow.fs as pafs
from fsspec.implementations.local import LocalFileSystem

from raybooth.cluster.config import StorageSection
from raybooth.cluster.workdir import default_storage_root
from raybooth.errors import StorageError

S3_SCHEMES = ("s3://", "s3a://")
FILE_SCHEME = "file://"

# Short connect timeout + 2 tries in all: a refused or wrong endpoint fails in ~1 s, while one retry still
# rides over a transient reset. botocore's `max_attempts` counts retries (2 would mean 3 tries), so the
# config sets `total_max_attempts`. s3fs's own retry loop (5 tries) only covers read timeouts and SlowDown.
S3_CONNECT_TIMEOUT_S = 3
S3_READ_TIMEOUT_S = 60
S3_MAX_ATTEMPTS = 2

_s3_cache: dict[tuple[str, ...], fsspec.AbstractFileSystem] = {}
_s3_cache_lock = threading.Lock()


# --------------------------------------------------------------------------------------------------
# Naming
# --------------------------------------------------------------------------------------------------


def is_remote(uri: str) -> bool:
    """True for `s3://` (and `s3a://`) URIs; local paths and `file://` are not remote."""
    return str(uri).startswith(S3_SCHEMES)


def join(uri: str, *parts: str) -> str:
    """Append path parts to a local path or URI, keeping its scheme: `join("s3://b/p", "a", "x.txt")`."""
    uri = str(uri)
    if is_remote(uri) or uri.startswith(FILE_SCHEME):
        cleaned = [p.strip("/") for p in parts if p and p.strip("/")]
        return "/".join([uri.rstrip("/"), *cleaned]) if cleaned else uri
    return os.path.join(uri, *parts)


def _check_scheme(uri: str) -> None:
    scheme, sep, _ = uri.partition("://")
    if sep and f"{scheme}://" not in (*S3_SCHEMES, FILE_SCHEME):
        raise StorageError(
            f"{uri}: unsupported scheme {scheme!r}; use a local path, file:// or s3://bucket/key"
        )


def _s3_path(uri: str) -> str:
    """`s3://bucket/key` -> `bucket/key` (what s3fs and pyarrow want)."""
    path = uri.split("://", 1)[1].strip("/")
    if not path:
        raise StorageError(f"{uri}: no bucket named; write s3://bucket/prefix")
    return path


def _local_path(uri: str) -> str:
    path = uri[len(FILE_SCHEME) :] if uri.startswith(FILE_SCHEME) else uri
    return os.path.abspath(os.path.expanduser(path))


def _to_uri(like: str, path: str) -> str:
    """Turn a filesystem path back into a URI in the style of `like` (same scheme)."""
    if is_remote(like):
        return like.split("://", 1)[0] + "://" + path
    if like.startswith(FILE_SCHEME):
        return FILE_SCHEME + path
    return path


def storage_root(section: StorageSection) -> str:
    """Where jobs write: the config's `storage.root`, else `<work dir>/storage`."""
    return section.root or default_storage_root()


# --------------------------------------------------------------------------------------------------
# Filesystems
# --------------------------------------------------------------------------------------------------


def s3_endpoint() -> str | None:
    """The S3 endpoint from the environment (the S3-specific variable wins, as in botocore)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _s3_region() -> str | None:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None


def _s3_cache_key() -> tuple[str, ...]:
    # Credentials are hashed, not stored, so a changed key gives a fresh client without keeping secrets.
    secret = "|".join(os.environ.get(k, "") for k in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"))
    return (
        s3_endpoint() or "",
        _s3_region() or "",
        os.environ.get("AWS_PROFILE", ""),
        os.environ.get("AWS_ACCESS_KEY_ID", ""),
        hashlib.sha256(secret.encode()).hexdigest(),
    )


def _s3fs() -> fsspec.AbstractFileSystem:
    """An s3fs filesystem for the current AWS environment (one per distinct environment)."""
    import s3fs  # imported lazily: local-only jobs never pay for aiobotocore

    key = _s3_cache_key()
    with _s3_cache_lock:
        fs = _s3_cache.get(key)
        if fs is None:
            region = _s3_region()
            fs = s3fs.S3FileSystem(
                endpoint_url=s3_endpoint(),
                client_kwargs={"region_name": region} if region else {},
                config_kwargs={
                    "connect_timeout": S3_CONNECT_TIMEOUT_S,
                    "read_timeout": S3_READ_TIMEOUT_S,
                    "retries": {"total_max_attempts": S3_MAX_ATTEMPTS, "mode": "standard"},
                },
                # Other processes (Ray workers) write the same prefixes: never answer from a stale listing.
                use_listings_cache=False,
                # Our own cache above is keyed on the environment; fsspec's is keyed on arguments only.
                skip_instance_cache=True,
            )
            _s3_cache[key] = fs
        return fs


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for `uri` and the path as that filesystem wants it."""
    uri = str(uri)
    _check_scheme(uri)
    if is_remote(uri):
        return _s3fs(), _s3_path(uri)
    return LocalFileSystem(), _local_path(uri)


def pyarrow_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem + path without scheme, for `write_parquet(filesystem=)` / `RunConfig(storage_filesystem=)`."""
    uri = str(uri)
    _check_scheme(uri)
    if is_remote(uri):
        # Wrapping s3fs (not pyarrow's own S3FileSystem) keeps one set of S3 settings for the project.
        return pafs.PyFileSystem(pafs.FSSpecHandler(_s3fs())), _s3_path(uri)
    return pafs.LocalFileSystem(), _local_path(uri)


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------


def _describe_failure(uri: str, exc: BaseException) -> str:
    """One line naming what failed and the fix."""
    from botocore.exceptions import (  # botocore ships with s3fs and boto3
        ConnectionError as BotoConnectionError,
    )
    from botocore.exceptions import (
        NoCredentialsError,
        PartialCredentialsError,
    )

    if isinstance(exc, BotoConnectionError):
        endpoint = s3_endpoint() or "AWS S3"
        return (
            f"{uri}: cannot reach S3 endpoint {endpoint} ({exc}); set AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL "
            "to a running S3 server, or unset them to use AWS"
        )
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return f"{uri}: no AWS credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
    if isinstance(exc, PermissionError):
        return f"{uri}: access denied ({exc}); check the credentials' permissions on this bucket/prefix"
    if isinstance(exc, FileNotFoundError):
        where = "bucket or key" if is_remote(uri) else "path"
        return f"{uri}: no such {where}; check the URI (create the bucket/folder first)"
    return f"{uri}: {type(exc).__name__}: {exc}"


@contextlib.contextmanager
def _storage_errors(uri: str) -> Iterator[None]:
    """Re-raise I/O and S3 failures as one-line `StorageError`s, keeping the cause."""
    from botocore.exceptions import BotoCoreError

    try:
        yield
    except StorageError:
        raise
    except (OSError, BotoCoreError) as e:
        raise StorageError(_describe_failure(uri, e)) from e


# --------------------------------------------------------------------------------------------------
# Operations
# --------------------------------------------------------------------------------------------------


def exists(uri: str) -> bool:
    """True if a file or folder (S3: an object or a non-empty prefix) is there."""
    fs, path = filesystem(uri)
    with _storage_errors(uri):
        if is_remote(uri):
            # s3fs.exists swallows connection errors and answers False; info() raises them.
            try:
                fs.info(path)
            except FileNotFoundError:
                return False
            return True
        return os.path.exists(path)


def _require_bucket(fs: fsspec.AbstractFileSystem, uri: str) -> None:
    bucket = _s3_path(uri).split("/", 1)[0]
    try:
        fs.info(bucket)
    except FileNotFoundError as e:
        raise StorageError(f"{uri}: bucket {bucket!r} does not exist; create it or fix the URI") from e


def _matches(name: str, suffixes: tuple[str, ...] | None) -> bool:
    if name.startswith("."):
        return False  # temp files of atomic writes, .DS_Store and friends
    return suffixes is None or name.lower().endswith(suffixes)


def list_files(uri: str, suffixes: Iterable[str] | None = None) -> list[str]:
    """Every file under `uri` (recursive) as sorted full URIs; hidden files are skipped.

    `suffixes` (e.g. `[".jpg", ".png"]`) filters case-insensitively. A file URI lists itself; a
    missing folder or empty prefix lists nothing (S3 cannot tell them apart); a missing bucket is an error.
    """
    fs, path = filesystem(uri)
    wanted = tuple(s.lower() for s in suffixes) if suffixes is not None else None
    with _storage_errors(uri):
        try:
            found = fs.find(path)
        except FileNotFoundError:
            found = []
        if not found and is_remote(uri):
            _require_bucket(fs, uri)  # an empty listing must not hide a misspelt bucket
    found = [p for p in found if _matches(posixpath.basename(p), wanted)]
    return sorted(_to_uri(uri, p) for p in found)


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with _storage_errors(uri):
        return fs.cat_file(path)


def read_text(uri: str, encoding: str = "utf-8") -> str:
    return read_bytes(uri).decode(encoding)


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Write `data` so readers see the old file or the new one, never half of it."""
    fs, path = filesystem(uri)
    with _storage_errors(uri):
        if is_remote(uri):
            # One PUT (or one completed multipart upload) is atomic on S3: no temp object needed.
            fs.pipe_file(path, data)
            return
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        # The temp file sits in the target's folder so os.replace is a same-filesystem rename.
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise


def write_text_atomic(uri: str, text: str, encoding: str = "utf-8") -> None:
    write_bytes_atomic(uri, text.encode(encoding))


def _local_files(local_dir: str) -> list[str]:
    """Relative posix paths of every file under `local_dir`."""
    out = []
    for folder, _, names in os.walk(local_dir):
        for name in names:
            rel = os.path.relpath(os.path.join(folder, name), local_dir)
            out.append(rel.replace(os.sep, "/"))
    return sorted(out)


def upload_dir(local_dir: str | os.PathLike[str], uri: str) -> None:
    """Copy every file under `local_dir` to `uri` (same relative layout; existing files overwritten)."""
    src = os.path.abspath(os.fspath(local_dir))
    if not os.path.isdir(src):
        raise StorageError(f"{src}: not a folder; upload_dir copies a local folder to a URI")
    fs, path = filesystem(uri)
    with _storage_errors(uri):
        if not is_remote(uri):
            shutil.copytree(src, path, dirs_exist_ok=True)
            return
        rels = _local_files(src)
        if rels:
            # Lists of equal length copy one-to-one, concurrently, with no fsspec trailing-slash rules.
            fs.put([os.path.join(src, r) for r in rels], [f"{path}/{r}" for r in rels])


def download_dir(uri: str, local_dir: str | os.PathLike[str]) -> None:
    """Copy every file under `uri` into `local_dir` (created), keeping the relative layout."""
    dst = os.path.abspath(os.fspath(local_dir))
    fs, path = filesystem(uri)
    with _storage_errors(uri):
        if not is_remote(uri):
            if not os.path.isdir(path):
                raise StorageError(f"{uri}: not a folder; download_dir copies a folder or prefix")
            shutil.copytree(path, dst, dirs_exist_ok=True)
            return
        found = fs.find(path)
        if not found:
            raise StorageError(f"{uri}: no objects under this prefix; check the URI")
        os.makedirs(dst, exist_ok=True)
        rels = [posixpath.relpath(p, path) for p in found]
        for rel in rels:
            os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
        fs.get(found, [os.path.join(dst, r) for r in rels])


def delete(uri: str, recursive: bool = False) -> None:
    """Remove a file (or, with `recursive=True`, a folder/prefix). Missing targets are fine."""
    fs, path = filesystem(uri)
    with _storage_errors(uri):
        if is_remote(uri):
            if recursive:
                if fs.find(path):
                    fs.rm(path, recursive=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    fs.rm_file(path)
            return
        if os.path.isdir(path) and not os.path.islink(path):
            if recursive:
                shutil.rmtree(path)
            elif os.listdir(path):
                raise StorageError(f"{uri}: folder is not empty; pass recursive=True to delete it")
            else:
                os.rmdir(path)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def check_writable(uri: str) -> tuple[bool, str]:
    """Write, read back and remove a probe object under `uri`; `(ok, one-line message)` for doctor."""
    probe = join(uri, f".raybooth-probe-{uuid.uuid4().hex}")
    payload = b"raybooth write probe"
    try:
        write_bytes_atomic(probe, payload)
        if read_bytes(probe) != payload:
            return False, f"{uri}: a probe object read back different bytes; check the storage server"
        delete(probe)
    except StorageError as e:
        return False, f"storage not writable: {e}"
    return True, f"{uri} is writable"


def local_path(uri: str) -> Path:
    """The local `Path` of a non-remote URI (`file://` stripped); `StorageError` for s3://."""
    if is_remote(uri):
        raise StorageError(f"{uri}: expected a local path here; download it first (storage.download_dir)")
    _check_scheme(str(uri))
    return Path(_local_path(str(uri)))
