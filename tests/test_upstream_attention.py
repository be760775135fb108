"""On whatever release the tree is at: the UNet's and the VAE's attention go through our dispatcher, and
(0.35 and later) a backend named through upstream's own API is obeyed instead."""
from __future__ import annotations

import importlib

import pytest

torch = pytest.importorskip("torch")

from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402
from diffusers.flash.attention import dispatch, upstream_choice, upstream_dispatch  # noqa: E402
from diffusers.flash.attention.pinning import attention_classes  # noqa: E402


def _upstream():
    """Upstream's dispatcher module (0.35 and later), else skip with the reason."""
    try:
        mod = importlib.import_module(upstream_choice.UPSTREAM_MODULE)
    except ModuleNotFoundError:  # 0.5-0.34: no such module (at the pin it is an alias of our dispatcher)
        mod = None
    if not hasattr(mod, "_AttentionBackendRegistry"):
        pytest.skip("this release has no attention backend API of upstream's own (it came in 0.35)")
    return mod


def _unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8).eval()


def _vae():
    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(32, 64), latent_channels=4,
                         down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                         up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D")).eval()


def _run_unet(unet):
    with torch.no_grad():
        out = unet(torch.randn(1, 4, 8, 8), 1, encoder_hidden_states=torch.randn(1, 4, 32))
    return out.sample if hasattr(out, "sample") else out["sample"]


def _run_vae(vae):
    with torch.no_grad():
        out = vae(torch.randn(1, 3, 16, 16))
    return out.sample if hasattr(out, "sample") else out["sample"]


@pytest.fixture
def spy(monkeypatch):
    """Counts our dispatcher's calls and the attention modules' calls."""
    calls = {"ours": 0, "modules": 0}
    real = dispatch.attention

    def counting(*args, **kwargs):
        calls["ours"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(dispatch, "attention", counting)
    return calls


def _count_modules(model, calls):
    def hook(*_):
        calls["modules"] += 1

    mods = [m for m in model.modules() if isinstance(m, attention_classes())]
    assert mods, "no attention module found: the models changed shape"
    for m in mods:
        m.register_forward_hook(hook)


@pytest.mark.parametrize("build, run", [(_unet, _run_unet), (_vae, _run_vae)], ids=["unet", "vae"])
def test_every_attention_call_goes_through_our_dispatcher(spy, build, run):
    model = build()
    _count_modules(model, spy)
    out = run(model)
    assert torch.isfinite(out).all()
    assert spy["modules"] > 0 and spy["ours"] == spy["modules"], spy


@pytest.mark.parametrize("build, run", [(_unet, _run_unet), (_vae, _run_vae)], ids=["unet", "vae"])
def test_a_backend_of_ours_that_cannot_serve_on_cpu_refuses(build, run):
    model = build()
    with dispatch.attention_backend("sdpa-cudnn"), pytest.raises(dispatch.AttentionBackendError, match="sdpa-cudnn"):
        run(model)
    model.set_attention_backend("sdpa-cudnn")
    assert all(m._attention_backend == "sdpa-cudnn" for m in model.modules() if isinstance(m, attention_classes()))
    with pytest.raises(dispatch.AttentionBackendError, match="sdpa-cudnn"):
        run(model)
    model.set_attention_backend("auto")
    assert torch.isfinite(run(model)).all()


@pytest.fixture
def upstream(monkeypatch):
    """Upstream's dispatcher with a counter on its _native_math backend; its state restored afterwards."""
    mod = _upstream()
    reg = mod._AttentionBackendRegistry
    name = mod.AttentionBackendName._NATIVE_MATH
    calls = {"upstream": 0}
    real = reg._backends[name]

    def counting(*args, **kwargs):
        calls["upstream"] += 1
        return real(*args, **kwargs)

    monkeypatch.setitem(reg._backends, name, counting)
    monkeypatch.setattr(reg, "_active_backend", reg._active_backend)
    monkeypatch.setattr(upstream_choice.named, "explicit", False)
    monkeypatch.delenv(upstream_choice.UPSTREAM_ENV, raising=False)
    return mod, calls


@pytest.mark.parametrize("build, run", [(_unet, _run_unet), (_vae, _run_vae)], ids=["unet", "vae"])
def test_a_backend_named_through_upstreams_context_wins(spy, upstream, build, run):
    mod, calls = upstream
    model = build()
    _count_modules(model, spy)
    with mod.attention_backend("_native_math"):
        run(model)
    assert spy["ours"] == 0 and calls["upstream"] == spy["modules"] > 0, (spy, calls)
    assert upstream_choice.upstream_backend() is None  # the context is over: ours again
    run(model)
    assert spy["ours"] > 0


def test_a_backend_named_through_upstreams_model_method_wins(spy, upstream):
    mod, calls = upstream
    import diffusers
    from packaging.version import Version

    if Version(Version(diffusers.__version__).base_version) < Version("0.37"):
        pytest.skip("upstream's ModelMixin.set_attention_backend before 0.37 sets only processors that have an "
                    "_attention_backend (the transformer models'), never the UNet's: there is no choice to obey")
    unet = _unet()
    unet.set_attention_backend("_native_math")  # upstream's name: upstream's method
    assert all(getattr(m, "_attention_backend", None) is None for m in unet.modules()
               if isinstance(m, attention_classes()))  # no pin of ours
    _run_unet(unet)
    assert spy["ours"] == 0 and calls["upstream"] > 0
    unet.set_attention_backend("math")  # our name: our mixin, through upstream's method
    assert all(m._attention_backend == "math" for m in unet.modules() if isinstance(m, attention_classes()))
    with pytest.raises(dispatch.AttentionBackendError, match="unknown attention backend 'no-such-backend'"):
        unet.set_attention_backend("no-such-backend")  # neither's: refused naming our backends


def test_dispatch_attention_fn_is_served_by_auto_unless_upstream_is_named(spy, upstream):
    mod, calls = upstream
    q, k, v = (torch.randn(2, 16, 4, 8) for _ in range(3))  # upstream's layout: (batch, seq, heads, head dim)
    want = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                             v.transpose(1, 2)).transpose(1, 2)
    got = mod.dispatch_attention_fn(q, k, v)
    assert spy["ours"] == 1 and calls["upstream"] == 0
    torch.testing.assert_close(got, want)
    with mod.attention_backend("_native_math"):
        got = mod.dispatch_attention_fn(q, k, v)
    assert spy["ours"] == 1 and calls["upstream"] == 1
    torch.testing.assert_close(got, want)
    with dispatch.attention_backend("sdpa-cudnn"), pytest.raises(dispatch.AttentionBackendError):
        mod.dispatch_attention_fn(q, k, v)  # named ours: ours serves, and says it cannot here


