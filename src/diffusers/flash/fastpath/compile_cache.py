# diffusers-flash: the fast path's portable compile cache (enable_fast_path(compile=True, cache=path)): the
# file format, the checks made before torch sees a file, and the per-user key that signs what this user wrote.
"""torch.compile's work in one portable file, so that a new machine warms up like a second process.

Loading a compile cache runs code from it (torch's artifacts contain pickles, unpickled when they are loaded
and when a compile finds them), so use only files you wrote or trust like code. What this module loads:

- a regular file (not a symbolic link), owned by the user running Python and not writable by group or others,
  in a folder that others cannot write unless it has the sticky bit (as /tmp has). A symbolic link, or a file
  in such a folder, is neither loaded nor replaced; a file of another user, or one others can write, is not
  loaded and is replaced by this user's own after the next compile.
- signed with this user's key: an HMAC-SHA256 over the header and torch's artifacts, with a 32-byte random
  key kept in ``$XDG_CACHE_HOME/diffusers-flash/cache-key`` (``~/.cache/...`` by default; created on first
  use, mode 0600; refused if it is a symbolic link, not the user's, or readable by others). A file written
  by another user or machine is loaded only where the user has said they trust it: ``trust=True`` (that
  path), ``trust="<sha256 of the file>"`` (that exact file), or a copy of the writer's key file. A checksum
  inside the file would prove nothing: whoever writes the file writes the checksum.
- whose artifacts all name a place inside torch's cache folders: every key is checked (no absolute path, no
  ``..``, no separator where torch joins the key as one name) before anything is handed to torch.

Anything else is logged in one line and the process compiles as if there were no file; a file that failed
only for what it holds (damaged, another torch, another key) is replaced after the next compile.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import re
import secrets
import stat
import tempfile
import zlib
from typing import Any

import torch

from diffusers.flash import fsio
from diffusers.flash.fastpath import precompile
from diffusers.utils import logging

logger = logging.get_logger(__name__)

CACHE_MAGIC = b"diffusers-flash compile cache 2\n"
UNSIGNED_MAGIC = b"diffusers-flash compile cache 1\n"  # the format before files were signed
KEY_BYTES = 32
TORCH_FORMAT = 1  # the version of torch.compiler.save_cache_artifacts' byte format that ``artifact_keys`` reads
# an artifact key that torch joins to its cache folder as one name: no separator, not "." or ".."
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,254}")
_PGO_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:\-]{0,254}")  # torch turns ':' into '_' for the file name
# the artifact types torch (2.13) writes, and how many path components their keys may have below its folder
_KEY_PARTS = {"inductor": 1, "aot_autograd": 1, "precompile": 1, "pgo": 1, "autotune": 3}


class Refused(ValueError):
    """Why a cache file is not loaded, in one line. ``blocks``: the file is not written either (its place is
    unsafe: a symbolic link, a folder others can write; or this user's key cannot be used)."""

    def __init__(self, why: str, blocks: bool = False) -> None:
        super().__init__(why)
        self.blocks = blocks


def _reason(e: Exception) -> str:
    """An exception as one line for the log: its type and the first line of its message."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


# ------------------------------------------------------------------ the per-user key
def key_path() -> str:
    """Where this user's cache key is kept: ``$XDG_CACHE_HOME/diffusers-flash/cache-key`` (an XDG_CACHE_HOME
    that is unset or relative means ``~/.cache``, as the XDG spec says)."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):
        base = os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "diffusers-flash", "cache-key")


def _posix() -> bool:
    return hasattr(os, "geteuid")


