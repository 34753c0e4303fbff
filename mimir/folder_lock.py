"""One writer per folder: a run's ``output_dir`` and a sweep's experiment folder are held by the process
writing them, through an advisory lock (``fcntl.flock``) on ``<folder>/.mimir.lock``.

The kernel releases the lock when its holder exits, however it exits, so a lock left by a process
that died is simply taken by the next one; the file's text (host, pid, command, start time) is only
there to name the holder in the refusal. On NFS, ``flock`` is mapped to the server's locks (Linux
2.6.12 and later), so a driver on another host is refused too.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from mimir.errors import FolderInUse

LOCK_NAME = ".mimir.lock"


@contextlib.contextmanager
def folder_lock(folder: str | Path, what: str = "run") -> Iterator[None]:
    """Hold ``folder`` (created when missing, and removed again if this leaves it empty) for the
    block; FolderInUse naming the live holder when another process holds it."""
    folder = Path(folder).expanduser()
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    handle = open(path, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            raise FolderInUse(f"{folder} is being written by another {what}: {_describe(handle.read())}; wait "
                              "for it to end (or stop it), or choose another folder") from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                                 "command": shlex.join(sys.argv)}))
        handle.flush()
        yield
    finally:
        handle.close()  # releases the lock
        if created and [p.name for p in folder.iterdir()] == [LOCK_NAME]:
            path.unlink(missing_ok=True)
            folder.rmdir()


def _describe(text: str) -> str:
    try:
        holder = json.loads(text)
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["started"]))
        return f"pid {holder['pid']} on {holder['host']}, since {started} (`{holder['command']}`)"
    except (ValueError, KeyError, TypeError):
        return "a process that has not yet said who it is"
