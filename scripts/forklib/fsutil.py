"""What the fork tool writes and which paths it accepts.

- Paths: every file a patch, a release file or the manifest names must lie inside ``src/diffusers/``
  (no ``..``, no absolute path, no backslash or control character, no symlink leading out); patch names
  are plain file names inside ``patches/``.
- Writes: each file is written to a temporary name in its own folder and renamed into place
  (``os.replace``), so a kill leaves the old file or the new one, never half of one; state files are
  fsynced before the rename.
- One command at a time: the commands that write hold ``.fork.lock`` at the project root
  (``fcntl.flock``, released by the kernel when the holder dies); a second one waits briefly, then
  refuses, naming the first. The lock is opened with ``O_NOFOLLOW`` and must be a regular file of one
  link: a planted symlink or hard link there is refused, never written through.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import stat
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

PREFIX = "src/diffusers/"  # where the package's files live, in the tree and in every patch
LOCK_FILE = ".fork.lock"
LOCK_WAIT_ENV = "DIFFUSERS_FLASH_LOCK_WAIT"  # seconds a second command waits for the lock (default 2)
PATCH_NAME = re.compile(r"^\d{4}-[a-z0-9][a-z0-9._-]*\.patch$")
_SAFE_CHARS = re.compile(r"^[A-Za-z0-9._+/-]+$")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class ForkError(Exception):
    """Anything the fork tool refuses or cannot do; the message says what and why."""


class Interrupted(ForkError):
    """Ctrl-C: the message says what the command left and how to go on (fork.py exits 130)."""


# ---------------------------------------------------------------- paths
def path_problem(rel: object, under: str = PREFIX) -> str | None:
    """Why ``rel`` (a root-relative path from a patch, a release file or the manifest) is not a plain
    relative path inside ``under``; None when it is."""
    if not isinstance(rel, str) or not rel:
        return "not a path"
    if "\\" in rel or "\0" in rel or any(ord(c) < 32 or ord(c) == 127 for c in rel):
        return "holds a backslash, NUL or control character"
    if rel.startswith("/") or re.match(r"^[A-Za-z]:", rel):
        return "is absolute"
    if any(part in ("", ".", "..") for part in rel.split("/")):
        return "has an empty, '.' or '..' component"
    if not _SAFE_CHARS.match(rel):
        return "holds characters other than letters, digits and ._+-/"
    if under and (not rel.startswith(under) or rel == under):
        return f"is not inside {under}"
    return None


def check_path(rel: object, under: str = PREFIX, what: str = "path") -> str:
    """``rel`` itself when it is a plain relative path inside ``under``; ForkError otherwise."""
    problem = path_problem(rel, under)
    if problem:
        raise ForkError(f"{what} {rel!r} {problem}: refused (every file must lie inside {under or 'the project'})")
    return rel


def confined(root: Path, rel: str, under: str = PREFIX) -> Path:
    """``root/rel`` after checking that it stays inside ``root/under`` also once symlinks are resolved."""
    check_path(rel, under)
    base = Path(root).resolve()
    path = base / rel
    inside = base / under.rstrip("/") if under else base
    resolved = path.resolve()
    if resolved != inside and inside not in resolved.parents:
        raise ForkError(f"{rel} resolves to {resolved}, outside {inside} (a symlink?): refused")
    return path


def check_patch_name(name: object, what: str = "patch name") -> str:
    """A patch name must be a plain file name inside patches/: NNNN-topic.patch."""
    if not isinstance(name, str) or not PATCH_NAME.match(name):
        raise ForkError(f"{what} {name!r} is not of the form NNNN-topic.patch (four digits, a dash, lowercase "
                        "letters, digits, '.', '_' or '-', then .patch): refused")
    return name


def is_sha256(value: object) -> bool:
    return isinstance(value, str) and bool(_SHA256.fullmatch(value))


# ---------------------------------------------------------------- reading
def read_text(path: Path, what: str | None = None) -> str:
    """A file's text as UTF-8; a file that is not UTF-8 is a ForkError naming it."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ForkError(f"{what or path}: not UTF-8 text (byte {e.start}: {data[e.start:e.start + 1]!r})") from None


