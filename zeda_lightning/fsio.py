"""File-system helpers shared by exports, checkpoints, data files and run locks: all-or-nothing writes of a file
(:func:`atomic_write`) or a directory (:func:`atomic_dir`), the process umask, durable fsyncs, and whether a pid
still runs. Plain ``os`` only, importable from every layer."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import IO


def remove_write_leftovers(path: str | os.PathLike) -> list[str]:
    """Remove the temporaries a killed :func:`atomic_write` of ``path`` left beside it (``.<name>.*.tmp``, each as
    large as the file); returns them. Only for a writer that owns ``path`` (a run holding its lock): a concurrent
    writer's temporary would go too."""
    path = os.path.abspath(os.fspath(path))
    pattern = os.path.join(glob.escape(os.path.dirname(path)), f".{glob.escape(os.path.basename(path))}.*.tmp")
    removed = []
    for stale in glob.glob(pattern):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(stale)
            removed.append(stale)
    return removed


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Write ``path`` all or nothing: into a hidden temporary sibling, flushed to disk, then renamed over ``path``.

    A crash, a kill or a full disk leaves the old file (or none) and no partial one; the new file gets the mode a
    plain ``open`` would (umask applied), not ``mkstemp``'s 0600. ``mode`` is ``"w"`` (UTF-8 text) or ``"wb"``.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write: mode must be 'w' or 'wb', got {mode!r}")
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~umask())
        fsync_replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def fsync_replace(src: str, dst: str) -> None:
    """``os.replace``, then fsync the directory so the rename is durable."""
    os.replace(src, dst)
    fsync_path(os.path.dirname(os.path.abspath(dst)) or ".")


@contextlib.contextmanager
def atomic_dir(
    path: str | os.PathLike,
    *,
    remove: Callable[[str], None] = shutil.rmtree,
    before_swap: Callable[[], None] | None = None,
) -> Iterator[str]:
    """Fill the directory ``path`` all or nothing: the block writes into the hidden temporary sibling it is given
    (``.<name>.tmp-*``), which then gets umask modes (:func:`finalise_tree`) and replaces ``path``
    (:func:`replace_dir`). An error in the block (or in ``before_swap``, a last check run just before the swap)
    removes the temporary and leaves ``path`` as it was; a kill leaves the temporary behind, never a partial
    ``path``. ``remove`` deletes a directory this helper created (the temporary on error, the replaced old one).
    """
    path = os.path.abspath(os.fspath(path))
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    try:
        yield tmp
        finalise_tree(tmp)
        if before_swap is not None:
            before_swap()
        replace_dir(tmp, path, remove=remove)
    except BaseException:
        try:
            if os.path.isdir(tmp):
                remove(tmp)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(src: str, dst: str, *, remove: Callable[[str], None] = shutil.rmtree) -> None:
    """Rename the directory ``src`` to ``dst``. A non-empty ``dst`` first moves aside to a hidden sibling
    ``.<name>.old-*``, so at every instant either ``dst`` or that sibling exists (a kill between the two renames
    leaves the old one there, under that name); if the second rename fails the first is undone. The old one is then
    deleted with ``remove`` (a failure leaves it as a leftover). Both renames are flushed to disk."""
    parent, name = os.path.split(os.path.abspath(dst))
    if os.path.isdir(dst) and os.listdir(dst):
        old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
        os.rmdir(old)
        os.rename(dst, old)
        try:
            os.replace(src, dst)
        except BaseException:
            os.rename(old, dst)
            raise
        fsync_path(parent)
        try:
            remove(old)
        except OSError:
            pass
    else:
        fsync_replace(src, dst)  # over nothing, or over an empty directory


def finalise_tree(root: str) -> None:
    """Give every directory under ``root`` ``0o777 & ~umask`` and every file ``0o666 & ~umask`` (``mkdtemp`` makes
    a directory 0700, and some writers go through private 0600 temporaries), and flush them to disk."""
    mask = umask()
    for dirpath, dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o777 & ~mask)
        for name in filenames:
            file = os.path.join(dirpath, name)
            if os.path.islink(file):
                continue
            os.chmod(file, 0o666 & ~mask)
            fsync_path(file)
        for name in dirnames:
            fsync_path(os.path.join(dirpath, name))
    fsync_path(root)


def umask() -> int:
    """The process umask, read without changing it where ``/proc`` says it (``os.umask`` sets it to read it)."""
    try:  # thread-safe where /proc has it
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_path(path: str) -> None:
    """Flush a file or a directory (a rename is durable once its directory is) to disk; best effort."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def pid_alive(pid) -> bool:
    """Does ``pid`` (an int read from a file) name a live process on this host?"""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def process_start(pid: int) -> str | None:
    """When ``pid`` started, in clock ticks since boot (Linux ``/proc``), or ``None`` where unknown: a lock that
    records it tells a reused pid from its owner."""
    try:
        with open(f"/proc/{int(pid)}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]  # field 22, counted after the command name
    except (OSError, IndexError, ValueError):
        return None