def _flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16,
                                  axes_dims_rope=[2, 2, 4]).eval()


def _run_flux(model):
    torch.manual_seed(1)  # the same inputs every call
    with torch.no_grad():
        return model(hidden_states=torch.randn(1, 16, 4), encoder_hidden_states=torch.randn(1, 5, 16),
                     pooled_projections=torch.randn(1, 16), timestep=torch.tensor([0.5]), img_ids=torch.zeros(16, 3),
                     txt_ids=torch.zeros(5, 3)).sample


def test_a_backend_of_ours_set_on_a_transformer_model_reaches_upstreams_dispatcher(spy, upstream, monkeypatch):
    """0.35 and later: a transformer model's processors call upstream's dispatch_attention_fn with their own
    backend; our set_attention_backend pins ours there, upstream's own names still win."""
    mod, calls = upstream
    model = _flux()
    processors = [m.processor for m in model.modules() if hasattr(getattr(m, "processor", None), "_attention_backend")]
    assert processors, "no processor with an upstream backend slot: the model changed shape"
    seen = []
    real = dispatch.attention
    monkeypatch.setattr(dispatch, "attention", lambda *a, **k: seen.append(a[4] if len(a) > 4 else k.get("backend"))
                        or real(*a, **k))
    plain = _run_flux(model)  # auto: our dispatcher serves upstream's calls
    assert seen and set(seen) == {"auto"} and calls["upstream"] == 0, (seen, calls)
    model.set_attention_backend("math")
    assert all(p._attention_backend == "math" and isinstance(p._attention_backend, upstream_dispatch.Pinned)
               for p in processors)
    seen.clear()
    torch.testing.assert_close(_run_flux(model), plain)
    assert seen and set(seen) == {"math"} and calls["upstream"] == 0, (seen, calls)
    model.set_attention_backend("sdpa-cudnn")
    with pytest.raises(dispatch.AttentionBackendError, match="sdpa-cudnn"):
        _run_flux(model)  # named ours: ours serves, and says why it cannot on the CPU
    model.set_attention_backend("_native_math")  # upstream's name: upstream's method and registry
    assert all(not isinstance(p._attention_backend, upstream_dispatch.Pinned) for p in processors)
    seen.clear()
    _run_flux(model)
    assert not seen and calls["upstream"] > 0
    model.set_attention_backend("auto")  # unpins ours only: upstream's own choice stays
    assert all(p._attention_backend == mod.AttentionBackendName._NATIVE_MATH for p in processors)


