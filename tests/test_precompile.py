"""The denoiser compiled ahead of time into the compile cache file (precompile.py): what is written is what is
loaded, a loaded function that would give other numbers is not used, and anything that cannot serve falls back
to the usual compile with its reason."""
import json

import pytest
import torch

from diffusers.flash.fastpath import compile_cache, precompile
from diffusers.flash.fastpath import engine as fast_path
from test_compile_cache import _FakeArtifacts, home  # noqa: F401  (a fixture)


class Scaled(torch.nn.Module):
    """A model whose output depends on a plain attribute no config records (``scale``): a compiled graph keeps
    the value it was traced with."""

    def __init__(self, scale: float = 2.0) -> None:
        super().__init__()
        self.linear, self.scale = torch.nn.Linear(8, 8), scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.linear(x)) * self.scale


def _needs_compile():
    from test_compile_ahead import _no_cpp_compiler

    why = precompile.unavailable() or _no_cpp_compiler()
    if why:
        pytest.skip(why)


# ------------------------------------------------------------------ the file
def test_precompiled_entries_are_written_signed_and_loaded_back(home, monkeypatch, log):  # noqa: F811
    path = home / "work" / "compiled.bin"
    fake = _FakeArtifacts(monkeypatch, ["a"])
    store = fast_path.CompileCache(path)
    store.add_precompiled("k1", b"first function", {"___module_collections_1_c0": "collections"})
    store.add_precompiled("k2", b"", {})
    store.update()
    assert store.written == 1
    header = json.loads(path.read_bytes()[len(compile_cache.CACHE_MAGIC):].partition(b"\n")[0])
    assert [e["key"] for e in header["precompiled"]] == ["k1", "k2"] and header["artifacts"] > 0
    store.update()  # nothing new: not written again
    assert store.written == 1
    again = fast_path.CompileCache(path)
    assert again.load() and fake.loaded == [["a"]]
    assert again.precompiled == {"k1": {"data": b"first function",
                                        "modules": {"___module_collections_1_c0": "collections"}},
                                 "k2": {"data": b"", "modules": {}}}
    again.drop_precompiled("k1")  # an entry that did not serve: the file is written without it
    again.update()
    assert again.written == 1 and list(fast_path.CompileCache(path).precompiled) == []  # not loaded yet
    third = fast_path.CompileCache(path)
    assert third.load() and list(third.precompiled) == ["k2"]
    # only precompiled entries, no artifact of torch's: loaded without asking torch
    fake.keys = []
    only = fast_path.CompileCache(home / "work" / "only.bin")
    only.add_precompiled("k3", b"x", {})
    only.update()
    back = fast_path.CompileCache(home / "work" / "only.bin")
    assert back.load() and back.precompiled == {"k3": {"data": b"x", "modules": {}}} and back.keys == set()


@pytest.mark.parametrize("change", ["bytes", "header"])
def test_a_changed_precompiled_entry_is_refused(home, monkeypatch, log, change):  # noqa: F811
    path = home / "work" / "compiled.bin"
    _FakeArtifacts(monkeypatch, ["a"])
    store = fast_path.CompileCache(path)
    store.add_precompiled("k1", b"the compiled function", {})
    store.update()
    data = path.read_bytes()
    head, _, payload = data[len(compile_cache.CACHE_MAGIC):].partition(b"\n")
    header = json.loads(head)
    if change == "bytes":  # another function in the file: the signature no longer matches
        payload = payload.replace(b"the compiled function", b"another function!!!!!")
        header["sha256"] = compile_cache.hashlib.sha256(payload).hexdigest()
        why = "not written with your key"
    else:  # a header that does not describe the payload, signed by this user (a bug, not an attack)
        header["precompiled"][0]["size"] += 5
        header["hmac_sha256"] = compile_cache._mac(compile_cache.user_key(), header, payload)
        why = "damaged: its header does not describe its contents"
    path.write_bytes(compile_cache.CACHE_MAGIC + json.dumps(header).encode() + b"\n" + payload)
    again = fast_path.CompileCache(path)
    assert again.load() is False and why in again.problem and again.precompiled == {}


