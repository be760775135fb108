# diffusers-flash: durable writes, shared by saving (loading/safe_loading.py), the fast path's compile cache
# (fastpath/engine.py) and examples/generate.py.
"""Files that matter are written to a temporary name in the same folder, flushed to disk and renamed: a kill
leaves the old file or the new one, never a part."""
from __future__ import annotations

import os
import tempfile


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


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder: fsync, rename, fsync the folder.
    The temporary file is removed if anything fails."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_path(folder)
