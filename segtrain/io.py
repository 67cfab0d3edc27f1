"""Small file helpers: nothing is ever left half-written, and a write that fails says where.

A full or read-only disk (or a missing permission) ends in one ``WriteError`` that names the
path and the system's reason; the temporary file of the failed write is removed first.
"""

from __future__ import annotations

import json
import os
import re
import tempfile

from segtrain.errors import SegtrainError


class WriteError(SegtrainError):
    """A file or directory could not be written; the message names it and says why.

    Attributes:
      path: what could not be written.
      reason: the system's reason ('No space left on device', 'Read-only file system').
    """

    def __init__(self, path: str, reason: str, what: str = ""):
        self.path, self.reason = path, reason
        where = os.path.dirname(os.path.abspath(path)) or "."
        super().__init__(f"Could not write {what + ' ' if what else ''}{path}: {reason}. Nothing was left "
                         f"half-written. Free space in {where} or make it writable, then run the command again.")


def os_reason(error: Exception) -> str:
    """The system's reason in an I/O error ('No space left on device', 'Read-only file
    system'), without TensorFlow's op decorations."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    if isinstance(error, WriteError):
        return error.reason
    text = getattr(error, "message", None) or str(error)
    text = re.sub(r"\s*\[Op:\w+\].*$", "", text.strip(), flags=re.S)
    known = re.search(r"(No space left on device|Read-only file system|Permission denied|Disk quota exceeded)", text)
    if known:
        return known.group(1)
    return text.rsplit(";", 1)[-1].strip() if ";" in text else text.splitlines()[-1].strip()


def atomic_write_text(path: str, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file in the same directory and a rename."""
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Writes ``data`` to ``path`` through a temporary file in the same directory and a rename."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    except OSError as e:
        raise WriteError(path, os_reason(e)) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp makes the file private; give it the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise WriteError(path, os_reason(e)) from None
        raise


def write_json(path: str, data) -> None:
    """``data`` as indented JSON, written atomically."""
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


# ---- this process's temporary files --------------------------------------------------------
_SCRATCH_PREFIX = "segtrain-tmp-"


def use_process_tempdir() -> str:
    """Makes a directory of this process's own the one ``tempfile`` uses, removed at exit.

    TensorFlow's autograph writes a ``__autograph_generated_file*.py`` per converted function to
    the temporary directory and removes them only at a normal exit. A process that ends hard
    (``os._exit`` after a lost cluster peer, SIGKILL) would leave them behind; here they go with
    the directory: at exit, on ``remove_process_tempdir``, or at the next start of any segtrain
    process on this machine once this one no longer runs.

    Returns:
      The directory (``tempfile.tempdir`` from now on).
    """
    import atexit

    base = tempfile.gettempdir()
    remove_orphan_tempdirs(base)
    path = tempfile.mkdtemp(prefix=f"{_SCRATCH_PREFIX}{os.getpid()}-", dir=base)
    tempfile.tempdir = path
    atexit.register(remove_process_tempdir)
    return path


def remove_process_tempdir() -> None:
    """Removes this process's temporary directory (``use_process_tempdir``), if it made one."""
    import shutil

    path = tempfile.tempdir
    if path and os.path.basename(path).startswith(f"{_SCRATCH_PREFIX}{os.getpid()}-"):
        shutil.rmtree(path, ignore_errors=True)
        tempfile.tempdir = os.path.dirname(path)


def remove_orphan_tempdirs(base: str, pattern: str = rf"{_SCRATCH_PREFIX}(\d+)-") -> None:
    """Removes the directories in ``base`` whose names match ``pattern`` (its group: the pid of
    the process that made one) and whose process no longer runs on this machine. By default:
    the temporary directories of segtrain processes that ended."""
    import shutil

    try:
        names = os.listdir(base)
    except OSError:
        return
    for name in names:
        match = re.match(pattern, name)
        if match and not process_running(int(match.group(1))):
            shutil.rmtree(os.path.join(base, name), ignore_errors=True)


def process_running(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (another user's counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