# ------------------------------------------------------------------ the key and the check
def test_the_key_names_what_the_compiled_code_depends_on():
    model = Scaled().eval()
    x = torch.ones(2, 8)
    key = precompile.key_for(model, Scaled.forward, (x,), {}, {"a": 1})
    assert key == precompile.key_for(Scaled().eval(), Scaled.forward, (torch.zeros(2, 8),), {}, {"a": 1})
    others = [precompile.key_for(model, Scaled.forward, (torch.ones(3, 8),), {}, {"a": 1}),  # a shape
              precompile.key_for(model, Scaled.forward, (torch.ones(8, 2).t(),), {}, {"a": 1}),  # strides
              precompile.key_for(model, Scaled.forward, (x.half(),), {}, {"a": 1}),  # a dtype
              precompile.key_for(model, Scaled.forward, (x,), {}, {"a": 2}),  # inductor's options
              precompile.key_for(model.half(), Scaled.forward, (x,), {}, {"a": 1})]  # the weights' dtype
    assert len({key, *others}) == 6
    assert precompile.key_for(model, Scaled.forward, (x,), {"hook": object()}, {}) is None  # not plain data


def test_a_loaded_function_must_give_the_models_numbers():
    x = torch.randn(4, 8)
    precompile.check_same(x + 1e-5, x)
    with pytest.raises(ValueError, match="differs from the model's by"):
        precompile.check_same(x * 2, x)
    with pytest.raises(ValueError, match="not shaped as the model's"):
        precompile.check_same((x, x), (x,))


def test_a_wrapped_forward_or_an_old_torch_compiles_as_usual(monkeypatch):
    model = Scaled()
    report = fast_path._report()
    store = fast_path.CompileCache("unused.bin")
    wrapped = fast_path._precompiled(model, lambda x: x, "UNet", None, store, "fallback", report)
    assert wrapped == "fallback" and "its forward is wrapped" in report["reasons"][0]
    monkeypatch.delattr(torch.compiler, "load_compiled_function", raising=False)
    assert fast_path._precompiled(model, model.forward, "UNet", None, store, "fallback", report) == "fallback"
    assert "cannot compile ahead of time" in report["reasons"][1]


# ------------------------------------------------------------------ compiled, saved, loaded (a C++ compiler)
def test_compiled_ahead_then_loaded_without_a_trace_and_a_stale_function_refused(home, monkeypatch, log):  # noqa: F811
    _needs_compile()
    from torch._dynamo.utils import counters

    model = Scaled().eval()
    x = torch.randn(2, 8)
    store = fast_path.CompileCache(home / "work" / "compiled.bin")
    calls = []
    ahead = precompile.Precompiled(model, Scaled.forward, "UNet", {}, store, lambda *a: calls.append(a))
    with torch.no_grad():
        assert torch.allclose(ahead(x), model(x)) and store.ahead["compiled"] == 1 and not calls
        store.update()
        (key, entry), = store.precompiled.items()
        # a new process: the file's entry loaded, nothing traced; other weights are inputs, not constants
        torch._dynamo.reset()
        traced = counters["stats"]["unique_graphs"]
        reader = fast_path.CompileCache(store.path)
        assert reader.load() and list(reader.precompiled) == [key]
        other = Scaled().eval()
        loaded = precompile.Precompiled(other, Scaled.forward, "UNet", {}, reader, lambda *a: calls.append(a))
        assert torch.allclose(loaded(x), other(x)) and reader.ahead == {"loaded": 1, "compiled": 0, "problems": []}
        assert counters["stats"]["unique_graphs"] == traced and not calls
        # a model the key cannot tell apart whose numbers differ (a plain attribute): not used, compiled here
        stale = fast_path.CompileCache(store.path)
        assert stale.load()
        changed = Scaled(scale=5.0).eval()
        fresh = precompile.Precompiled(changed, Scaled.forward, "UNet", {}, stale, lambda *a: calls.append(a))
        assert torch.allclose(fresh(x), changed(x)) and not calls
        assert stale.ahead["loaded"] == 0 and stale.ahead["compiled"] == 1
        assert "its guards do not hold for this model" in stale.ahead["problems"][0]  # torch's guard saw it
        assert "is not used (its guards do not hold" in log.text


