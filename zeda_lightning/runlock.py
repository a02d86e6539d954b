"""One run per output directory: a lock file naming its owner (pid, host, command), stale locks detected.

Two runs writing the same checkpoints or export replace each other's work silently. The launching process takes a
lock beside each output directory before anything is written (``.<name>.zeda-lock``, created with ``O_EXCL``) and
drops it at exit. A lock whose pid is gone on this host is stale (a SIGKILLed run) and is taken over; a lock held
by a live process, or by another host, is refused with its owner named.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import sys
import time

from zeda_lightning.fsio import pid_alive


def lock_path(directory: str) -> str:
    directory = os.path.abspath(directory)
    return os.path.join(os.path.dirname(directory), f".{os.path.basename(directory)}.zeda-lock")


def _owner(path: str) -> dict | None:
    try:
        with open(path) as f:
            owner = json.load(f)
        return owner if isinstance(owner, dict) else {}
    except (OSError, ValueError):
        return {}


def _is_stale(owner: dict) -> bool:
    pid = owner.get("pid")
    return owner.get("host") == socket.gethostname() and isinstance(pid, int) and not pid_alive(pid)


class RunLock:
    """Locks beside a set of output directories, held by this process until :meth:`release` (or exit)."""

    def __init__(self) -> None:
        self.held: list[str] = []

    def acquire(self, directories: list[str]) -> "RunLock":
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "command": " ".join(sys.argv)[:500]}
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
            if _is_stale(owner):
                os.remove(path)
                continue
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
