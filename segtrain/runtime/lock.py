"""One writer per directory: a lock file that names the process holding it.

Two jobs training into one model_dir (a job started twice, or restarted while the first still
runs) would overwrite each other's checkpoints and ``checkpoint`` state file. The writer takes

    <directory>/segtrain.lock    {"pid", "host", "boot_id", "pid_namespace", "start_ticks",
                                  "started", "command"}

for the time it writes, and removes it at the end, on errors too. A process killed with SIGKILL
cannot remove it; the next job takes such a stale lock over, with a note. A lock is stale when
it was taken on this machine (same host, boot and PID namespace) and its process is gone, or its
PID now belongs to a process that started at another time (the PID was reused: the start time
comes from /proc/<pid>/stat). A lock of another machine cannot be checked from here, so it is
honoured until its job removes it, or the user deletes it.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shlex
import socket
import sys
from collections.abc import Iterator
from typing import Self

import tensorflow as tf

from segtrain.errors import SegtrainError
from segtrain.run_dir import LOCK_FILE  # the name is the run directory's
from segtrain.runtime.distribute import is_chief


def _read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def process_start_ticks(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, /proc/<pid>/stat field 22), or None."""
    stat = _read_text(f"/proc/{pid}/stat")
    if not stat:
        return None
    # The command name (field 2) is in parentheses and may hold spaces: split after it.
    return int(stat.rsplit(")", 1)[1].split()[19])


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def this_process() -> dict:
    """The owner record of the calling process."""
    pid = os.getpid()
    return {
        "pid": pid,
        "host": socket.gethostname(),
        "boot_id": _read_text("/proc/sys/kernel/random/boot_id"),
        "pid_namespace": _pid_namespace(),
        "start_ticks": process_start_ticks(pid),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join(sys.argv)[:500],
    }


def is_alive(owner: dict) -> bool | None:
    """Whether the owner's process still runs; None when this machine cannot tell (another
    host, boot or PID namespace)."""
    me = this_process()
    if any(owner.get(k) != me[k] for k in ("host", "boot_id", "pid_namespace")):
        return None
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        pass
    started = process_start_ticks(pid)
    return started is None or owner.get("start_ticks") in (None, started)


def describe(owner: dict, command: bool = True) -> str:
    """'pid 123 on host h, started <time>[: <command line>]'."""
    text = f"pid {owner.get('pid')} on host {owner.get('host')}, started {owner.get('started')}"
    return f"{text}: {owner.get('command')}" if command else text


class DirectoryLock:
    """Holds ``<directory>/segtrain.lock`` while a job writes into ``directory``.

    Use as a context manager; the directory is created if needed.

    Args:
      directory: the directory written.
      job: what the job does, for messages (e.g. 'training').

    Raises (on entry):
      SegtrainError: another live process holds the lock (the message names it), or the
        directory cannot be written (the message gives the system's reason).
    """

    def __init__(self, directory: str, job: str = "training"):
        self.directory, self.job = directory, job
        self.path = os.path.join(directory, LOCK_FILE)
        self.owner: dict | None = None

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        me = this_process()
        text = json.dumps(me, indent=2) + "\n"
        try:
            os.makedirs(self.directory, exist_ok=True)
            for _ in range(5):  # a few rounds: other jobs may take or release it meanwhile
                if self._create(text):
                    self.owner = me
                    return
                held = self._read(self.path)
                if held is None:  # released meanwhile, or not a lock we can read
                    if os.path.exists(self.path):
                        raise SegtrainError(
                            f"{self.directory} has a lock file that cannot be read, {self.path}. If no "
                            f"other job writes into {self.directory}, delete it and start again.")
                    continue
                alive = is_alive(held)
                if alive is not False:
                    self._refuse(held, checkable=alive is not None)
                self._take_over(held)
        except OSError as e:
            raise SegtrainError(
                f"Cannot write in {self.directory} ({e.strerror or e}): the {self.job} job needs a "
                f"writable directory. Use another directory, or free space / fix its permissions."
            ) from None
        raise SegtrainError(f"Could not take the lock {self.path}: other jobs keep taking it. Start one job only.")

    def _create(self, text: str) -> bool:
        """Creates the lock with its whole content at once; False if it exists.

        The content goes to a private file first, and a hard link gives it the lock's name
        (atomic, and fails if the name exists), so a reader never sees a lock half-written.
        Filesystems without hard links get the lock by O_CREAT | O_EXCL instead.
        """
        tmp = os.path.join(self.directory, f".{LOCK_FILE}.{os.getpid()}.tmp")
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:
            return self._create_exclusive(text)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def _create_exclusive(self, text: str) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return True

    @staticmethod
    def _read(path: str) -> dict | None:
        text = _read_text(path)
        try:
            held = json.loads(text) if text else None
        except json.JSONDecodeError:
            return None
        return held if isinstance(held, dict) else None

    def _refuse(self, held: dict, checkable: bool) -> None:
        unknown = "" if checkable else " (this machine cannot tell whether that process still runs)"
        raise SegtrainError(
            f"{self.directory} is in use by another {self.job} job: {describe(held)}{unknown}. Wait for it "
            f"to end or stop it; if it no longer runs, delete {self.path}."
        )

    def _take_over(self, stale: dict) -> None:
        """Removes the lock of a dead process, unless another job replaced it meanwhile."""
        aside = os.path.join(self.directory, f".{LOCK_FILE}.{os.getpid()}.stale.tmp")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        if self._read(aside) != stale:  # a live job's fresh lock: give it back
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)
            os.unlink(aside)
            return
        os.unlink(aside)
        print(f"Took over the lock of {self.directory} from a {self.job} job that no longer runs "
              f"({describe(stale, command=False)}).", flush=True)

    def release(self) -> None:
        """Removes the lock if it is still this process's (nothing else ever removes a live one)."""
        if self.owner is None:
            return
        held = self._read(self.path)
        if held is not None and all(held.get(k) == self.owner[k] for k in ("pid", "host", "start_ticks")):
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        self.owner = None


@contextlib.contextmanager
def run_lock(model_dir: str, strategy: tf.distribute.Strategy) -> Iterator[None]:
    """The lock of a run directory, held by the process that writes it: the chief of a
    cluster, whose other workers write to scratch directories (segtrain.runtime.distribute)."""
    if not is_chief(strategy):
        yield
        return
    with DirectoryLock(model_dir, "training"):
        yield
