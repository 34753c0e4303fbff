"""Where a run's files go: local paths and URIs (``s3://``, ``gs://``) through pyarrow's filesystems.

Every file mimir writes is written whole (a local one through a renamed temporary file, so a reader
never sees half of it). A write that fails ends in :class:`~mimir.errors.StorageError` naming the
path; on remote storage a failing read or write is first retried ``len(REMOTE_RETRY_WAITS)`` times
with growing waits (1, 2, 4, 8 s), since an object store's errors are often transient. A full local
disk is not: it fails at once.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pyarrow.fs as pafs

from mimir.errors import StorageError

T = TypeVar("T")
REMOTE_RETRY_WAITS = (1.0, 2.0, 4.0, 8.0)
# what waiting cannot fix
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def is_remote(path: str) -> bool:
    return "://" in path


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and inner path of a local path (made absolute) or a URI."""
    return pafs.FileSystem.from_uri(path if is_remote(path) else str(Path(path).expanduser().resolve()))


def with_retries(path: str, action: Callable[[], T], waits: tuple[float, ...] | None = None) -> T:
    """``action()``, retried after each of ``waits`` (remote paths: REMOTE_RETRY_WAITS; local: none)
    when it raises a transient OSError; the last failure as a StorageError naming ``path``."""
    waits = (REMOTE_RETRY_WAITS if is_remote(path) else ()) if waits is None else waits
    for attempt in range(len(waits) + 1):
        try:
            return action()
        except StorageError:
            raise
        except OSError as err:
            if attempt == len(waits) or isinstance(err, _PERMANENT):
                tries = f" (after {attempt + 1} attempts)" if attempt else ""
                raise StorageError(path, f"{err.strerror or err}{tries}") from err
            time.sleep(waits[attempt])
    raise AssertionError("unreachable")


def write_bytes(path: str, data: bytes) -> None:
    """Write ``path`` (local or URI) whole, creating its folder."""
    if not is_remote(path):
        _write_local(Path(path).expanduser(), data)
        return
    fs, inner = filesystem(path)

    def write() -> None:
        fs.create_dir(inner.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(inner) as stream:
            stream.write(data)

    with_retries(path, write)


def _write_local(path: Path, data: bytes) -> None:
    partial = path.with_name(path.name + ".partial")

    def write() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            partial.write_bytes(data)
            partial.replace(path)
        except OSError:
            partial.unlink(missing_ok=True)  # no half-written leftover beside the intact file
            raise

    with_retries(str(path), write)


def write_json(path: str | Path, record: dict[str, Any]) -> None:
    """``record`` as indented JSON at ``path``, written whole."""
    write_bytes(str(path), json.dumps(record, indent=2).encode())


def read_bytes(path: str) -> bytes | None:
    """The file's bytes, or None when there is none (retried on remote storage)."""
    fs, inner = filesystem(path)

    def read() -> bytes | None:
        if fs.get_file_info(inner).type != pafs.FileType.File:
            return None
        with fs.open_input_stream(inner) as stream:
            return stream.read()

    return with_retries(path, read)


def check_writable(folder: str) -> None:
    """Create ``folder`` and write and remove a small file in it: an unwritable or unreachable storage
    path fails here, before anything trains, with a StorageError naming it."""
    probe = f"{folder.rstrip('/')}/.mimir-write-test-{os.getpid()}"
    write_bytes(probe, b"")
    fs, inner = filesystem(probe)
    with_retries(probe, lambda: fs.delete_file(inner))
