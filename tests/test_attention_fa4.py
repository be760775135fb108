"""The FlashAttention-4 backend (``flash-attn-4``) on the CPU: its reasons, its limits as data, the
layout it hands FA4, its custom op (fake implementation, autograd, torch.compile) and ``auto``'s rule,
with a stand-in ``flash_attn.cute`` module that computes attention with plain math."""
import subprocess
import sys
import types

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from diffusers.flash.attention import fa4
from diffusers.flash.attention import dispatch as ad

BACKEND = ad.BACKENDS["flash-attn-4"]


def reference(q, k, v, scale):
    q, k, v = q.double(), k.double(), v.double()
    return torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1) @ v


@pytest.fixture(autouse=True)
def clean_state(monkeypatch):
    monkeypatch.delenv(ad.ENV_VAR, raising=False)
    ad.set_attention_backend(None)
    ad._cache.clear()
    fa4._load.cache_clear()
    yield
    ad._cache.clear()
    fa4._load.cache_clear()


@pytest.fixture
def fake_fa4(monkeypatch):
    """A stand-in flash_attn.cute: flash_attn_func on (B, S, H, D) tensors by math, recording its inputs."""
    seen = []

    def flash_attn_func(q, k, v, qv=None, gather_kv_indices=None, softmax_scale=None, causal=False, **kw):
        assert q.dim() == 4 and q.shape[0] == k.shape[0] and q.shape[2:] == k.shape[2:]  # (B, S, H, D)
        seen.append(dict(q=tuple(q.shape), k=tuple(k.shape), scale=softmax_scale, causal=causal))
        wide = torch.promote_types(q.dtype, torch.float32)  # fp32 accumulation as FA4; float64 stays
        scores = torch.einsum("bqhd,bkhd->bhqk", q.to(wide), k.to(wide)) * softmax_scale
        out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v.to(wide))
        return out.to(q.dtype).contiguous()

    cute = types.ModuleType("flash_attn.cute")
    cute.flash_attn_func = flash_attn_func
    parent = types.ModuleType("flash_attn")
    parent.cute = cute
    monkeypatch.setitem(sys.modules, "flash_attn", parent)
    monkeypatch.setitem(sys.modules, "flash_attn.cute", cute)
    fa4._load.cache_clear()
    return seen


@pytest.fixture
def hopper(monkeypatch):
    """A CUDA device of compute capability 9.0 as far as the dispatcher can tell (its tensors: fake ones)."""
    cap = {"value": (9, 0)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap["value"])
    return cap


def cuda_call(b=16, h=8, sq=4096, sk=4096, d=40, dtype=torch.float16):
    with FakeTensorMode():
        q = torch.empty(b, sq, h, d, device="cuda", dtype=dtype).transpose(1, 2)
        k = torch.empty(b, sk, h, d, device="cuda", dtype=dtype).transpose(1, 2)
        v = torch.empty(b, sk, h, d, device="cuda", dtype=dtype).transpose(1, 2)
    return ad.Call(q, k, v, d**-0.5)


# ---------------------------------------------------------------------------------------------- reasons
def test_registered_and_listed():
    assert "flash-attn-4" in ad.NAMES
    status = {n: (ok, why) for n, ok, why in ad.backend_status()}
    if not torch.cuda.is_available():
        assert status["flash-attn-4"] == (False, "no CUDA device")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without CUDA says")
def test_cpu_call_is_refused_with_reasons(fake_fa4):
    q = k = v = torch.randn(1, 2, 8, 40)
    assert BACKEND.reasons(ad.Call(q, k, v, 0.1)) == ["device cpu not in {cuda}", "dtype float32 not in "
                                                      "{float16, bfloat16}"]
    half = q.half()
    assert BACKEND.reasons(ad.Call(half, half, half, 0.1)) == ["device cpu not in {cuda}"]
    assert BACKEND.unavailable() == "no CUDA device"  # even with the package importable
    with pytest.raises(ad.AttentionBackendError, match="'flash-attn-4' cannot serve.*device cpu not in"):
        ad.attention(q, k, v, backend="flash-attn-4")
    assert ad.choose(q, k, v) == "sdpa"  # auto never offers it here


