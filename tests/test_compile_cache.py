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
import subprocess
import sys
import types
import zlib

import pytest
import torch

from diffusers.flash.fastpath import compile_cache, precompile
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


def appended(*batches: dict) -> bytes:
    """What torch.compiler.save_cache_artifacts returns after one call per batch (one compile each): the
    entries of every call, one after the other, an artifact type once per call."""
    body = (1).to_bytes(8, "big") + b"".join(torch_payload(batch)[12:] for batch in batches)
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


def _refused(store, log, why, loaded=None):
    if loaded is None:
        loaded = store.load()
    assert loaded is False
    assert store.problem and why in store.problem, store.problem
    said = [r.getMessage() for r in log.records if str(store.path) in r.getMessage()]
    assert said and all("\n" not in s for s in said), said  # one line, no traceback
    assert "Traceback" not in log.text


# ------------------------------------------------------------------ issue 32, defect 1: the attacks
def test_a_planted_pickle_does_not_run_when_the_cache_is_loaded(home, log):
    marker = home / "pickle-ran"
    path = home / "work" / "compiled.bin"
    path.write_bytes(planted_file(torch_payload({"inductor": [("fabc", pickle.dumps(_RunsCode(marker)))]})))
    os.chmod(path, 0o644)
    store = fast_path.CompileCache(path)
    loaded = store.load()
    assert not marker.exists(), "loading the cache file ran the pickle in it"
    _refused(store, log, "not written with your key", loaded)


@pytest.mark.parametrize("escape", ["absolute", "dotdot"])
def test_a_planted_autotune_artifact_writes_nothing_outside_the_cache(home, log, escape):
    target = home / "outside" / "planted.pth"
    key = str(target) if escape == "absolute" else os.path.join("..", "outside", "planted.pth")
    path = home / "work" / "compiled.bin"
    path.write_bytes(planted_file(torch_payload({"autotune": [(key, b'{"import os": 1}')]})))
    os.chmod(path, 0o644)
    store = fast_path.CompileCache(path)
    loaded = store.load()
    assert not target.exists(), "loading the cache file wrote outside torch's cache folder"
    _refused(store, log, "not written with your key", loaded)


def test_a_file_of_another_user_is_refused(home, log, monkeypatch):
    path = home / "work" / "compiled.bin"
    _genuine(path)
    uid = os.geteuid()
    monkeypatch.setattr(os, "geteuid", lambda: uid + 1)  # the file is now someone else's
    _refused(fast_path.CompileCache(path), log, "owned by uid")


@pytest.mark.parametrize("mode", [0o664, 0o646])
def test_a_file_others_can_write_is_refused(home, log, mode):
    path = home / "work" / "compiled.bin"
    _genuine(path)
    os.chmod(path, mode)
    _refused(fast_path.CompileCache(path), log, "writable by")


def test_a_file_in_a_folder_others_can_write_is_refused_unless_sticky(home, log):
    path = home / "work" / "compiled.bin"
    _genuine(path)
    os.chmod(home / "work", 0o777)
    try:
        _refused(fast_path.CompileCache(path), log, "folder")
        os.chmod(home / "work", 0o1777)  # sticky, as /tmp: others cannot replace this user's file
        assert fast_path.CompileCache(path).load() is True
    finally:
        os.chmod(home / "work", 0o755)


def test_a_symlink_is_refused(home, log):
    real = home / "work" / "real.bin"
    _genuine(real)
    link = home / "work" / "compiled.bin"
    link.symlink_to(real)
    _refused(fast_path.CompileCache(link), log, "symbolic link")


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


