"""Storage URIs on a local folder and on a real S3-compatible server (moto) on loopback.

.venv/bin/python -m pytest tests/cluster/test_storage.py
"""

from __future__ import annotations

import os
import pickle
import posixpath
import socket
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raybooth.cluster import storage
from raybooth.cluster.config import StorageSection
from raybooth.cluster.workdir import work_dir
from raybooth.errors import StorageError


@pytest.fixture(params=["local", "file", "s3"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The same tests against a plain path, a file:// URI and an s3:// prefix."""
    if request.param == "local":
        return str(tmp_path / "root")
    if request.param == "file":
        return "file://" + str(tmp_path / "root")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/prefix"


def test_naming() -> None:
    assert storage.is_remote("s3://b/k") and not storage.is_remote("/tmp/x")
    assert not storage.is_remote("file:///tmp/x")
    assert storage.join("s3://b/p/", "a", "/x.txt") == "s3://b/p/a/x.txt"
    assert storage.join("file:///t", "a") == "file:///t/a"
    assert storage.join("/t", "a", "b") == os.path.join("/t", "a", "b")
    with pytest.raises(StorageError, match="unsupported scheme 'gs'"):
        storage.filesystem("gs://bucket/x")
    with pytest.raises(StorageError, match="no bucket"):
        storage.filesystem("s3://")


def test_storage_root_defaults_to_work_dir() -> None:
    assert storage.storage_root(StorageSection()) == str(work_dir() / "storage")
    assert storage.storage_root(StorageSection(root="s3://b/p")) == "s3://b/p"
    # The session fixture keeps the work dir out of the repo.
    assert not str(work_dir()).startswith(str(Path(__file__).resolve().parents[2]) + os.sep + ".raybooth")


def test_round_trip(root: str) -> None:
    a = storage.join(root, "a.txt")
    b = storage.join(root, "sub", "deep", "b.JPG")
    assert not storage.exists(a)
    storage.write_text_atomic(a, "hello")
    storage.write_bytes_atomic(b, b"\x00\x01")
    storage.write_bytes_atomic(storage.join(root, "sub", ".hidden"), b"x")

    assert storage.exists(a) and storage.exists(storage.join(root, "sub"))
    assert storage.read_bytes(a) == b"hello"
    assert storage.read_text(a) == "hello"
    assert storage.read_bytes(b) == b"\x00\x01"
    # Sorted, recursive, full URIs in the caller's scheme, hidden files skipped.
    assert storage.list_files(root) == [a, b]
    assert storage.list_files(root, suffixes=[".jpg"]) == [b]
    assert storage.list_files(a) == [a]
    assert storage.list_files(storage.join(root, "missing")) == []

    storage.write_text_atomic(a, "replaced")
    assert storage.read_text(a) == "replaced"

    storage.delete(a)
    assert not storage.exists(a)
    storage.delete(a)  # deleting twice is fine
    storage.delete(root, recursive=True)
    assert storage.list_files(root) == []
    assert not storage.exists(b)


def test_upload_download_dir(root: str, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "nested").mkdir(parents=True)
    (src / "x.bin").write_bytes(os.urandom(1000))
    (src / "nested" / "y.txt").write_text("y")
    dst_uri = storage.join(root, "uploaded")

    storage.upload_dir(src, dst_uri)
    assert storage.list_files(dst_uri) == [
        storage.join(dst_uri, "nested", "y.txt"),
        storage.join(dst_uri, "x.bin"),
    ]

    back = tmp_path / "back"
    storage.download_dir(dst_uri, back)
    assert (back / "x.bin").read_bytes() == (src / "x.bin").read_bytes()
    assert (back / "nested" / "y.txt").read_text() == "y"

    with pytest.raises(StorageError, match="not a folder"):
        storage.upload_dir(tmp_path / "nope", dst_uri)


def test_pyarrow_filesystem_parquet(root: str) -> None:
    fs, path = storage.pyarrow_filesystem(storage.join(root, "table.parquet"))
    assert "://" not in path  # Ray wants the path without its scheme next to a filesystem
    table = pa.table({"id": [1, 2, 3], "caption": ["a", "b", "c"]})
    fs.create_dir(posixpath.dirname(path), recursive=True)
    pq.write_table(table, path, filesystem=fs)
    assert pq.read_table(path, filesystem=fs).equals(table)
    assert storage.list_files(root, suffixes=[".parquet"]) == [storage.join(root, "table.parquet")]


def test_atomic_write_leaves_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "out" / "data.bin"
    for i in range(3):
        storage.write_bytes_atomic(str(target), bytes([i]) * 10)
    assert sorted(os.listdir(target.parent)) == ["data.bin"]
    assert target.read_bytes() == bytes([2]) * 10


def test_atomic_write_failure_keeps_old_file(tmp_path: Path) -> None:
    target = tmp_path / "data.txt"
    storage.write_text_atomic(str(target), "old")
    with pytest.raises(TypeError):
        storage.write_bytes_atomic(str(target), "not bytes")  # type: ignore[arg-type]
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["data.txt"]


def test_s3_objects_land_in_bucket(s3_server, s3_bucket: str) -> None:
    """What storage writes is visible to a plain S3 client (not only to s3fs)."""
    storage.write_bytes_atomic(f"s3://{s3_bucket}/p/one.bin", b"1")
    storage.upload_dir(Path(__file__).parent, f"s3://{s3_bucket}/code")
    keys = s3_server.list_keys(s3_bucket)
    assert "p/one.bin" in keys
    assert f"code/{Path(__file__).name}" in keys


def test_delete_non_empty_folder_needs_recursive(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_text("x")
    with pytest.raises(StorageError, match="recursive=True"):
        storage.delete(str(tmp_path / "d"))
    storage.delete(str(tmp_path / "d"), recursive=True)
    assert not (tmp_path / "d").exists()


def test_missing_things_are_storage_errors(s3_bucket: str, tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="no such"):
        storage.read_bytes(str(tmp_path / "missing.txt"))
    with pytest.raises(StorageError, match="no such"):
        storage.read_bytes(f"s3://{s3_bucket}/missing.txt")
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-zz' does not exist"):
        storage.list_files("s3://no-such-bucket-zz/images")
    with pytest.raises(StorageError, match="no objects"):
        storage.download_dir(f"s3://{s3_bucket}/missing/", tmp_path / "x")


def test_check_writable(root: str, tmp_path: Path) -> None:
    ok, msg = storage.check_writable(root)
    assert ok, msg
    assert storage.list_files(root) == []  # the probe is gone

    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    ok, msg = storage.check_writable(str(blocker / "below"))
    assert not ok and str(blocker) in msg


@pytest.mark.usefixtures("s3_server")
def test_unreachable_endpoint_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    # Bound but never listening, and held for the whole test: connections are refused, no race.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
        monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", dead)
        # "Fast" is counted, not timed (a loaded CI box stretches any clock): every HTTP attempt the client
        # makes passes botocore's before-send event. Short retries give at most S3_MAX_ATTEMPTS per call.
        fs, _ = storage.filesystem("s3://bucket/key")
        sends: list[str] = []
        fs.s3.meta.events.register("before-send", lambda request, **_: sends.append(request.url))

        with pytest.raises(StorageError, match="cannot reach S3 endpoint") as info:
            storage.read_bytes("s3://bucket/key")
        assert dead in str(info.value) and "AWS_ENDPOINT_URL" in str(info.value)
        read_sends = len(sends)
        with pytest.raises(StorageError, match="cannot reach"):
            storage.exists("s3://bucket/key")
        ok, msg = storage.check_writable("s3://bucket/prefix")
        assert not ok and dead in msg
        assert all(url.startswith(dead) for url in sends)
        # One S3 operation per call, each tried S3_MAX_ATTEMPTS times (botocore's default would be 3-5
        # tries with backoff, s3fs's own loop 5 more).
        assert 1 <= read_sends <= storage.S3_MAX_ATTEMPTS and len(sends) <= 3 * storage.S3_MAX_ATTEMPTS, sends


def test_pyarrow_filesystem_pickles_without_secrets(s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray ships the filesystem to workers by pickle: it must work there and carry no credentials."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret-value")  # moto accepts any secret
    uri = f"s3://{s3_bucket}/shipped.bin"
    storage.write_bytes_atomic(uri, b"payload")
    fs, path = storage.pyarrow_filesystem(uri)
    blob = pickle.dumps(fs)
    assert b"testing-secret-value" not in blob
    with pickle.loads(blob).open_input_stream(path) as f:
        assert f.read() == b"payload"