# ---------------------------------------------------------------- writing
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()
_MODE = 0o666 & ~_UMASK
DIR_MODE = 0o777 & ~_UMASK


def atomic_write(path: Path, data: bytes, durable: bool = False) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it into place; ``durable``:
    fsync the file before the rename and the folder after it (state files)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        mode = _MODE
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        with contextlib.suppress(OSError):
            dfd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)


def write_if_changed(path: Path, data: bytes, durable: bool = False) -> bool:
    """``atomic_write`` unless ``path`` already holds ``data`` (a read-only tree with nothing to change
    stays untouched). True when written."""
    path = Path(path)
    try:
        if path.is_file() and not path.is_symlink() and path.read_bytes() == data:
            return False
    except OSError:
        pass
    atomic_write(path, data, durable)
    return True


# ---------------------------------------------------------------- one command at a time
_held: dict = {}  # resolved project root -> nesting depth, for the locks this process holds


def lock_wait() -> float:
    try:
        return max(0.0, float(os.environ.get(LOCK_WAIT_ENV, "2")))
    except ValueError:
        return 2.0


def _open_lock(path: Path) -> int | None:
    """The lock file, opened for writing: a regular file of one link, never followed through a symlink (a
    planted ``.fork.lock`` link or hard link would make the lock write into its target). None where the project
    folder cannot be written (a read-only checkout): nothing can be written there, so nothing needs the lock."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP or path.is_symlink():
            raise ForkError(f"{path} is a symlink (to {os.readlink(path)}): the lock is never written through one; "
                            "remove it and run again") from None
        if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM) and not path.exists():
            return None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:  # 0 links: its holder removed it as we opened it
        os.close(fd)
        what = "a hard link to another file" if stat.S_ISREG(st.st_mode) else "not a regular file"
        raise ForkError(f"{path} is {what}: the lock is never written into another file; remove it and run again")
    return fd


@contextlib.contextmanager
def locked(root: Path, command: str) -> Iterator[None]:
    """Hold the project's lock (``.fork.lock`` at ``root``) while a command writes. Re-entrant within a
    process. Another process holding it: wait up to DIFFUSERS_FLASH_LOCK_WAIT seconds (2), then ForkError
    naming its pid and command. A holder that dies releases it (flock). A ``.fork.lock`` that is a symlink or
    a hard link is refused (ForkError), never written through. Where the project folder is read-only the
    command runs without the lock: it can write nothing there, and says so at its first write."""
    key = str(Path(root).resolve())
    if key in _held:
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    path = Path(key) / LOCK_FILE
    deadline = time.monotonic() + lock_wait()
    while True:
        fd = _open_lock(path)
        if fd is None:  # read-only: nothing will be written, by this command or (on a read-only mount) any other
            _held[key] = 1
            try:
                yield
            finally:
                _held.pop(key, None)
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode("utf-8", "replace").strip() or "a process that is starting"
            os.close(fd)
            if time.monotonic() >= deadline:
                raise ForkError(f"another fork command is running here ({holder}; lock {path}): wait until it "
                                "finishes, then run this again") from None
            time.sleep(0.05)
            continue
        try:
            now = os.lstat(path)
            same = now.st_ino == os.fstat(fd).st_ino and now.st_dev == os.fstat(fd).st_dev
        except FileNotFoundError:
            same = False
        if same:  # else the holder removed the file as we opened it: take the new one
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}: {command} (started {time.strftime('%H:%M:%S')} by "
                     f"{Path(sys.argv[0]).name or 'python'})\n".encode())
        _held[key] = 1
        yield
    finally:
        _held.pop(key, None)
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)