def _open_checked(path: str, what: str, private: bool) -> tuple[int, os.stat_result]:
    """``path`` opened for reading without following a symbolic link, and its status; Refused where it is not
    a regular file of this user's, or where others may write it (``private``: or read it)."""
    try:
        if stat.S_ISLNK(os.lstat(path).st_mode):
            raise Refused(f"{what} {path} is a symbolic link", blocks=True)
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise Refused(f"{what} {path} cannot be opened ({_reason(e)})", blocks=True) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Refused(f"{what} {path} is not a regular file", blocks=True)
        if _posix():
            if st.st_uid != os.geteuid():
                raise Refused(f"{what} {path} is owned by uid {st.st_uid}, not by you (uid {os.geteuid()})")
            bad = 0o077 if private else 0o022
            if st.st_mode & bad:
                others = "readable or writable by group or others" if private else "writable by group or others"
                raise Refused(f"{what} {path} is {others} (mode {stat.S_IMODE(st.st_mode):o})")
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def _read_key(path: str) -> bytes:
    try:
        fd, _ = _open_checked(path, "the cache key", private=True)
    except Refused as e:
        raise Refused(str(e), blocks=True) from None
    with os.fdopen(fd, "rb") as f:
        text = f.read(4 * KEY_BYTES).strip()
    try:
        key = bytes.fromhex(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        key = b""
    if len(key) != KEY_BYTES:
        raise Refused(f"the cache key {path} is damaged (not {2 * KEY_BYTES} hex digits): delete it, and the "
                      f"files signed with it are written again", blocks=True)
    return key


def _create_key(path: str) -> None:
    """A new random key at ``path``, mode 0600, in a folder only this user can enter: written to a temporary
    name and linked into place, so that two processes starting at once end up with one key (the first)."""
    folder = os.path.dirname(path)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".cache-key.", suffix=".tmp")  # mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_hex(KEY_BYTES).encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:  # another process made one first: that one is the key
            pass
    finally:
        os.remove(tmp)
    fsio.fsync_path(folder)


def user_key() -> bytes:
    """This user's cache key, created on first use; Refused (why, in one line) where it cannot be used."""
    path = key_path()
    try:
        return _read_key(path)
    except FileNotFoundError:
        pass
    try:
        _create_key(path)
        return _read_key(path)
    except OSError as e:
        raise Refused(f"no cache key at {path} and none can be made there ({_reason(e)})", blocks=True) from None


