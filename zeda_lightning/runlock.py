"""One run per output directory: a lock file naming its owner (pid, host, command), stale locks detected.

Two runs writing the same checkpoints or export replace each other's work silently. The launching process takes a
lock beside each output directory before anything is written (``.<name>.zeda-lock``, created with ``O_EXCL``) and
drops it at exit. A lock whose pid is gone on this host (a SIGKILLed run), whose pid now names another process (its
start time differs) or that was left empty (killed while creating it) is stale and taken over; a lock held by a
live process, or by another host, is refused with its owner named.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import sys
import time

from zeda_lightning.fsio import pid_alive, process_start


def lock_path(directory: str) -> str:
    directory = os.path.abspath(directory)
    return os.path.join(os.path.dirname(directory), f".{os.path.basename(directory)}.zeda-lock")


#: how long a lock file may stay unreadable (a run killed between creating it and writing its owner) before it
#: is taken for stale
UNREADABLE_GRACE_S = 10.0


def _owner(path: str) -> dict | None:
    """The owner a lock names; ``None`` if the file is gone, ``{}`` if it says nothing readable."""
    try:
        with open(path) as f:
            owner = json.load(f)
        return owner if isinstance(owner, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def _is_stale(owner: dict, path: str) -> bool:
    """A lock of a dead process on this host, of a live process that reused its pid, or one left unreadable."""
    if not owner:
        try:
            return time.time() - os.path.getmtime(path) > UNREADABLE_GRACE_S
        except FileNotFoundError:
            return False
    pid = owner.get("pid")
    if owner.get("host") != socket.gethostname() or not isinstance(pid, int):
        return False
    if not pid_alive(pid):
        return True
    recorded, live = owner.get("proc_start"), process_start(pid)
    return recorded is not None and live is not None and recorded != live


class RunLock:
    """Locks beside a set of output directories, held by this process until :meth:`release` (or exit)."""

    def __init__(self) -> None:
        self.held: list[str] = []

    def acquire(self, directories: list[str]) -> "RunLock":
        me = {"pid": os.getpid(), "host": socket.gethostname(), "proc_start": process_start(os.getpid()),
              "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "command": " ".join(sys.argv)[:500]}
        try:
            for d in dict.fromkeys(os.path.abspath(d) for d in directories):
                self._take(lock_path(d), d, me)
        except BaseException:
            self.release()
            raise
        atexit.register(self.release)
        return self

    def _take(self, path: str, directory: str, me: dict) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        for _ in range(2):
            fd = self._create(path)
            if fd is not None:
                with os.fdopen(fd, "w") as f:
                    json.dump(me, f)
                self.held.append(path)
                return
            owner = _owner(path)
            if owner is None:  # vanished between the two calls: try again
                continue
            if owner.get("pid") == me["pid"] and owner.get("host") == me["host"]:
                return  # this process already holds it (fit then test in one session)
            if _is_stale(owner, path):
                os.remove(path)
                continue
            if not owner:
                raise ValueError(f"{directory} is being taken by another run starting now (its lock {path} is not "
                                 f"written yet); retry in {UNREADABLE_GRACE_S:.0f} s")
            raise ValueError(
                f"{directory} is in use by another run (pid {owner.get('pid')} on {owner.get('host')}, started "
                f"{owner.get('started')}: {owner.get('command')!r}); wait for it, choose other output paths, or "
                f"if that run is dead on another host, delete {path}")
        raise ValueError(f"could not take the lock {path}; retry")

    @staticmethod
    def _create(path: str) -> int | None:
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return None

    def release(self) -> None:
        for path in self.held:
            owner = _owner(path)
            if owner and owner.get("pid") == os.getpid():
                try:
                    os.remove(path)
                except OSError:
                    pass
        self.held = []


def launching_process() -> bool:
    """True in the process that starts a run: not a rank that Lightning or torchrun launched for it."""
    for var in ("RANK", "LOCAL_RANK", "NODE_RANK"):
        value = os.environ.get(var)
        if value not in (None, "", "0"):
            return False
    return True