def test_not_installed_is_a_reason(hopper, monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn.cute", None)  # import flash_attn.cute raises ImportError
    why = BACKEND.unavailable()
    assert why.startswith("flash-attn-4 not importable (flash_attn.cute: ")
    assert BACKEND.reasons(cuda_call()) == [why]
    assert ("flash-attn-4", False, why) in ad.backend_status()


def test_available_with_the_package(hopper, fake_fa4):
    assert BACKEND.unavailable() is None
    assert BACKEND.reasons(cuda_call()) == []


# ---------------------------------------------------------------------------------------------- limits as data
@pytest.mark.parametrize("d", [8, 40, 64, 80, 128, 160, 256])
def test_hopper_serves_multiples_of_8_up_to_256(d):
    assert fa4.head_dim_reasons(d, (9, 0)) == []


@pytest.mark.parametrize("d,cap,why", [
    (512, (9, 0), "head dim 512 not served on compute capability 9.x (multiples of 8 from 8 to 256)"),
    (44, (9, 0), "head dim 44 not served on compute capability 9.x (multiples of 8 from 8 to 256)"),
    (160, (10, 0), "head dim 160 not served on compute capability 10.x (multiples of 8 from 8 to 128 or 256)"),
    (512, (10, 0), "head dim 512 not served on compute capability 10.x (multiples of 8 from 8 to 128 or 256)"),
    (40, (8, 0), "compute capability 8.0 not in {9.x, 10.x, 11.x} (FlashAttention-4 serves Hopper and Blackwell)"),
    (40, (12, 0), "compute capability 12.0 not in {9.x, 10.x, 11.x} (FlashAttention-4 serves Hopper and Blackwell)"),
])
def test_refusals_say_why(d, cap, why):
    assert fa4.head_dim_reasons(d, cap) == [why]


def test_blackwell_takes_256_and_up_to_128():
    assert fa4.head_dim_reasons(256, (10, 0)) == fa4.head_dim_reasons(128, (10, 0)) == []


def test_reasons_through_the_backend(hopper, fake_fa4):
    assert BACKEND.reasons(cuda_call(d=160)) == []
    assert BACKEND.reasons(cuda_call(b=1, h=1, d=512)) == ["head dim 512 > 256"]  # the VAE
    assert BACKEND.reasons(cuda_call(dtype=torch.float32)) == ["dtype float32 not in {float16, bfloat16}"]
    hopper["value"] = (10, 0)
    assert BACKEND.reasons(cuda_call(d=160)) == [
        "head dim 160 not served on compute capability 10.x (multiples of 8 from 8 to 128 or 256)"]
    hopper["value"] = (8, 9)
    assert BACKEND.reasons(cuda_call()) == ["compute capability 8.9 < 9.0"]


def test_limits_follow_the_table(hopper, fake_fa4, monkeypatch):
    monkeypatch.setitem(fa4.HEAD_DIMS, 9, (8, 128, 8, ()))
    assert BACKEND.reasons(cuda_call(d=160)) == [
        "head dim 160 not served on compute capability 9.x (multiples of 8 from 8 to 128)"]


# ---------------------------------------------------------------------------------------------- layout
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
@pytest.mark.parametrize("sq,sk,d", [(50, 50, 40), (64, 77, 80), (16, 16, 160)])
def test_layout_round_trip(fake_fa4, layout, sq, sk, d):
    b, h = 2, 3
    if layout == "bshd":  # the attention modules' projections, viewed as (B, H, S, D)
        q, k, v = (torch.randn(b, s, h, d).transpose(1, 2) for s in (sq, sk, sk))
    else:
        q, k, v = (torch.randn(b, h, s, d) for s in (sq, sk, sk))
    scale = d**-0.5
    out = BACKEND.runner(ad.Call(q, k, v, scale))(q, k, v, scale)
    assert out.shape == (b, h, sq, d)
    torch.testing.assert_close(out.double(), reference(q, k, v, scale), rtol=1e-5, atol=1e-5)
    assert fake_fa4 == [dict(q=(b, sq, h, d), k=(b, sk, h, d), scale=scale, causal=False)]
    if layout == "bshd":  # FA4's (B, S, H, D) output goes back as a view, no copy
        assert out.transpose(1, 2).is_contiguous()


# ---------------------------------------------------------------------------------------------- the custom op
def test_op_is_registered():
    assert fa4.OP == "diffusers_flash::fa4_attention"
    assert hasattr(torch.ops.diffusers_flash, "fa4_attention")


def test_fake_impl_shapes_on_cuda_tensors():
    with FakeTensorMode():
        q = torch.empty(2, 4096, 8, 40, device="cuda", dtype=torch.float16)
        k = torch.empty(2, 77, 8, 40, device="cuda", dtype=torch.float16)
        out = torch.ops.diffusers_flash.fa4_attention(q, k, k, 0.158)
    assert out.shape == (2, 4096, 8, 40) and out.dtype == torch.float16 and out.device.type == "cuda"
    assert out.is_contiguous()


def test_opcheck(fake_fa4):
    q, k, v = torch.randn(2, 12, 3, 16), torch.randn(2, 7, 3, 16), torch.randn(2, 7, 3, 16)
    torch.library.opcheck(fa4.fa4_attention, (q, k, v, 0.25))
    torch.library.opcheck(fa4.fa4_attention, (q.transpose(1, 2).contiguous().transpose(1, 2), k, v, 0.25))


def test_compiled_training_keeps_gradients(fake_fa4):
    """Inputs that need gradients under torch.compile: FA4's own call, outside the graph, with its backward."""
    q, k, v = (torch.randn(2, 3, s, 16, dtype=torch.float64, requires_grad=True) for s in (12, 7, 7))
    run = BACKEND.runner(ad.Call(q, k, v, 0.25))
    compiled = torch.compile(lambda q, k, v: run(q, k, v, 0.25).square().sum(), backend="eager")
    compiled(q, k, v).backward()
    got = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    reference(q, k, v, 0.25).square().sum().backward()
    for g, t in zip(got, (q, k, v)):
        torch.testing.assert_close(g, t.grad)


def test_compiled_call_goes_through_the_op_in_one_graph(fake_fa4):
    q, k, v = (torch.randn(2, 3, s, 40) for s in (20, 20, 20))
    run = BACKEND.runner(ad.Call(q, k, v, 40**-0.5))
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(lambda q, k, v: run(q, k, v, 40**-0.5) * 2, backend=backend, fullgraph=True)
    out = compiled(q, k, v)
    torch.testing.assert_close(out.double(), 2 * reference(q, k, v, 40**-0.5), rtol=1e-5, atol=1e-5)
    assert len(graphs) == 1
    targets = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert any("diffusers_flash.fa4_attention" in t for t in targets), targets


def test_compiled_with_aot_eager_uses_the_fake_impl(fake_fa4):
    q, k, v = (torch.randn(2, 3, s, 16) for s in (10, 6, 6))
    run = BACKEND.runner(ad.Call(q, k, v, 0.25))
    compiled = torch.compile(lambda q, k, v: run(q, k, v, 0.25), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v).double(), reference(q, k, v, 0.25), rtol=1e-5, atol=1e-5)