# ------------------------------------------------------------------ torch's artifacts, read without torch
def _entries(payload: bytes) -> list[tuple[str, list[tuple[str, bytes]]]]:
    """torch.compiler.save_cache_artifacts' bytes as (type, [(key, encoded key and content)]) entries, read
    without handing anything to torch (its format: a crc32 of the rest, a version, then entries of a type's
    name, a count and (key, content) pairs, each a length and its bytes, names base64). Refused where it cannot
    be read or a key would name a place outside torch's cache folders."""
    at = 0

    def take(n: int) -> bytes:
        nonlocal at
        if n < 0 or at + n > len(payload):
            raise Refused("its artifacts are cut short or not in torch's format")
        at += n
        return payload[at - n:at]

    def number() -> int:
        return int.from_bytes(take(8), "big")

    def text() -> str:
        try:
            return base64.b64decode(take(number()), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise Refused("its artifacts are not in torch's format (a name is not base64 text)") from None

    crc = take(4)
    if zlib.crc32(payload[4:]).to_bytes(4, "big") != crc:
        raise Refused("damaged: its artifacts' checksum does not match")
    version = number()
    if version != TORCH_FORMAT:
        raise Refused(f"its artifacts are in torch's format {version}, which this version cannot check")
    out: list[tuple[str, list[tuple[str, bytes]]]] = []
    while at < len(payload):
        kind = text()
        if kind not in _KEY_PARTS:
            raise Refused(f"it holds artifacts of a type this version cannot check ({kind[:40]!r})")
        items = []
        for _ in range(number()):
            begin = at
            key = text()
            take(number())  # the content: torch's, opaque here
            _check_key(kind, key)
            items.append((key, payload[begin:at]))
        out.append((kind, items))
    return out


def _by_kind(entries: list[tuple[str, list[tuple[str, bytes]]]]) -> dict[str, list[tuple[str, bytes]]]:
    out: dict[str, list[tuple[str, bytes]]] = {}
    for kind, items in entries:
        out.setdefault(kind, []).extend(items)
    return out


def _keys(kinds: dict[str, list[tuple[str, bytes]]]) -> dict[str, list[str]]:
    return {kind: [key for key, _ in items] for kind, items in kinds.items()}


def artifact_keys(payload: bytes) -> dict[str, list[str]]:
    """The artifact keys in torch.compiler.save_cache_artifacts' bytes, by type (see ``_entries``)."""
    return _keys(_by_kind(_entries(payload)))


def _merge(kinds: dict[str, list[tuple[str, bytes]]]) -> bytes:
    """torch's format again, from ``_by_kind``'s entries: one entry per artifact type."""
    body = bytearray(TORCH_FORMAT.to_bytes(8, "big"))
    for kind, items in kinds.items():
        name = base64.b64encode(kind.encode("utf-8"))
        body += len(name).to_bytes(8, "big") + name + len(items).to_bytes(8, "big")
        body += b"".join(raw for _, raw in items)
    return zlib.crc32(body).to_bytes(4, "big") + bytes(body)


def merged(payload: bytes) -> bytes:
    """``payload`` with one entry per artifact type. torch.compiler.save_cache_artifacts, called after each
    compile, appends an entry per type each time, and load_cache_artifacts keeps only the last entry of each
    type (it reads them into a dict): the UNet's compiled graph, saved before the VAE decoder's, was dropped on
    loading. Merged, every artifact is loaded; a payload with one entry per type comes back as it was."""
    return _merge(_by_kind(_entries(payload)))


def _check_key(kind: str, key: str) -> None:
    """Refused where torch, joining ``key`` to its cache folder, would reach outside it."""
    name = _PGO_NAME if kind == "pgo" else _NAME
    parts = key.split("/")
    if not (1 <= len(parts) <= _KEY_PARTS[kind] and all(name.fullmatch(p) for p in parts)):
        raise Refused(f"its {kind} artifact {key[:80]!r} names a place outside torch's cache folders "
                      f"(an absolute path, '..' or a character torch does not write): nothing is loaded")


# ------------------------------------------------------------------ the file
def _header_bytes(header: dict) -> bytes:
    return json.dumps({k: v for k, v in header.items() if k != "hmac_sha256"}, sort_keys=True).encode()


def _mac(key: bytes, header: dict, payload: bytes) -> str:
    return hmac.new(key, CACHE_MAGIC + _header_bytes(header) + b"\n" + payload, hashlib.sha256).hexdigest()


def _umask() -> int:
    """The process's umask, read without changing it (Linux: /proc); 0o022 where it cannot be read."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def file_mode() -> int:
    """The cache file's mode: as the umask allows, but never writable by group or others (it would be
    refused)."""
    return 0o666 & ~_umask() & ~0o022


def _artifact_set(info: Any) -> set:
    return {(kind, key) for kind, keys in info.artifacts.items() for key in keys}


class CompileCache:
    """torch.compile's work in one portable file (``enable_fast_path(cache=path)``), so that a new machine
    or an empty inductor cache warms up like a second process: ``load()`` before compiling hands the file's
    artifacts to torch (``torch.compiler.load_cache_artifacts``); ``update()``, after each compile, writes
    the file (``torch.compiler.save_cache_artifacts``: what this process compiled or read from a cache)
    where this process has artifacts the file lacks: absent, damaged, another torch, or new shapes. Written
    atomically, signed with this user's key, mode as the umask allows but never writable by others.

    Loading a compile cache runs code from it (torch's artifacts contain pickles), so use only files you
    wrote or trust like code. A file is loaded only where it passes the module's checks (owner, mode, folder,
    this user's signature, artifact keys inside torch's cache folders); ``trust=True`` loads the file at
    ``path`` without the signature check, ``trust="<sha256>"`` only a file with that sha256 (as
    ``sha256sum`` prints it); the other checks stay."""

    def __init__(self, path: str | os.PathLike, trust: bool | str = False) -> None:
        if not isinstance(path, (str, os.PathLike)):
            raise ValueError(f"cache must be a file path, not {path!r}")
        if not (trust is True or trust is False
                or (isinstance(trust, str) and re.fullmatch(r"[0-9a-f]{64}", trust.strip().lower()))):
            raise ValueError(f"trust_cache must be False, True or the file's sha256 (64 hex digits), not {trust!r}")
        self.path = os.fspath(path)
        self.trust = trust.strip().lower() if isinstance(trust, str) else trust
        self.keys = set()  # the artifacts the file holds, as loaded or last written
        self.loaded, self.problem, self.written = False, None, 0
        self.blocked = None  # why the file is neither loaded nor written (its place), if so
        self.missed = []  # "kind key" of what this process compiled that the loaded file did not hold
        # precompile.py's entries: key -> {"data": the compiled function's bytes, "modules": names it reaches}
        self.precompiled: dict[str, dict] = {}
        self._precompiled_changed = False
        self.ahead = {"loaded": 0, "compiled": 0, "problems": []}  # precompile.py's record, for cache_status

    def load(self) -> bool:
        """Hand the file's compiled artifacts to torch; False (and the reason logged) where it cannot."""
        try:
            data = self._read()
            if data is None:
                logger.info(f"fast path: no compile cache at {self.path} yet: written after the first compile")
                return False
            header, payload = self._verify(data)
            try:
                artifacts, precompiled = precompile.split(header, payload)
            except ValueError as e:
                raise Refused(str(e)) from None
            entries = _by_kind(_entries(artifacts))  # read once: checked here, merged for torch
            kinds = _keys(entries)
            info = torch.compiler.load_cache_artifacts(_merge(entries)) if entries else None
            if entries and info is None:
                raise Refused("torch could not read its artifacts (its log says why)")
        except Refused as e:
            self.problem = str(e)
            if e.blocks:
                self.blocked = self.problem
        except Exception as e:  # torch's own failure to read what passed the checks
            self.problem = _reason(e)
        if self.problem is not None:
            then = ("it is not written either" if self.blocked else
                    "the file is written again after the first compile")
            logger.warning(f"fast path: the compile cache {self.path} is not used ({self.problem}): compiling as "
                           f"usual, and {then}")
            return False
        self.keys, self.loaded, self.precompiled = _artifact_set(info) if info else set(), True, precompiled
        trusted = " (on trust_cache's word)" if self._trusted(data) else ""
        ahead = f" and {len(precompiled)} precompiled models" if precompiled else ""
        logger.info(f"fast path: loaded {sum(map(len, kinds.values()))} compiled artifacts{ahead} from "
                    f"{self.path}{trusted}")
        return True

    def add_precompiled(self, key: str, data: bytes, modules: dict[str, str]) -> None:
        """A model compiled ahead of time (precompile.py), written with the next ``update()``."""
        self.precompiled[key] = {"data": data, "modules": dict(modules)}
        self._precompiled_changed = True

    def drop_precompiled(self, key: str) -> None:
        """An entry that did not serve: left out of the file from the next ``update()`` on."""
        if self.precompiled.pop(key, None) is not None:
            self._precompiled_changed = True

    def _place(self) -> None:
        """Refused where the file's folder can be written by others without the sticky bit (they could put
        their file in its place)."""
        folder = os.path.dirname(os.path.abspath(self.path))
        try:
            mode = os.stat(folder).st_mode
        except OSError:
            return  # no folder: nothing to read, and writing reports why
        if _posix() and mode & 0o022 and not mode & stat.S_ISVTX:
            raise Refused(f"its folder {folder} is writable by group or others without the sticky bit (mode "
                          f"{stat.S_IMODE(mode):o}): keep the file in a folder only you can write", blocks=True)

    def _read(self) -> bytes | None:
        self._place()
        try:
            fd, _ = _open_checked(self.path, "the file", private=False)
        except FileNotFoundError:
            return None
        with os.fdopen(fd, "rb") as f:
            return f.read()

    def _trusted(self, data: bytes) -> bool:
        return self.trust is True or (isinstance(self.trust, str) and hashlib.sha256(data).hexdigest() == self.trust)

    def _verify(self, data: bytes) -> tuple[dict, bytes]:
        """The header and payload of a file this user wrote (or said to trust); Refused, with why, otherwise."""
        if data.startswith(UNSIGNED_MAGIC):
            raise Refused("an unsigned file of an earlier diffusers-flash: not trusted")
        if not data.startswith(CACHE_MAGIC):
            raise Refused("not a diffusers-flash compile cache file")
        head, newline, payload = data[len(CACHE_MAGIC):].partition(b"\n")
        try:
            header = json.loads(head)
        except ValueError:
            header = None
        if not newline or not isinstance(header, dict):
            raise Refused("damaged: its header cannot be read")
        if len(payload) != header.get("size") or hashlib.sha256(payload).hexdigest() != header.get("sha256"):
            raise Refused(f"damaged: {len(payload)} bytes whose checksum does not match its header's")
        if not self._trusted(data):
            mac = header.get("hmac_sha256")
            if not (isinstance(mac, str) and mac.isascii()
                    and hmac.compare_digest(mac, _mac(user_key(), header, payload))):
                if isinstance(self.trust, str):
                    raise Refused(f"not written with your key, and its sha256 {hashlib.sha256(data).hexdigest()} "
                                  f"is not the one trust_cache names")
                raise Refused(f"not written with your key (another user's or machine's file, or a planted one; "
                              f"loading it would run code from it): if you trust it like code, pass "
                              f"trust_cache=True, or copy the writer's {key_path()}")
        if header.get("torch") != torch.__version__:
            raise Refused(f"written by torch {header.get('torch')}, this is torch {torch.__version__}")
        return header, payload

    def update(self) -> None:
        """After a call that may have compiled: write the file if this process has artifacts it lacks."""
        if self.blocked:
            return
        try:
            got = torch.compiler.save_cache_artifacts()
        except Exception as e:
            logger.warning(f"fast path: the compile cache {self.path} is not written ({_reason(e)})")
            return
        new_artifacts = got is not None and not _artifact_set(got[1]) <= self.keys
        if not new_artifacts and not self._precompiled_changed:
            return
        try:
            artifacts, keys = (merged(got[0]), _artifact_set(got[1])) if got is not None else (_merge({}), set())
        except Refused as e:  # torch wrote a format this version cannot read: not written
            logger.warning(f"fast path: the compile cache {self.path} is not written ({e})")
            return
        data, entries = precompile.join(artifacts, self.precompiled)
        try:
            self._place()
            if os.path.islink(self.path):
                raise Refused(f"{self.path} is a symbolic link", blocks=True)
            header = {"torch": torch.__version__, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            if entries:
                header.update(artifacts=len(artifacts), precompiled=entries)
            header["hmac_sha256"] = _mac(user_key(), header, data)
            fsio.atomic_write(self.path, CACHE_MAGIC + json.dumps(header).encode() + b"\n" + data)
            self._set_mode()
        except (OSError, Refused) as e:
            why = str(e) if isinstance(e, Refused) else _reason(e)
            if isinstance(e, Refused) and e.blocks:
                self.blocked = why
            logger.warning(f"fast path: the compile cache {self.path} is not written ({why})")
            return
        dropped, new = len(self.keys - keys), sorted(keys - self.keys)
        self._precompiled_changed = False
        if self.loaded and not self.written and new_artifacts:  # the file was used, yet compiles here missed it
            self.missed = [" ".join(k) for k in new]
            logger.warning(f"fast path: {len(new)} compiled artifacts of this process are not in the loaded "
                           f"file {self.path} (its compiles missed it: {', '.join(map(' '.join, new[:4]))}"
                           f"{', ...' if len(new) > 4 else ''}); TORCH_LOGS=+torch._inductor.codecache logs what "
                           f"each key is made of, to compare with the process that wrote the file")
        self.keys, self.written = keys, self.written + 1
        ahead = f" and {len(entries)} precompiled models" if entries else ""
        logger.info(f"fast path: wrote {len(keys)} compiled artifacts{ahead} ({len(data) / 2**20:.1f} MiB) to "
                    f"{self.path}"
                    + (f"; {dropped} of the earlier file's, not used in this process, are not kept" if dropped else ""))

    def _set_mode(self) -> None:
        """The file just written, to ``file_mode()`` (through a descriptor: no symbolic link is followed)."""
        if not _posix():
            return
        fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        try:
            if os.fstat(fd).st_uid == os.geteuid():
                os.fchmod(fd, file_mode())
        finally:
            os.close(fd)


def cache_status(pipe: Any) -> dict | None:
    """The compile cache of ``enable(cache=...)``: its path, whether it was loaded, why not, times written,
    the artifacts compiled here that a loaded file did not hold, and the denoisers loaded precompiled from it
    or compiled ahead into it (precompile.py), with why not where neither."""
    store = getattr(pipe, "__dict__", {}).get("_fast_path_cache")
    if store is None:
        return None
    return {"path": store.path, "loaded": store.loaded, "problem": store.problem, "written": store.written,
            "missed": list(store.missed), "precompiled": dict(store.ahead, problems=list(store.ahead["problems"]))}