def _signed(path, artifacts):
    """A cache file signed with this user's key around any artifacts, as CompileCache writes its header (as an
    earlier version, or anyone holding the key, could write one)."""
    payload = torch_payload(artifacts)
    header = {"torch": torch.__version__, "size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    header["hmac_sha256"] = compile_cache._mac(compile_cache.user_key(), header, payload)
    path.write_bytes(fast_path.CACHE_MAGIC + json.dumps(header).encode() + b"\n" + payload)
    os.chmod(path, 0o644)


def test_a_file_this_user_wrote_is_loaded_into_torchs_cache(home, log):
    path = home / "work" / "compiled.bin"
    _genuine(path)
    assert stat.S_IMODE(os.stat(path).st_mode) & 0o022 == 0
    store = fast_path.CompileCache(path)
    assert store.load() is True and store.problem is None, store.problem
    assert store.keys == {("aot_autograd", "aabc")}
    landed = list((home / "inductor").rglob("*"))
    assert any(p.is_file() and p.read_bytes() == b"compiled" for p in landed), landed
    assert f"loaded 1 compiled artifacts from {path}" in log.text


def test_artifacts_saved_after_each_of_two_compiles_are_all_loaded():
    """save_cache_artifacts after each compile appends an entry per type; torch's loader keeps the last
    entry of each type, so the first compile's graph (the UNet's, before the VAE decoder's) was lost."""
    from torch.compiler._cache import CacheArtifactManager

    unet = {"inductor": [("f3pf", b"unet graph")], "aot_autograd": [("aebe", b"unet aot")]}
    vae = {"inductor": [("fqzd", b"vae graph")], "autotune": [("2n/ab.best_config", b"{}")]}
    payload = appended(unet, vae)
    assert compile_cache.artifact_keys(payload) == {"inductor": ["f3pf", "fqzd"], "aot_autograd": ["aebe"],
                                                     "autotune": ["2n/ab.best_config"]}
    lost = CacheArtifactManager.deserialize(payload)  # torch's own reading of the appended entries
    assert [a.key for a in lost["inductor"]] == ["fqzd"]
    whole = compile_cache.merged(payload)
    loaded = CacheArtifactManager.deserialize(whole)
    assert {kind: [(a.key, a.content) for a in items] for kind, items in loaded.items()} == {
        "inductor": [("f3pf", b"unet graph"), ("fqzd", b"vae graph")], "aot_autograd": [("aebe", b"unet aot")],
        "autotune": [("2n/ab.best_config", b"{}")]}
    assert compile_cache.merged(whole) == whole  # one entry per type: as it was
    assert compile_cache.merged(torch_payload(unet)) == torch_payload(unet)


def test_a_tampered_byte_is_refused(home, log):
    path = home / "work" / "compiled.bin"
    payload = _genuine(path)
    data = path.read_bytes()
    head, _, rest = data[len(compile_cache.CACHE_MAGIC):].partition(b"\n")
    changed = payload[:-1] + bytes([payload[-1] ^ 1])  # the artifact's last byte
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    _refused(fast_path.CompileCache(path), log, "damaged")
    header = json.loads(head)  # an attacker fixes the checksum too: the signature still fails
    header["sha256"] = hashlib.sha256(changed).hexdigest()
    path.write_bytes(compile_cache.CACHE_MAGIC + json.dumps(header).encode() + b"\n" + changed)
    _refused(fast_path.CompileCache(path), log, "not written with your key")


def test_a_wrong_signature_is_refused_with_the_reason_logged(home, log):
    path = home / "work" / "compiled.bin"
    _genuine(path)
    data = path.read_bytes()
    head, _, payload = data[len(compile_cache.CACHE_MAGIC):].partition(b"\n")
    header = json.loads(head)
    header["hmac_sha256"] = "0" * 64
    path.write_bytes(compile_cache.CACHE_MAGIC + json.dumps(header).encode() + b"\n" + payload)
    store = fast_path.CompileCache(path)
    _refused(store, log, "not written with your key")
    assert "trust_cache=True" in store.problem and compile_cache.key_path() in store.problem
    assert f"the compile cache {path} is not used (not written with your key" in log.text
    assert "the file is written again after the first compile" in log.text


@pytest.mark.parametrize("key", ["/etc/x", "../x", "a/../../x", "fa/b", "..", "a\\..\\x", ""])
def test_a_signed_file_whose_artifact_names_a_place_outside_torchs_cache_is_refused(home, log, key):
    """Even a file this user's key signed: nothing whose key torch would join into a path outside its folder."""
    path = home / "work" / "compiled.bin"
    _signed(path, {"aot_autograd": [("aabc", b"x")], "inductor": [(key, b"x")]})
    _refused(fast_path.CompileCache(path), log, "names a place outside torch's cache folders")
    assert not (home / "inductor").exists() or not any((home / "inductor").rglob("*"))
    # nor is such a file written, whoever hands it over (torch's save_cache_artifacts here)
    path.unlink()
    with pytest.raises(AssertionError):
        _genuine(path, {"aot_autograd": [("aabc", b"x")], "inductor": [(key, b"x")]})
    assert not path.exists() and "outside torch's cache folders" in log.text


def test_an_autotune_key_below_torchs_folder_is_accepted_and_one_escaping_it_is_not():
    ok = torch_payload({"autotune": [("ab/abcdef.best_config", b"{}")], "pgo": [("code_state:0:x", b"")]})
    assert compile_cache.artifact_keys(ok) == {"autotune": ["ab/abcdef.best_config"], "pgo": ["code_state:0:x"]}
    for key in ("/tmp/x.pth", "../../x.pth", "ab/../../x", "ab//x", "ab/./x"):
        with pytest.raises(compile_cache.Refused, match="names a place outside"):
            compile_cache.artifact_keys(torch_payload({"autotune": [(key, b"{}")]}))
    with pytest.raises(compile_cache.Refused, match="type this version cannot check"):
        compile_cache.artifact_keys(torch_payload({"new_kind": [("a", b"")]}))
    cut = ok[4:-3]  # a right checksum over a short payload
    with pytest.raises(compile_cache.Refused, match="cut short"):
        compile_cache.artifact_keys(zlib.crc32(cut).to_bytes(4, "big") + cut)
    with pytest.raises(compile_cache.Refused, match="checksum does not match"):
        compile_cache.artifact_keys(ok[:-3])


# ------------------------------------------------------------------ the per-user key
def test_the_key_is_made_once_private_and_refused_where_others_could_read_or_plant_it(home, log, monkeypatch):
    path = compile_cache.key_path()
    assert path == str(home / "user-cache" / "diffusers-flash" / "cache-key")
    key = compile_cache.user_key()
    assert len(key) == 32 and compile_cache.user_key() == key  # made once, then read
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
    assert os.listdir(os.path.dirname(path)) == ["cache-key"]  # no temporary file left
    os.chmod(path, 0o640)
    with pytest.raises(compile_cache.Refused, match="readable or writable by group or others"):
        compile_cache.user_key()
    os.chmod(path, 0o600)
    uid = os.geteuid()
    monkeypatch.setattr(os, "geteuid", lambda: uid + 1)
    with pytest.raises(compile_cache.Refused, match="owned by uid"):
        compile_cache.user_key()
    monkeypatch.setattr(os, "geteuid", lambda: uid)
    os.rename(path, path + ".real")
    os.symlink(path + ".real", path)
    with pytest.raises(compile_cache.Refused, match="symbolic link"):
        compile_cache.user_key()
    os.remove(path)
    with open(path, "w") as f:
        f.write("not hex")
    os.chmod(path, 0o600)
    with pytest.raises(compile_cache.Refused, match="damaged"):
        compile_cache.user_key()


def test_with_a_key_it_cannot_use_the_cache_is_neither_loaded_nor_written(home, log):
    path = home / "work" / "compiled.bin"
    _genuine(path)
    before = path.read_bytes()
    os.chmod(compile_cache.key_path(), 0o644)
    store = fast_path.CompileCache(path)
    _refused(store, log, "the cache key")
    assert "it is not written either" in log.text
    fake = _FakeArtifacts(pytest.MonkeyPatch(), ["a"])
    try:
        store.update()
    finally:
        fake.undo()
    assert store.written == 0 and path.read_bytes() == before


def test_a_file_from_another_machine_loads_with_its_key_or_with_trust(home, log):
    path = home / "work" / "compiled.bin"
    path.write_bytes(planted_file(torch_payload({"aot_autograd": [("aabc", b"compiled")]})))
    os.chmod(path, 0o644)
    _refused(fast_path.CompileCache(path), log, "not written with your key")
    assert fast_path.CompileCache(path, trust=True).load() is True
    assert "(on trust_cache's word)" in log.text
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert fast_path.CompileCache(path, trust=digest.upper()).load() is True
    _refused(fast_path.CompileCache(path, trust="0" * 64), log, "not the one trust_cache names")
    with pytest.raises(ValueError, match="trust_cache must be"):
        fast_path.CompileCache(path, trust="yes")
    # a file this user signed needs no trust: once rewritten here, a sha256 given for the foreign file still loads it
    _genuine(path)
    assert fast_path.CompileCache(path, trust=digest).load() is True
    # trust skips the signature only: a file others can write is refused all the same
    os.chmod(path, 0o666)
    _refused(fast_path.CompileCache(path, trust=True), log, "writable by group or others")


def test_the_writers_key_copied_here_makes_its_files_trusted(home, log, monkeypatch):
    path = home / "work" / "compiled.bin"
    _genuine(path)  # on the first machine
    first_key = compile_cache.key_path()
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / "machine-2"))
    _refused(fast_path.CompileCache(path), log, "not written with your key")  # a key of its own
    with open(first_key) as f, open(compile_cache.key_path(), "w") as g:
        g.write(f.read())
    assert fast_path.CompileCache(path).load() is True


