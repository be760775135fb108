# diffusers-flash: durable writes, shared by saving (loading/safe_loading.py), the fast path's compile cache
# (fastpath/engine.py) and examples/generate.py.
"""Files that matter are written to a temporary name in the same folder, flushed to disk and renamed: a kill
leaves the old file or the new one, never a part.

Temporary names are unpredictable (``tempfile.mkstemp``: created with ``O_EXCL``, so a symlink planted at the
name is never followed) and carry the writer's process id, ``.NAME.PID.RANDOM.tmp``, so that a later process
removes only those whose writer is dead (:func:`stale_temporary`). New files get the mode ``open()`` gives,
``0o666`` less the umask, unless the caller asks for another (``mode=0o600`` for a file only its owner may
read)."""
from __future__ import annotations

import os
import re
import tempfile

_TMP_NAME = re.compile(r"\.(?P<pid>[0-9]+)(\.[A-Za-z0-9_]+)?\.tmp\Z")


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file, or a folder's entries (which makes a rename in it durable), to disk; a no-op where the
    platform cannot open or sync it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # a folder cannot be opened on some platforms
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def umask() -> int:
    """This process's umask, read without changing it where the platform says it (Linux: /proc/self/status);
    elsewhere set and restored at once."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: 0o666 less the umask."""
    return 0o666 & ~umask()


def temporary_name(path: str | os.PathLike) -> str:
    """The prefix of ``path``'s temporary names in its folder: ``.NAME.PID.`` (mkstemp adds a random part)."""
    return f".{os.path.basename(os.fspath(path))}.{os.getpid()}."


def stale_temporary(name: str) -> bool:
    """True for a temporary file name (``.NAME.PID[.RANDOM].tmp``) whose writer, process PID on this machine,
    is no longer running: only those may be removed. A name without a pid, or whose process lives, is kept."""
    m = _TMP_NAME.search(name)
    if not name.startswith(".") or m is None:
        return False
    return not pid_alive(int(m.group("pid")))


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` on this machine may still be running: this process, a live one, or one we
    cannot ask about (another user's, a number out of range) all count as alive; only a gone pid does not."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OverflowError, OSError):
        return True
    return True


def atomic_write(path: str | os.PathLike, data: bytes, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder: fsync, rename, fsync the folder.
    The temporary file is removed if anything fails. ``mode``: the new file's permission bits (default: 0o666
    less the umask, as ``open()`` gives). A symlink at ``path`` is replaced, never followed."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=temporary_name(path), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), default_mode() if mode is None else mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.remove(tmp)
        raise
    fsync_path(folder)
