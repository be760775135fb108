"""The fast path's portable compile cache (``enable_fast_path(compile=True, cache=path)``): what it writes is
what it loads, and a file it did not write (or that others could have changed) runs nothing and writes
nothing outside torch's cache folders: each attack of issue 32 is built by hand here in the format the
cache writes, with torch's own artifact format inside."""
import base64
import hashlib
import hmac
import json
import os
import pickle
import stat
import types
import zlib

import pytest
import torch

from diffusers.flash.fastpath import engine as fast_path


def _bytes(data: bytes) -> bytes:
    return len(data).to_bytes(8, "big") + data


def _text(text: str) -> bytes:
    return _bytes(base64.b64encode(text.encode()))


def torch_payload(artifacts: dict) -> bytes:
    """torch.compiler.save_cache_artifacts' format, by hand: a crc32 of the rest, format version 1, then per
    artifact type its name, a count and (key, content) pairs."""
    body = (1).to_bytes(8, "big")
    for kind, items in artifacts.items():
        body += _text(kind) + len(items).to_bytes(8, "big")
        for key, content in items:
            body += _text(key) + _bytes(content)
    return zlib.crc32(body).to_bytes(4, "big") + body


def planted_file(payload: bytes, mac_key: bytes = b"not the user's key") -> bytes:
    """A cache file as someone without this user's key can write one: the header's checksum is right (the
    writer computes it), its MAC is one made with another key."""
    header = {"torch": torch.__version__, "size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    header["hmac_sha256"] = hmac.new(mac_key, payload, hashlib.sha256).hexdigest()
    return fast_path.CACHE_MAGIC + json.dumps(header).encode() + b"\n" + payload


class _RunsCode:
    """Unpickled, creates the folder ``path``: the stand-in for any code an attacker's pickle would run."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.makedirs, (self.path,)


@pytest.fixture
def home(tmp_path, monkeypatch):
    """Empty inductor cache and per-user key folder for each test; the cache file goes in ``work``."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    (tmp_path / "work").mkdir(mode=0o755)
    os.chmod(tmp_path / "work", 0o755)
    return tmp_path


def _load(store, caplog):
    with caplog.at_level("WARNING", logger="diffusers"):
        return store.load()


def _refused(store, caplog, why, loaded=None):
    if loaded is None:
        loaded = _load(store, caplog)
    assert loaded is False
    assert store.problem and why in store.problem, store.problem
    said = [r.getMessage() for r in caplog.records if str(store.path) in r.getMessage()]
    assert said and all("\n" not in s for s in said), said  # one line, no traceback
    assert "Traceback" not in caplog.text


# ------------------------------------------------------------------ issue 32, defect 1: the attacks
def test_a_planted_pickle_does_not_run_when_the_cache_is_loaded(home, caplog):
    marker = home / "pickle-ran"
    path = home / "work" / "compiled.bin"
    path.write_bytes(planted_file(torch_payload({"inductor": [("fabc", pickle.dumps(_RunsCode(marker)))]})))
    os.chmod(path, 0o644)
    store = fast_path.CompileCache(path)
    loaded = _load(store, caplog)
    assert not marker.exists(), "loading the cache file ran the pickle in it"
    _refused(store, caplog, "not written with your key", loaded)


@pytest.mark.parametrize("escape", ["absolute", "dotdot"])
def test_a_planted_autotune_artifact_writes_nothing_outside_the_cache(home, caplog, escape):
    target = home / "outside" / "planted.pth"
    key = str(target) if escape == "absolute" else os.path.join("..", "outside", "planted.pth")
    path = home / "work" / "compiled.bin"
    path.write_bytes(planted_file(torch_payload({"autotune": [(key, b'{"import os": 1}')]})))
    os.chmod(path, 0o644)
    store = fast_path.CompileCache(path)
    loaded = _load(store, caplog)
    assert not target.exists(), "loading the cache file wrote outside torch's cache folder"
    _refused(store, caplog, "not written with your key", loaded)


def test_a_file_of_another_user_is_refused(home, caplog, monkeypatch):
    path = home / "work" / "compiled.bin"
    _genuine(path)
    uid = os.geteuid()
    monkeypatch.setattr(os, "geteuid", lambda: uid + 1)  # the file is now someone else's
    _refused(fast_path.CompileCache(path), caplog, "owned by uid")


@pytest.mark.parametrize("mode", [0o664, 0o646])
def test_a_file_others_can_write_is_refused(home, caplog, mode):
    path = home / "work" / "compiled.bin"
    _genuine(path)
    os.chmod(path, mode)
    _refused(fast_path.CompileCache(path), caplog, "writable by")


def test_a_file_in_a_folder_others_can_write_is_refused_unless_sticky(home, caplog):
    path = home / "work" / "compiled.bin"
    _genuine(path)
    os.chmod(home / "work", 0o777)
    try:
        _refused(fast_path.CompileCache(path), caplog, "folder")
        os.chmod(home / "work", 0o1777)  # sticky, as /tmp: others cannot replace this user's file
        assert fast_path.CompileCache(path).load() is True
    finally:
        os.chmod(home / "work", 0o755)


def test_a_symlink_is_refused(home, caplog):
    real = home / "work" / "real.bin"
    _genuine(real)
    link = home / "work" / "compiled.bin"
    link.symlink_to(real)
    _refused(fast_path.CompileCache(link), caplog, "symbolic link")


# ------------------------------------------------------------------ what this user writes, it loads
def _genuine(path, artifacts=None):
    """A cache file written by this user through CompileCache, holding an AOTAutograd artifact (torch writes it
    into its cache folder at load, unpickling nothing)."""
    artifacts = artifacts or {"aot_autograd": [("aabc", b"compiled")]}
    payload = torch_payload(artifacts)
    info = types.SimpleNamespace(artifacts={k: [key for key, _ in v] for k, v in artifacts.items()})
    real = torch.compiler.save_cache_artifacts
    torch.compiler.save_cache_artifacts = lambda: (payload, info)
    try:
        store = fast_path.CompileCache(path)
        store.update()
    finally:
        torch.compiler.save_cache_artifacts = real
    assert store.written == 1
    return payload