@pytest.fixture
def fake_upstream(monkeypatch):
    """Upstream's dispatcher as 0.35 and later has it, faked on whatever release the tree is at: a registry whose
    active backend came from $DIFFUSERS_ATTN_BACKEND, and a dispatch_attention_fn that counts its calls."""
    import sys
    import types

    calls = []

    class Registry:
        _active_backend = "native"

    def dispatch_attention_fn(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                              enable_gqa=False):
        calls.append(query.shape)
        out = torch.nn.functional.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2),
                                                               value.transpose(1, 2), scale=scale)
        return out.transpose(1, 2)

    fake = types.ModuleType(upstream_choice.UPSTREAM_MODULE)
    fake._AttentionBackendRegistry, fake.dispatch_attention_fn = Registry, dispatch_attention_fn
    monkeypatch.setitem(sys.modules, upstream_choice.UPSTREAM_MODULE, fake)
    monkeypatch.setattr(upstream_choice.named, "explicit", False)
    monkeypatch.setattr(upstream_choice.named, "depth", 0)
    monkeypatch.setattr(upstream_choice, "_warned", set())
    monkeypatch.setattr(dispatch, "_default", None)
    warned = []
    monkeypatch.setattr(upstream_choice.logger, "warning", lambda msg, *a: warned.append(msg))
    return calls, warned


def test_upstreams_env_variable_overriding_ours_is_said_once(fake_upstream, monkeypatch):
    """0.40 and later: $DIFFUSERS_ATTN_BACKEND (upstream's) wins over $DIFFUSERS_ATTENTION_BACKEND (ours), and a
    warning naming both says so, once."""
    from diffusers.flash.attention import hooks

    calls, warned = fake_upstream
    q, k, v = (torch.randn(1, 2, 6, 8) for _ in range(3))
    monkeypatch.setenv(upstream_choice.UPSTREAM_ENV, "native")
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    hooks.sdpa(q, k, v)
    assert len(calls) == 1 and warned == []  # upstream's alone is set: nothing of ours is overridden
    monkeypatch.setenv(dispatch.ENV_VAR, "math")
    for _ in range(3):
        torch.testing.assert_close(hooks.sdpa(q, k, v), torch.nn.functional.scaled_dot_product_attention(q, k, v))
    assert len(calls) == 4  # upstream's setting wins
    assert len(warned) == 1, warned
    assert all(s in warned[0] for s in ("$DIFFUSERS_ATTN_BACKEND=native", "$DIFFUSERS_ATTENTION_BACKEND=math",
                                        "overrides", "runs on upstream's 'native'")), warned[0]
    monkeypatch.delenv(dispatch.ENV_VAR)
    dispatch.set_attention_backend("sdpa")  # ours, set through our API this time
    hooks.sdpa(q, k, v)
    assert len(warned) == 2 and "set_attention_backend('sdpa')" in warned[1], warned
    with dispatch.attention_backend("math"):
        hooks.sdpa(q, k, v)
    assert len(warned) == 3 and "with attention_backend('math')" in warned[2], warned
    dispatch.set_attention_backend("auto")  # auto names nothing: nothing of ours is overridden
    hooks.sdpa(q, k, v)
    assert len(warned) == 3, warned
    dispatch.set_attention_backend(None)
    monkeypatch.delenv(upstream_choice.UPSTREAM_ENV)
    hooks.sdpa(q, k, v)
    assert len(calls) == 7 and len(warned) == 3  # no upstream setting: ours serves, nothing to say


