"""Cache entries that concurrent jobs share safely: one OS file lock per entry, made once, reused by the rest.

An entry is a file or a directory under the cache dir, with a *marker*: the file written last (atomically,
through fileio), whose presence means the whole entry is complete. A complete entry is read without a lock, since
nothing rewrites it. An incomplete one is made under the entry's lock, ``.<entry>.lock`` next to it: a second job
that wants the same entry waits, then finds it complete and reuses it.

The lock is ``fcntl.flock`` on the lock file: the kernel releases it when its holder exits, also on ``kill -9``,
so a killed job never blocks the others; the next one finds the entry incomplete (no marker) and makes it again.
Lock files stay in place: deleting one while another process waits on it would let two holders in at once.
Where ``fcntl`` does not exist (Windows) entries are not locked: writes stay atomic, but two jobs may both
compute an entry.
"""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

# descriptors of the locks this process holds: a forked child (a data loader worker, say) closes its copies,
# because a flock belongs to the open file, and a child keeping it open would hold the lock after we let go
_held_fds: set[int] = set()


def _close_inherited_locks() -> None:
    for fd in _held_fds:
        try:
            os.close(fd)
        except OSError:
            pass
    _held_fds.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited_locks)


def lock_path(entry: str | os.PathLike) -> Path:
    """The lock file of a cache entry: ``.<entry>.lock``, next to it (hidden: a listing shows the entries)."""
    entry = Path(entry)
    return entry.with_name(f".{entry.name}.lock")


def lock_holder(entry: str | os.PathLike) -> str:
    """Who holds (or last held) the lock of ``entry``, as its holder wrote it: ``PID 1234 on host``."""
    try:
        return lock_path(entry).read_text(encoding="utf-8").strip() or "an unknown process"
    except OSError:
        return "an unknown process"


@contextmanager
def locked(entry: str | os.PathLike, *, echo: Callable[[str], None] = print) -> Iterator[None]:
    """Hold the lock of cache entry ``entry`` for the ``with`` block; wait (saying for whom) if another has it."""
    if fcntl is None:
        yield
        return
    path = lock_path(entry)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    _held_fds.add(fd)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            echo(f"  waiting for cache entry {entry} (held by {lock_holder(entry)})")
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"PID {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        _held_fds.discard(fd)
        os.close(fd)  # closing the last descriptor of the open file releases the lock


@dataclass(frozen=True)
class Entry:
    path: Path  # the entry: a file, or a directory of files
    marker: Path  # written last; present means complete
    enabled: bool = True  # False: caching is off, the entry is neither read nor written

    @property
    def ready(self) -> bool:
        """Complete and usable: reuse it instead of computing."""
        return self.enabled and self.marker.is_file()


@contextmanager
def cache_entry(path: str | os.PathLike, *, marker: str | os.PathLike | None = None, enabled: bool = True,
                echo: Callable[[str], None] = print) -> Iterator[Entry]:
    """Use or make one cache entry::

        with cache_entry(cache_dir / key, marker="result.json") as entry:
            if entry.ready:
                ...read it
            else:
                ...compute, write its files, the marker last

    ``marker`` is relative to ``path`` (a directory entry) or absent (the entry is one file, its own marker). A
    complete entry is yielded at once; otherwise the block runs holding the entry's lock, and ``ready`` is
    checked again once the lock is held, so a job that waited finds what the holder made.
    """
    path = Path(path)
    entry = Entry(path, path / marker if marker is not None else path, enabled)
    if not enabled or entry.ready:
        yield entry
        return
    with locked(path, echo=echo):
        yield entry
