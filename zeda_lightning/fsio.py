"""File-system helpers shared by exports, checkpoints and run locks: the process umask, durable fsyncs, and
whether a pid still runs. Plain ``os`` only, importable from every layer."""

from __future__ import annotations

import os


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