def test_serve_hands_upstreams_calls_to_our_dispatcher_on_any_release(fake_upstream, monkeypatch):
    """upstream_dispatch.serve, the hook at the top of upstream's dispatch_attention_fn, called as that function
    calls it (tensors (batch, seq, heads, head dim)), with upstream's registry faked where the tree has none."""
    calls, _ = fake_upstream
    monkeypatch.delenv(upstream_choice.UPSTREAM_ENV, raising=False)
    q, k, v = (torch.randn(2, 6, 3, 8) for _ in range(3))
    want = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                             v.transpose(1, 2)).transpose(1, 2)
    seen = []
    real = dispatch.attention
    monkeypatch.setattr(dispatch, "attention", lambda *a, **kw: seen.append(a[4]) or real(*a, **kw))

    def serve(backend=None, attn_mask=None, attention_kwargs=None):
        return upstream_dispatch.serve(q, k, v, attn_mask, 0.0, False, None, False, attention_kwargs, backend, None)

    torch.testing.assert_close(serve(), want)
    torch.testing.assert_close(serve(upstream_dispatch.Pinned("math")), want, atol=1e-5, rtol=1e-5)
    assert seen == ["auto", "math"]
    with dispatch.attention_backend("sdpa"):  # the with block wins over a pin, as on our own modules
        serve(upstream_dispatch.Pinned("math"))
    assert seen[-1] == "sdpa"
    with pytest.raises(dispatch.AttentionBackendError, match="sdpa-cudnn"):
        serve(upstream_dispatch.Pinned("sdpa-cudnn"))
    with pytest.raises(dispatch.AttentionBackendError, match="backend-specific keywords"):
        serve(upstream_dispatch.Pinned("math"), attention_kwargs={"window": 4})
    assert serve(attn_mask=torch.zeros(2, 3, 6, 6)) is None  # a mask under auto: upstream's native
    assert serve("native") is None  # upstream's own backend name on the processor
    monkeypatch.setenv(upstream_choice.UPSTREAM_ENV, "native")
    assert serve() is None and serve(upstream_dispatch.Pinned("math")) is None  # named upstream's way: it wins
    assert seen == ["auto", "math", "sdpa", "sdpa-cudnn"] and calls == []


def _sd3():
    import diffusers

    if not hasattr(diffusers, "SD3Transformer2DModel"):
        pytest.skip("this release has no SD3 transformer (it came in 0.29)")
    torch.manual_seed(0)
    return diffusers.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1,
                                           attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                           caption_projection_dim=16, pooled_projection_dim=16, out_channels=4).eval()


def _run_sd3(model):
    torch.manual_seed(1)
    with torch.no_grad():
        return model(hidden_states=torch.randn(1, 4, 8, 8), encoder_hidden_states=torch.randn(1, 5, 16),
                     pooled_projections=torch.randn(1, 16), timestep=torch.tensor([1])).sample


def test_sd3s_joint_attention_goes_through_our_dispatcher(spy, monkeypatch):
    """SD3's processor (JointAttnProcessor2_0) calls F.scaled_dot_product_attention itself, not upstream's
    dispatch_attention_fn: every one of its calls reaches our dispatcher too, and ``math`` named globally serves
    them (H100, 2026-12-07: SD3 at 1024x1024 ran torch's own SDPA under the fork's ``math``, so its reference
    row was not ours)."""
    model = _sd3()
    calls = []
    for m in model.modules():
        if type(getattr(m, "processor", None)).__name__ == "JointAttnProcessor2_0":
            m.register_forward_hook(lambda *_: calls.append(1))
    assert calls == [] and any(type(getattr(m, "processor", None)).__name__ == "JointAttnProcessor2_0"
                               for m in model.modules()), "no joint attention processor: the model changed shape"
    seen = []
    real = dispatch.attention
    monkeypatch.setattr(dispatch, "attention", lambda *a, **k: seen.append(a[4] if len(a) > 4 else k.get("backend"))
                        or real(*a, **k))
    plain = _run_sd3(model)
    assert calls and len(seen) == len(calls) and set(seen) == {"auto"}, (len(calls), seen)
    seen.clear()
    with dispatch.attention_backend("math"):
        torch.testing.assert_close(_run_sd3(model), plain, atol=1e-5, rtol=1e-4)
    assert seen and set(seen) == {"math"}, seen


def test_a_pin_that_cannot_reach_sd3s_joint_attention_says_so(log):
    """A model's pin reaches the calls made with the attention module at hand; SD3's joint attention calls
    F.scaled_dot_product_attention with none, so it follows the process-wide backend: pinning says so in one
    line, naming the processor, and pinning a UNet (every call reachable) says nothing."""
    model = _sd3()
    model.set_attention_backend("math")
    said = [r.getMessage() for r in log.records if "set_attention_backend('math')" in r.getMessage()]
    assert len(said) == 1 and "JointAttnProcessor2_0" in said[0] and "process-wide" in said[0], said
    log.clear()
    model.set_attention_backend("auto")  # unpinning: nothing to say
    _unet().set_attention_backend("math")
    assert not [r for r in log.records if "set_attention_backend" in r.getMessage()]