def test_eager_call_skips_the_op(fake_fa4, monkeypatch):
    def boom(*a):
        raise AssertionError("the custom op in an eager call")

    monkeypatch.setattr(fa4, "fa4_attention", boom)
    q = k = v = torch.randn(1, 2, 8, 16)
    BACKEND.runner(ad.Call(q, k, v, 0.25))(q, k, v, 0.25)
    assert len(fake_fa4) == 1


# ---------------------------------------------------------------------------------------------- auto
@pytest.mark.parametrize("shape,first", [
    (dict(b=16, sq=4096, sk=4096, d=40), True),  # measured: FA4 0.980 ms vs cuDNN 1.148
    (dict(b=16, sq=4096, sk=4096, d=64), True),
    (dict(b=16, sq=4096, sk=4096, d=128), True),
    (dict(b=16, sq=4096, sk=77, d=40), False),  # cross-attention: cuDNN 0.075 vs 0.120
    (dict(b=16, sq=1024, sk=1024, d=80), False),
    (dict(b=16, sq=256, sk=256, d=160), False),
    (dict(b=2, sq=4096, sk=4096, d=40), False),  # one image: not measured, FA4's wrapper costs 0.1 ms
])
def test_auto_follows_the_measured_table(hopper, shape, first):
    order = ad.auto_order(cuda_call(**shape))
    assert fa4.auto_first(cuda_call(**shape)) is first
    if first:
        assert order[:2] == ["flash-attn-4", "sdpa-cudnn"]
    else:
        assert order[0] == "sdpa-cudnn"
        assert order.index("flash-attn-4") == order.index("sdpa-flash") + 1
    assert sorted(order) == sorted(set(order)) and {"sdpa", "math"} <= set(order)


def test_auto_rule_is_data(hopper, monkeypatch):
    assert not fa4.auto_first(cuda_call(sq=1024, sk=1024, d=80))
    monkeypatch.setattr(fa4, "AUTO_FIRST", fa4.AUTO_FIRST + ((9, 80, 1024, 1024, 128),))
    assert ad.auto_order(cuda_call(sq=1024, sk=1024, d=80))[0] == "flash-attn-4"
    hopper["value"] = (10, 0)  # measured on Hopper only
    assert ad.auto_order(cuda_call(d=40))[0] == "sdpa-cudnn"


def test_auto_picks_fa4_when_it_can_serve(hopper, fake_fa4, monkeypatch):
    c = cuda_call()
    assert ad.choose(c.q, c.k, c.v, scale=c.scale) == "flash-attn-4"
    monkeypatch.setitem(sys.modules, "flash_attn.cute", None)
    fa4._load.cache_clear()
    ad._cache.clear()
    assert ad.choose(c.q, c.k, c.v, scale=c.scale) != "flash-attn-4"  # not installed: the next one


def test_auto_never_offers_it_for_fp32_or_the_vae(hopper):
    assert "flash-attn-4" not in ad.auto_order(cuda_call(dtype=torch.float32))
    assert "flash-attn-4" not in ad.auto_order(cuda_call(b=1, h=1, d=512))


# ---------------------------------------------------------------------------------------------- import order
@pytest.mark.slow  # a real subprocess: seconds
@pytest.mark.parametrize("first", ["diffusers.flash.attention.fa4", "diffusers.flash.attention.dispatch"])
def test_either_module_imports_first(first):
    code = (f"import importlib; importlib.import_module({first!r}); "
            "from diffusers.flash.attention import dispatch as ad; from diffusers.flash.attention import fa4; "
            "assert isinstance(ad.BACKENDS['flash-attn-4'], fa4.FlashAttention4)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
