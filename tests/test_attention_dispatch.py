"""The attention dispatcher on the CPU: numerics against a float64 reference on fresh random inputs,
slicing, edge inputs, and the dispatcher's logic with stand-in backends."""
import logging as pylogging
import inspect
import math

import pytest
import torch

from diffusers.flash.attention import dispatch as ad

try:
    from diffusers.models.attention import AttentionBlock, CrossAttention
except ImportError:  # 0.15 and later: processors, tested in the files named below
    pytest.skip("this release has no CrossAttention/AttentionBlock modules (0.4-0.14): its processors are tested "
                "in test_attention_processor_primitives.py and test_upstream_attention.py", allow_module_level=True)

CPU_BACKENDS = [n for n, ok, _ in ad.backend_status() if ok and n in ("math", "sdpa")]


def reference(q, k, v, scale):
    q, k, v = q.double(), k.double(), v.double()
    return torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1) @ v


def rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


@pytest.fixture(autouse=True)
def clean_state(monkeypatch):
    monkeypatch.delenv(ad.ENV_VAR, raising=False)
    ad.set_attention_backend(None)
    ad._cache.clear()
    yield
    ad.set_attention_backend(None)
    ad._cache.clear()


# ------------------------------------------------------------------------------------------ numerics
@pytest.mark.parametrize("backend", CPU_BACKENDS + ["auto"])
@pytest.mark.parametrize("head_dim", [40, 80, 160, 512, 24, 72, 200, 320])
def test_matches_float64_reference(backend, head_dim):
    sk = 77 if head_dim == 40 else 33  # cross-attention length for one case
    q, k, v = rand(2, 3, 50, head_dim), rand(2, 3, sk, head_dim), rand(2, 3, sk, head_dim)
    scale = head_dim**-0.5
    out = ad.attention(q, k, v, scale, backend=backend)
    torch.testing.assert_close(out.double(), reference(q, k, v, scale), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_inputs(backend):
    # (B, S, H, D) memory seen as (B, H, S, D), as the attention modules hand them over
    q, k, v = (rand(2, 64, 4, 40).transpose(1, 2) for _ in range(3))
    assert not q.is_contiguous()
    out = ad.attention(q, k, v, 40**-0.5, backend=backend)
    torch.testing.assert_close(out.double(), reference(q, k, v, 40**-0.5), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nan_and_inf_propagate_as_math(backend):
    q, k, v = rand(1, 2, 16, 8), rand(1, 2, 16, 8), rand(1, 2, 16, 8)
    q[0, 0, 3, 1] = float("nan")
    v[0, 1, 5, 2] = float("inf")
    k[0, 1, 7, 0] = float("-inf")
    out = ad.attention(q, k, v, 8**-0.5, backend=backend)
    ref = ad.attention(q, k, v, 8**-0.5, backend="math")
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    assert torch.isnan(out).any()  # the poisoned rows really are poisoned
    finite = torch.isfinite(ref)
    torch.testing.assert_close(out[finite], ref[finite], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_auto_agrees_with_math_and_float64_on_non_finite_inputs(dtype):
    """A single inf in q or k, drawn fresh: PyTorch's fused CPU kernel returns finite numbers (zeros, or in
    bf16 a finite row) for some rows that math and float64 give as NaN; auto must never hide a NaN."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    hidden = 0
    for _ in range(300):
        q, k, v = (torch.randn(1, 2, n, 16, generator=gen).to(dtype) for n in (6, 2, 2))  # 2 keys: all -inf often
        t = (q, k)[int(torch.randint(0, 2, (), generator=gen))]
        idx = tuple(int(torch.randint(0, n, (), generator=gen)) for n in t.shape)
        t[idx] = float("inf") if torch.rand((), generator=gen) < 0.5 else float("-inf")
        ref = torch.isnan(reference(q, k, v, 0.25))
        fused = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.25)
        hidden += int(not torch.equal(torch.isnan(fused), ref))
        for backend in ("auto", "math"):
            assert torch.equal(torch.isnan(ad.attention(q, k, v, 0.25, backend=backend)), ref), backend
    # the check means something only where the fused kernel really differs on some of these inputs
    assert hidden > 0, "PyTorch's CPU SDPA now propagates NaN like math: the guard in auto may go"


def test_auto_on_finite_cpu_inputs_still_uses_the_fused_kernel(monkeypatch):
    calls = []
    monkeypatch.setattr(ad, "_sdpa", lambda q, k, v, scale: calls.append(1) or ad.BACKENDS["math"].run(
        ad.Call(q, k, v, scale)))
    q, k, v = rand(1, 2, 8, 16), rand(1, 2, 8, 16), rand(1, 2, 8, 16)
    ad.attention(q, k, v, 0.25, backend="auto")
    assert calls == [1]
    q[0, 0, 0, 0] = float("inf")
    ad.attention(q, k, v, 0.25, backend="auto")
    assert calls == [1]  # the non-finite call went to math


@pytest.mark.parametrize("slice_size", [-8, 0, 2.5, True, "auto"])
def test_bad_slice_sizes_are_refused_in_one_line(slice_size):
    q, k, v = rand(2, 4, 8, 16), rand(2, 4, 8, 16), rand(2, 4, 8, 16)
    with pytest.raises(ValueError, match="attention slice size must be a positive whole number") as err:
        ad.attention(q, k, v, 0.25, backend="math", slice_size=slice_size)
    assert "\n" not in str(err.value)


def test_negative_slice_size_through_the_model_is_refused_clearly():
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, norm_num_groups=4, cross_attention_dim=8, attention_head_dim=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval()
    if hasattr(CrossAttention, "set_processor"):  # 0.12+: upstream's sliced processor slices; refused as it is set
        with pytest.raises(ValueError, match="got -8"):
            unet.set_attention_slice(-8)
        return
    unet.set_attention_slice(-8)  # upstream's own check lets it through (8 % -8 == 0)
    with pytest.raises(ValueError, match="got -8"), torch.no_grad():
        unet(torch.randn(1, 4, 8, 8), 10, encoder_hidden_states=torch.randn(1, 3, 8))


def test_plan_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(ad, "CACHE_LIMIT", 40)
    for n in range(1, 200):
        ad.attention(rand(1, 1, n, 8), rand(1, 1, 3, 8), rand(1, 1, 3, 8), backend="math")
        assert len(ad._cache) <= 40
    # the most recent plans survive and still serve
    q, k, v = rand(1, 1, 199, 8), rand(1, 1, 3, 8), rand(1, 1, 3, 8)
    torch.testing.assert_close(ad.attention(q, k, v, 8**-0.5, backend="math").double(),
                               reference(q, k, v, 8**-0.5), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("slice_size", [1, 3, 4, 5, 7, 12])
def test_sliced_equals_unsliced(backend, slice_size):
    q, k, v = rand(3, 4, 20, 16), rand(3, 4, 9, 16), rand(3, 4, 9, 16)  # 12 rows of batch x heads
    whole = ad.attention(q, k, v, 0.25, backend=backend)
    sliced = ad.attention(q, k, v, 0.25, backend=backend, slice_size=slice_size)
    torch.testing.assert_close(sliced, whole, rtol=1e-6, atol=1e-6)


def test_batch_heads_over_limit_go_in_chunks(monkeypatch):
    seen = []
    real = ad.BACKENDS["math"].run

    def spy(c):
        seen.append(c.q.shape[0] * c.q.shape[1])
        return real(c)

    monkeypatch.setattr(ad.BACKENDS["math"], "run", spy)
    monkeypatch.setattr(ad, "MAX_BATCH_HEADS", 6)
    q, k, v = rand(5, 3, 10, 8), rand(5, 3, 10, 8), rand(5, 3, 10, 8)
    out = ad.attention(q, k, v, 8**-0.5, backend="math")
    assert max(seen) <= 6 and sum(seen) == 15
    torch.testing.assert_close(out.double(), reference(q, k, v, 8**-0.5), rtol=1e-5, atol=1e-5)


def test_bad_shapes_are_refused_clearly():
    with pytest.raises(ValueError, match="4-d"):
        ad.attention(rand(2, 10, 8), rand(2, 10, 8), rand(2, 10, 8))
    with pytest.raises(ValueError, match="incompatible shapes"):
        ad.attention(rand(1, 2, 10, 8), rand(1, 2, 10, 4), rand(1, 2, 10, 4))


# ------------------------------------------------------------------------------------------ the modules
# upstream 0.7 renamed CrossAttention's context_dim to cross_attention_dim (and made to_out a ModuleList) and
# AttentionBlock's num_groups to norm_num_groups
GROUPS = next(k for k in ("num_groups", "norm_num_groups") if k in inspect.signature(AttentionBlock).parameters)
CONTEXT_DIM = next(k for k in ("context_dim", "cross_attention_dim")
                   if k in inspect.signature(CrossAttention).parameters)


def to_out(attn, hidden_states):
    out = attn.to_out
    return torch.nn.Sequential(*out)(hidden_states) if isinstance(out, torch.nn.ModuleList) else out(hidden_states)


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["auto"])
def test_cross_attention_module_sliced_and_not(backend):
    torch.manual_seed(0)
    # query_dim == heads x dim_head: 0.13's AttnProcessor2_0 takes its head dim from query_dim (upstream's defect)
    attn = CrossAttention(query_dim=80, heads=4, dim_head=20, **{CONTEXT_DIM: 48}).eval()
    x, ctx = rand(3, 30, 80), rand(3, 11, 48)
    q = attn.to_q(x).unflatten(-1, (4, 20)).transpose(1, 2)
    k = attn.to_k(ctx).unflatten(-1, (4, 20)).transpose(1, 2)
    v = attn.to_v(ctx).unflatten(-1, (4, 20)).transpose(1, 2)
    expected = to_out(attn, reference(q, k, v, 20**-0.5).float().transpose(1, 2).flatten(2))
    with torch.no_grad():
        with ad.attention_backend(backend):
            plain = attn(x, ctx)  # context=, encoder_hidden_states= from 0.11
            attn._slice_size = 5  # does not divide 12 rows: upstream 0.4.2 left the last rows at zero
            sliced = attn(x, ctx)
    torch.testing.assert_close(plain, expected.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sliced, plain, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["auto"])
def test_vae_attention_block(backend):
    torch.manual_seed(0)
    block = AttentionBlock(64, **{GROUPS: 8}).eval()
    x = rand(2, 64, 8, 8)
    with torch.no_grad(), ad.attention_backend("math"):
        ref = block(x)
    with torch.no_grad(), ad.attention_backend(backend):
        out = block(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # and math itself against float64 written out independently
    with torch.no_grad():
        h = block.group_norm(x).flatten(2).transpose(1, 2)
        q, k, v = block.query(h), block.key(h), block.value(h)
        att = torch.softmax(q.double() @ k.double().transpose(1, 2) / math.sqrt(64), -1) @ v.double()
        manual = block.proj_attn(att.float()).transpose(1, 2).reshape(x.shape) + x
    torch.testing.assert_close(ref, manual, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ dispatcher logic
class StandIn(ad.Backend):
    def __init__(self, name, devices=("cpu",), dtypes=None, max_head_dim=None):
        self.name, self.devices, self.dtypes, self.max_head_dim = name, devices, dtypes, max_head_dim
        self.calls = 0

    def unavailable(self):
        return None

    def run(self, c):
        self.calls += 1
        return ad.BACKENDS["math"].run(c)


@pytest.fixture
def stand_ins(monkeypatch):
    fast = StandIn("fast", dtypes=(torch.float16,))  # refuses fp32
    mid = StandIn("mid", max_head_dim=64)
    slow = StandIn("slow")
    backends = {"fast": fast, "mid": mid, "slow": slow, "math": ad.BACKENDS["math"]}
    monkeypatch.setattr(ad, "BACKENDS", backends)
    monkeypatch.setattr(ad, "NAMES", (ad.AUTO,) + tuple(backends))
    monkeypatch.setattr(ad, "auto_order", lambda c: ["fast", "mid", "slow", "math"])
    return backends


@pytest.fixture
def debug_log():
    records = []

    class Keep(pylogging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    root = pylogging.getLogger("diffusers")
    handler, level = Keep(level=pylogging.DEBUG), root.level
    root.addHandler(handler)
    root.setLevel(pylogging.DEBUG)
    yield records
    root.removeHandler(handler)
    root.setLevel(level)


def test_auto_takes_first_eligible_and_logs_why_once(stand_ins, debug_log):
    q = rand(1, 2, 8, 32)
    assert ad.choose(q, q, q) == "mid"
    assert ad.choose(q, q, q) == "mid"
    chosen = [m for m in debug_log if "attention auto" in m]
    assert len(chosen) == 1, debug_log
    assert "mid" in chosen[0] and "fast (dtype float32 not in {float16})" in chosen[0]
    big = rand(1, 2, 8, 128)  # a new shape: head dim too large for "mid"
    assert ad.choose(big, big, big) == "slow"
    chosen = [m for m in debug_log if "attention auto" in m]
    assert len(chosen) == 2 and "head dim 128 > 64" in chosen[1]
    ad.attention(big, big, big)
    assert stand_ins["slow"].calls == 1


def test_explicit_backend_that_cannot_serve_raises_with_reasons(stand_ins):
    q = rand(1, 2, 8, 128)
    with pytest.raises(ad.AttentionBackendError, match=r"'mid' cannot serve.*head dim 128 > 64"):
        ad.attention(q, q, q, backend="mid")
    with pytest.raises(ad.AttentionBackendError, match="dtype float32 not in"):
        with ad.attention_backend("fast"):
            ad.attention(q, q, q)


def test_no_backend_lists_every_reason(stand_ins, monkeypatch):
    monkeypatch.setattr(ad, "auto_order", lambda c: ["fast", "mid"])
    q = rand(1, 2, 8, 128)
    with pytest.raises(ad.AttentionBackendError, match=r"no attention backend(.|\n)*fast: dtype(.|\n)*mid: head dim"):
        ad.attention(q, q, q)


def test_unknown_names_refused_when_set():
    with pytest.raises(ad.AttentionBackendError, match="unknown attention backend 'flash3'"):
        ad.set_attention_backend("flash3")
    with pytest.raises(ad.AttentionBackendError):
        with ad.attention_backend("nope"):
            pass
    from diffusers import UNet2DModel

    model = UNet2DModel(block_out_channels=(32, 64), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                        up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    with pytest.raises(ad.AttentionBackendError, match="unknown attention backend 'bogus'"):
        model.set_attention_backend("bogus")


def test_env_var_and_precedence(monkeypatch, stand_ins):
    monkeypatch.setenv(ad.ENV_VAR, "slow")
    module = CrossAttention(8, heads=2, dim_head=4)
    assert ad.backend_for(module) == "slow"
    ad.set_attention_backend("mid")
    assert ad.backend_for(module) == "mid"
    module._attention_backend = "math"
    assert ad.backend_for(module) == "math"
    with ad.attention_backend("fast"):
        assert ad.backend_for(module) == "fast"
        with ad.attention_backend("slow"):
            assert ad.backend_for(module) == "slow"
        assert ad.backend_for(module) == "fast"
    assert ad.backend_for(module) == "math"
    monkeypatch.setenv(ad.ENV_VAR, "warp-drive")
    ad.set_attention_backend(None)
    with pytest.raises(ad.AttentionBackendError, match=r"\$DIFFUSERS_ATTENTION_BACKEND: unknown"):
        ad.backend_for()


def test_model_and_pipeline_setters_reach_every_attention_module():
    from diffusers.flash import local_pipelines

    pipe = local_pipelines.stable_diffusion("tiny")
    pipe.set_attention_backend("math")
    mods = [m for model in (pipe.unet, pipe.vae) for m in model.modules()
            if isinstance(m, (CrossAttention, AttentionBlock))]
    assert mods and all(m._attention_backend == "math" for m in mods)
    pipe.unet.set_attention_backend("sdpa")
    assert all(m._attention_backend == "sdpa" for m in pipe.unet.modules() if isinstance(m, CrossAttention))
    assert all(m._attention_backend == "math" for m in pipe.vae.modules() if isinstance(m, AttentionBlock))


def test_backend_status_lists_every_backend_with_a_reason():
    status = {n: (ok, why) for n, ok, why in ad.backend_status()}
    assert set(status) == set(ad.BACKENDS)
    assert status["math"][0] and status["sdpa"][0]
    for name, (ok, why) in status.items():
        assert ok or why and why != "available", name
    if not torch.cuda.is_available():
        assert status["sdpa-cudnn"] == (False, "no CUDA device")


def test_auto_order_rules():
    from types import SimpleNamespace as NS

    def call(device, dtype, d=40, grad=False, b=2, sq=4096, sk=4096):
        q = NS(device=torch.device(device), dtype=dtype, requires_grad=grad, shape=(b, 8, sq, d),
               element_size=lambda: torch.empty((), dtype=dtype).element_size())
        k = NS(device=q.device, dtype=dtype, requires_grad=False, shape=(b, 8, sk, d))
        return ad.Call(q, k, k, d**-0.5, upcast=d == 512)

    assert ad.auto_order(call("cpu", torch.float32)) == ["sdpa", "math"]
    for d in (40, 80, 160, 24, 200):
        assert ad.auto_order(call("cuda", torch.float16, d))[0] == "sdpa-cudnn"
    assert ad.auto_order(call("cuda", torch.float16, 512, b=1))[0] == "math"  # the VAE: batched matmuls win
    assert ad.auto_order(call("cuda", torch.float16, 512, b=64))[0] == "sdpa-efficient"  # scores over budget
    assert ad.auto_order(call("cuda", torch.float32))[0] == "sdpa-efficient"
    # never by grad mode: gradient checkpointing re-runs forwards under no_grad and must match
    with torch.enable_grad():
        assert ad.auto_order(call("cuda", torch.float32, grad=True)) == ad.auto_order(call("cuda", torch.float32))



def test_upstream_xformers_switch_goes_to_our_memory_efficient_backend(monkeypatch):
    """Upstream's xformers switch (0.7-0.11: CrossAttention/AttentionBlock._use_memory_efficient_attention_xformers)
    picks our memory-efficient backend in the dispatcher, below a backend named for the module; upstream's own
    xformers call is never made (on the CPU the backend refuses, with its reason)."""
    attn = CrossAttention(32, heads=2, dim_head=16).eval()
    x = rand(1, 8, 32)
    assert ad.backend_for(attn) == "auto"
    attn._use_memory_efficient_attention_xformers = True
    assert ad.backend_for(attn) == ad.XFORMERS_BACKEND == "sdpa-efficient"
    monkeypatch.setattr(type(attn), "_memory_efficient_attention_xformers",
                        lambda *a: pytest.fail("upstream's xformers path was taken"), raising=False)
    with torch.no_grad(), pytest.raises(ad.AttentionBackendError, match="sdpa-efficient"):
        attn(x)
    attn._attention_backend = "math"  # set_attention_backend() on the module wins over the switch
    assert ad.backend_for(attn) == "math"
    with torch.no_grad():
        attn(x)


def test_attention_mask_is_served_by_math_or_refused():
    """From 0.11 CrossAttention passes an additive attention_mask, (B x heads)-batched; the dispatcher computes
    upstream's math with it, and a module set to another backend refuses the call, naming the mask."""
    b, heads, sq, sk, d = 2, 2, 5, 3, 8
    module = torch.nn.Module()
    module.heads, module.scale, module._slice_size = heads, d ** -0.5, None
    q, k, v = rand(b, sq, heads * d), rand(b, sk, heads * d), rand(b, sk, heads * d)
    mask = torch.zeros(b * heads, 1, sk)
    mask[:, :, -1] = -10000.0
    out = ad.cross_attention(module, q, k, v, attention_mask=mask)

    def bh(t):  # upstream's reshape_heads_to_batch_dim
        return t.reshape(b, t.shape[1], heads, d).permute(0, 2, 1, 3).reshape(b * heads, t.shape[1], d)

    scores = torch.baddbmm(torch.empty(b * heads, sq, sk), bh(q), bh(k).transpose(-1, -2), beta=0, alpha=module.scale)
    ref = torch.bmm((scores + mask).softmax(dim=-1), bh(v))
    ref = ref.reshape(b, heads, sq, d).permute(0, 2, 1, 3).reshape(b, sq, heads * d)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(out, ad.cross_attention(module, q[..., :], k[:, :-1], v[:, :-1]), atol=1e-5, rtol=1e-4)
    module._attention_backend = "sdpa-efficient"
    with pytest.raises(ad.AttentionBackendError, match="attention_mask"):
        ad.cross_attention(module, q, k, v, attention_mask=mask)