def test_a_loaded_function_giving_other_numbers_is_dropped_and_compiled_again(home, monkeypatch, log):  # noqa: F811
    """Where torch's guards pass but the numbers differ, the comparison with the model's own output refuses
    the loaded function (torch's loading and compiling stood in for: no compile here)."""
    from diffusers.flash import torch_private

    monkeypatch.setattr(precompile, "unavailable", lambda: None)
    monkeypatch.setattr(torch_private, "aot_load", lambda data, scope, external: lambda model, x: model(x) + 1.0)
    monkeypatch.setattr(torch_private, "aot_compile", lambda func, args, kwargs, options: func)
    monkeypatch.setattr(torch_private, "aot_serialize", lambda compiled, external: (b"compiled here", {}))
    model, x = Scaled().eval(), torch.randn(2, 8)
    store = fast_path.CompileCache(home / "work" / "compiled.bin")
    key = precompile.key_for(model, Scaled.forward, (x,), {}, {})
    store.add_precompiled(key, b"written elsewhere", {})
    ahead = precompile.Precompiled(model, Scaled.forward, "UNet", {}, store, None)
    with torch.no_grad():
        assert torch.equal(ahead(x), model(x))
    assert store.ahead["loaded"] == 0 and store.ahead["compiled"] == 1
    assert "its output differs from the model's by 1" in store.ahead["problems"][0]
    assert store.precompiled[key]["data"] == b"compiled here"  # replaced in the file at the next update
    assert "is not used (its output differs from the model's by 1" in log.text
    # compiled, but bytes torch cannot write: the compiled function serves, nothing is kept, nothing compiled twice
    monkeypatch.setattr(torch_private, "aot_serialize", lambda compiled, external: 1 / 0)
    other = fast_path.CompileCache(home / "work" / "other.bin")
    ahead = precompile.Precompiled(model, Scaled.forward, "UNet", {}, other, None)
    with torch.no_grad():
        assert torch.equal(ahead(x), model(x))
    assert other.precompiled == {} and other.ahead["compiled"] == 0
    assert "ZeroDivisionError" in other.ahead["problems"][0] and "a new machine will compile it again" in log.text


@pytest.mark.parametrize("model", ["sd3", "flux"])
def test_todays_transformers_compile_ahead_and_load(home, model):  # noqa: F811
    """SD3's and Flux's transformers (0.29 and 0.30 on: CI's run at 0.42.1) through the path a cache file takes:
    compiled ahead, written, read by a new store and loaded, giving the model's numbers. Their forwards are
    decorated (``apply_lora_scale``) and their attention reads ``inspect.signature(processor.__call__)``: each
    broke saving before torch_private's closure data and guard filter."""
    import diffusers

    name = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}[model]
    if not hasattr(diffusers, name):
        pytest.skip(f"diffusers {diffusers.__version__} has no {name}")
    _needs_compile()
    from diffusers.flash import local_sdxl_sd3_flux as local

    pipe = local.pipeline(model, "tiny")
    seen = {}
    own = pipe.transformer.forward

    def spy(*args, **kwargs):
        seen.setdefault("call", (args, kwargs))
        return own(*args, **kwargs)

    pipe.transformer.forward = spy
    size = local.image_size(model)
    pipe(prompt="a cat", num_inference_steps=1, height=size, width=size, output_type="np")
    del pipe.transformer.forward
    args, kwargs = seen["call"]
    store = fast_path.CompileCache(home / "work" / "compiled.bin")
    func = type(pipe.transformer).forward
    with torch.no_grad():
        want = own(*args, **kwargs)[0]
        writer = precompile.Precompiled(pipe.transformer, func, "transformer", {}, store, None)
        assert torch.allclose(writer(*args, **kwargs)[0], want, atol=1e-4)
        assert store.ahead == {"loaded": 0, "compiled": 1, "problems": []}
        store.update()
        reader = fast_path.CompileCache(store.path)
        assert reader.load()
        loaded = precompile.Precompiled(pipe.transformer, func, "transformer", {}, reader, None)
        assert torch.allclose(loaded(*args, **kwargs)[0], want, atol=1e-4)
        assert reader.ahead == {"loaded": 1, "compiled": 0, "problems": []}