def test_trust_cache_needs_a_cache_file():
    from diffusers.flash import local_pipelines

    pipe = local_pipelines.stable_diffusion("tiny")
    with pytest.raises(ValueError, match="trust_cache= names the cache file"):
        pipe.enable_fast_path(compile=True, trust_cache=True)


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o002, 0o644), (0o077, 0o600)])
def test_the_file_follows_the_umask_but_is_never_writable_by_others(home, umask, mode):
    path = home / "work" / "compiled.bin"
    old = os.umask(umask)
    try:
        _genuine(path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == mode


def test_an_unsigned_file_of_the_earlier_format_is_refused_and_replaced(home, log, monkeypatch):
    path = home / "work" / "compiled.bin"
    payload = torch_payload({"aot_autograd": [("aabc", b"compiled")]})
    header = {"torch": torch.__version__, "size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    path.write_bytes(compile_cache.UNSIGNED_MAGIC + json.dumps(header).encode() + b"\n" + payload)
    store = fast_path.CompileCache(path)
    _refused(store, log, "unsigned file of an earlier diffusers-flash")
    fake = _FakeArtifacts(monkeypatch, ["a"])
    store.update()
    assert store.written == 1 and path.read_bytes().startswith(compile_cache.CACHE_MAGIC)
    assert fast_path.CompileCache(path).load() and fake.loaded[-1] == ["a"]


# ------------------------------------------------------------------ written when it lacks something
class _FakeArtifacts:
    """torch.compiler's save/load of cache artifacts, recorded: what was saved (in torch's format, inductor
    artifacts named ``keys``) is what a load hands back."""

    def __init__(self, monkeypatch, keys):
        self.keys, self.loaded, self.monkeypatch = keys, [], monkeypatch
        monkeypatch.setattr(torch.compiler, "save_cache_artifacts", self.save)
        monkeypatch.setattr(torch.compiler, "load_cache_artifacts", self.load)

    def undo(self):
        self.monkeypatch.undo()

    @staticmethod
    def _info(keys):
        return types.SimpleNamespace(artifacts={"inductor": list(keys)})

    def save(self):
        return (torch_payload({"inductor": [(k, b"graph " + k.encode()) for k in self.keys]}),
                self._info(self.keys)) if self.keys else None

    def load(self, data):
        keys = compile_cache.artifact_keys(data).get("inductor", [])
        self.loaded.append(keys)
        return self._info(keys)


def test_cache_needs_a_compile_and_a_path():
    from diffusers.flash import local_pipelines

    pipe = local_pipelines.stable_diffusion("tiny")
    with pytest.raises(ValueError, match="cache= keeps torch.compile's work"):
        pipe.enable_fast_path(cache="x.bin")
    with pytest.raises(ValueError, match="file path"):
        fast_path.CompileCache(3)


def test_the_compile_cache_is_written_when_it_lacks_something_and_loaded_back(home, monkeypatch, log):
    path = home / "work" / "compiled.bin"
    fake = _FakeArtifacts(monkeypatch, [])
    store = fast_path.CompileCache(path)
    assert store.load() is False and store.problem is None  # absent: nothing to say but that
    store.update()  # nothing compiled yet: nothing written
    assert not path.exists()
    fake.keys = ["a", "b"]
    store.update()
    assert path.read_bytes().startswith(fast_path.CACHE_MAGIC) and store.written == 1
    store.update()  # nothing new: not written again
    assert store.written == 1
    again = fast_path.CompileCache(str(path))
    assert again.load() is True and fake.loaded == [["a", "b"]]
    assert again.keys == {("inductor", "a"), ("inductor", "b")}
    fake.keys = ["a", "b"]  # all read from the file (hits are recorded too): not rewritten
    again.update()
    assert again.written == 0
    fake.keys = ["b", "c"]  # a new shape compiled here, one of the file's unused
    again.update()
    assert again.written == 1 and "1 of the earlier file's, not used in this process, are not kept" in log.text
    assert "1 compiled artifacts of this process are not in the loaded file" in log.text
    assert "(its compiles missed it: inductor c)" in log.text and again.missed == ["inductor c"]
    pipe = types.SimpleNamespace(_fast_path_cache=again)
    assert fast_path.cache_status(pipe) == {"path": str(path), "loaded": True, "problem": None, "written": 1,
                                            "missed": ["inductor c"],
                                            "precompiled": {"loaded": 0, "compiled": 0, "problems": []}}
    assert fast_path.CompileCache(path).load() and fake.loaded[-1] == ["b", "c"]
    assert sorted(os.listdir(path.parent)) == ["compiled.bin"]  # no temporary file left


@pytest.mark.parametrize("damage,why", [
    (lambda b: b"PK\x03\x04" + b, "not a diffusers-flash compile cache file"),
    (lambda b: b[:-1], "damaged:"),
    (lambda b: b[:-1] + b"x", "damaged:"),
    (lambda b: compile_cache.CACHE_MAGIC + b"{not json\n", "damaged: its header cannot be read"),
    (lambda b: b, "written by torch"),
])
def test_a_damaged_cache_is_reported_compiled_as_usual_and_rewritten(home, monkeypatch, log, damage, why):
    path = home / "work" / "compiled.bin"
    fake = _FakeArtifacts(monkeypatch, ["a", "b"])
    store = fast_path.CompileCache(path)
    store.update()
    path.write_bytes(damage(path.read_bytes()))
    fake.loaded.clear()
    store = fast_path.CompileCache(path)
    version = torch.__version__
    if why.startswith("written by torch"):  # this file, read by another torch
        monkeypatch.setattr(torch, "__version__", "2.0.0")
        why = f"written by torch {version}, this is torch 2.0.0"
    _refused(store, log, why)
    assert fake.loaded == []
    monkeypatch.setattr(torch, "__version__", version)
    store.update()  # the first compile: written again, whole
    assert store.written == 1


def test_a_cache_torch_cannot_read_or_a_folder_that_cannot_be_written_is_reported(home, monkeypatch, log):
    path = home / "work" / "compiled.bin"
    fake = _FakeArtifacts(monkeypatch, ["a"])
    fast_path.CompileCache(path).update()
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", lambda data: None)
    store = fast_path.CompileCache(path)
    assert store.load() is False and "torch could not read its artifacts" in store.problem
    fake.keys = ["a"]
    missing = fast_path.CompileCache(home / "work" / "no-such-folder" / "compiled.bin")
    missing.update()
    assert missing.written == 0 and "is not written (FileNotFoundError" in log.text


CACHE_RUN = """
import json, os, sys, torch
from diffusers.flash.fastpath import engine as fast_path
torch.manual_seed(0)
# two models compiled one after the other, the file updated after each (as the UNet's and the VAE's)
first = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(8, 3, 1)).eval()
second = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4)).eval()
store = fast_path.CompileCache(sys.argv[1])
store.load()
report = fast_path._report()
for what, model in (("UNet", first), ("VAE decode", second)):
    fast_path.apply_to(model, what, "forward", True, report, channels_last=False, cuda_graphs=False, cache=store)
with torch.no_grad():
    out = first(torch.ones(1, 4, 8, 8))
    first(torch.ones(1, 4, 8, 8))  # the same shape: no compile, no update
    out2 = second(torch.ones(2, 8))
hits, misses = fast_path.cache_counts()
from torch._dynamo.utils import counters
print(json.dumps({"compile": report["compile"], "reasons": report["reasons"],
                  "failed": [getattr(m.forward.fn, "fallback", m.forward.fn).failed for m in (first, second)],
                  "loaded": store.loaded, "problem": store.problem, "written": store.written, "ahead": store.ahead,
                  "traced": counters["stats"]["unique_graphs"], "size": os.path.getsize(sys.argv[1]),
                  "sum": float(out.sum()) + float(out2.sum()), "hits": hits, "misses": misses}))
"""


@pytest.mark.slow
def test_a_cache_file_serves_the_compile_in_a_new_process_with_an_empty_inductor_cache(home):
    """Process 1 (fresh inductor and Triton caches) compiles two models with cache=file, writing it after each:
    the denoiser ("UNet") ahead of time (precompile.py), the other as usual; process 2 (other empty caches)
    loads it: the denoiser is loaded precompiled, traced by nobody, and the other model's compile is a cache
    hit with no miss, and the file is not rewritten (torch's loader kept only the second model's graph of a
    file saved twice: ``merged``). Where torch cannot compile ahead (before 2.11), both are cache hits."""
    from test_compile_ahead import _no_cpp_compiler

    reason = _no_cpp_compiler()
    if reason:
        pytest.skip(reason)
    path = home / "work" / "compiled.bin"

    def run(name):
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(home / name / "inductor"),
                   TRITON_CACHE_DIR=str(home / name / "triton"), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
        proc = subprocess.run([sys.executable, "-c", CACHE_RUN, str(path)], capture_output=True, text=True,
                              env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    ahead = precompile.unavailable() is None
    first = run("machine-1")
    assert first["compile"] == ["UNet", "VAE decode"] and first["failed"] == [None, None], first
    # (a compile ahead of time does not go through inductor's cache of compiled graphs: no miss counted)
    assert first["misses"] >= 2 - ahead and not first["loaded"] and first["written"] == 2, first
    assert first["traced"] == 2 and first["ahead"] == {"loaded": 0, "compiled": int(ahead), "problems": []}, first
    assert path.read_bytes().startswith(fast_path.CACHE_MAGIC)
    second = run("machine-2")
    assert second["loaded"] and second["problem"] is None and second["failed"] == [None, None], second
    assert second["ahead"] == {"loaded": int(ahead), "compiled": 0, "problems": []}, second
    assert second["traced"] == 2 - ahead, second  # the precompiled denoiser is not traced again
    assert second["hits"] >= 2 - ahead and second["misses"] == 0, second
    assert second["written"] == 0 and second["sum"] == pytest.approx(first["sum"], rel=1e-5)
