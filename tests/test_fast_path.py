"""The fast path: on the CPU it says why it does not apply and changes nothing; on CUDA the graphed UNet,
VAE decode and text encoder (and the compiled path) give the same images as the plain pipeline, the
denoising loop keeps its timesteps on the host, and a new batch captures new graphs."""
import json
import logging
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from diffusers.flash.fastpath import engine as fast_path
from diffusers.flash import local_pipelines
from test_compile_ahead import _no_cpp_compiler
from diffusers import AutoencoderKL, UNet2DConditionModel


@pytest.fixture(autouse=True)
def _log_reaches_caplog():
    """diffusers' logger does not propagate by default, so caplog would see nothing: on during each test."""
    root = logging.getLogger("diffusers")
    before, root.propagate = root.propagate, True
    yield
    root.propagate = before


def _run(pipe, device, n=1, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    return pipe(["a lighthouse"] * n, num_inference_steps=4, height=128, width=128, generator=g,
                output_type="np").images


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU behaviour")
def test_without_cuda_it_explains_and_changes_nothing():
    pipe = local_pipelines.stable_diffusion("tiny")
    before = _run(pipe, "cpu")
    report = pipe.enable_fast_path(compile=True)
    assert report["cuda_graphs"] == [] and report["compile"] == [] and "no CUDA device" in report["reasons"][0]
    assert not {"forward", "decode"} & (set(vars(pipe.unet)) | set(vars(pipe.vae)) | set(vars(pipe.text_encoder)))
    assert not fast_path.is_enabled(pipe) and pipe._timesteps_device == pipe.device
    np.testing.assert_array_equal(_run(pipe, "cpu"), before)


def test_graphed_text_encoder_passes_other_calls_through():
    """Calls the graph does not serve (CPU inputs, extra arguments, grad) reach the model's own forward."""
    text = local_pipelines.components("tiny")["text_encoder"].eval()
    wrapped = fast_path.GraphedTextForward(text.forward)
    ids = torch.randint(0, 99, (2, 77))
    with torch.no_grad():
        np.testing.assert_array_equal(wrapped(ids)[0].numpy(), text(ids)[0].numpy())
        hidden = wrapped(ids, output_hidden_states=True).hidden_states
    assert hidden is not None and len(hidden) == text.config.num_hidden_layers + 1
    assert wrapped.graphed.graphs == {}



def test_graphed_decode_takes_the_generator_newer_pipelines_pass():
    """From 0.2x the pipelines call vae.decode(z, return_dict=False, generator=g): the wrapper takes it (the
    VAE's decode does not use it) and sends calls it does not serve to the VAE's own decode."""
    vae = local_pipelines.components("tiny")["vae"].eval()
    seen = []

    def decode(z, return_dict=True, **kwargs):
        seen.append(sorted(kwargs))
        return vae.decode(z, return_dict=return_dict)

    wrapped = fast_path.GraphedDecode(decode)
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        got = wrapped(z, return_dict=False, generator=torch.Generator().manual_seed(0))[0]
        np.testing.assert_array_equal(got.numpy(), vae.decode(z).sample.numpy())
        wrapped(z)
    assert seen == [["generator"], []] and wrapped.graphed.graphs == {}


def test_the_unet_call_keywords_become_graph_inputs_and_come_back():
    """SDXL's call adds added_cond_kwargs={text_embeds, time_ids} (and timestep_cond where used): tensors on the
    sample's device become graph inputs, one graph per layout; anything else is not captured."""
    cpu = torch.device("cpu")
    emb, ids, cond = torch.randn(2, 32), torch.randn(2, 6), torch.randn(2, 8)
    kwargs = {"added_cond_kwargs": {"time_ids": ids, "text_embeds": emb}, "timestep_cond": cond,
              "cross_attention_kwargs": None, "attention_mask": None}
    layout, tensors = fast_path.split_extra(kwargs, cpu)
    assert layout == (("added_cond_kwargs", ("text_embeds", "time_ids")), ("timestep_cond", None))
    assert [t is x for t, x in zip(tensors, (emb, ids, cond))] == [True] * 3
    back = fast_path.join_extra(layout, tensors)
    assert back == {"added_cond_kwargs": {"text_embeds": emb, "time_ids": ids}, "timestep_cond": cond}
    assert fast_path.split_extra({"cross_attention_kwargs": None}, cpu) == ((), ())
    assert fast_path.split_extra({"cross_attention_kwargs": {"scale": 0.5}}, cpu) is None  # LoRA scale: eager
    assert fast_path.split_extra({"timestep_cond": cond}, torch.device("meta")) is None  # another device


def test_a_pipeline_that_upcasts_its_vae_is_seen():
    """SDXL's pipelines cast an fp16 VAE with force_upcast to float32 around each decode."""
    vae = types.SimpleNamespace(config={"force_upcast": True}, dtype=torch.float16)
    sdxl = types.SimpleNamespace(vae=vae, upcast_vae=lambda: None)
    assert fast_path._vae_upcast(sdxl)
    assert not fast_path._vae_upcast(types.SimpleNamespace(vae=vae))  # SD 1.x's pipelines do not upcast
    vae.config = {"force_upcast": False}
    assert not fast_path._vae_upcast(sdxl)
    vae.config, vae.dtype = {"force_upcast": True}, torch.float32
    assert not fast_path._vae_upcast(sdxl)


def test_a_vae_kept_in_float32_decodes_float16_latents_and_goes_back_on_disable():
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",)).half()
    pipe = types.SimpleNamespace(vae=vae, upcast_vae=lambda: vae.to(torch.float32))
    z = torch.randn(1, 4, 8, 8, dtype=torch.float16)
    want = vae.float().decode(z.float()).sample
    vae.half()
    report = fast_path._report()
    fast_path._keep_vae_float32(pipe, report)
    assert report["float32"] == ["VAE"] and vae.dtype == torch.float32 and pipe._fast_path_vae_dtype == torch.float16
    torch.testing.assert_close(vae.decode(z).sample, want, rtol=0, atol=0)  # the same float32 arithmetic
    vae.half()  # as SDXL's img2img leaves it after encoding: the latents follow the VAE's dtype
    assert vae.decode(z).sample.dtype == torch.float16
    vae.float()
    fast_path.disable(pipe)
    assert vae.dtype == torch.float16 and "decode" not in vars(vae) and "_fast_path_vae_dtype" not in vars(pipe)
    # 0.19-0.39's upcast_vae leaves the first layers in float16: the latents go in as the pipeline gives them
    pipe.upcast_vae = lambda: (vae.to(torch.float32), vae.post_quant_conv.half(), vae.decoder.conv_in.half())
    fast_path._keep_vae_float32(pipe, fast_path._report())
    assert vae.decode.layer.weight.dtype == torch.float16 and vae.dtype == torch.float32
    fast_path.disable(pipe)
    assert {p.dtype for p in vae.parameters()} == {torch.float16}


def _sdxl_or_skip(**kwargs):
    try:
        return local_pipelines.stable_diffusion_xl(**kwargs)
    except NotImplementedError as e:
        pytest.skip(str(e))


@pytest.mark.parametrize("force_upcast,compile,dtype", [(True, False, torch.float16), (True, True, torch.float16),
                                                         (False, True, torch.float32)])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sdxl_fast_path_gives_the_same_images(force_upcast, compile, dtype):
    pipe = _sdxl_or_skip(force_upcast=force_upcast).to("cuda", dtype)

    def run(n):
        g = torch.Generator(device="cuda").manual_seed(0)
        return pipe(["a lighthouse"] * n, num_inference_steps=4, height=64, width=64, generator=g,
                    output_type="np").images

    plain = {n: run(n) for n in (1, 2)}
    assert all(np.isfinite(im).all() for im in plain.values())
    report = pipe.enable_fast_path(compile=compile)
    assert report["cuda_graphs"][:2] == ["UNet", "VAE decode"] and report["reasons"] == [], report
    # a VAE the pipeline casts to float32 for each decode is kept in float32, its decode graphed
    assert report["float32"] == (["VAE"] if force_upcast else []), report
    assert pipe.vae.dtype == (torch.float32 if force_upcast else dtype)
    for n in (1, 2, 1):
        np.testing.assert_allclose(run(n), plain[n], atol=1 / 255)
    assert len(pipe.vae.decode.graphed.graphs) == 2 and pipe.vae.decode.graphed.failed is None
    calls = pipe.unet.forward.calls  # the SDXL call (added_cond_kwargs) was captured, per batch
    sdxl = [c for layout, c in calls.items() if layout and layout[0][0] == "added_cond_kwargs"]
    assert len(sdxl) == 1 and len(sdxl[0].graphs) == 2 and sdxl[0].failed is None, calls
    pipe.disable_fast_path()
    assert pipe.vae.dtype == dtype
    np.testing.assert_allclose(run(1), plain[1], atol=1e-6)


@pytest.mark.parametrize("compile,compile_vae", [(False, None), (True, None), ("regional", None), (True, False),
                                                 (True, "regional")])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fast_path_gives_the_same_images(compile, compile_vae):
    pipe = local_pipelines.stable_diffusion("tiny").to("cuda")
    plain = {n: _run(pipe, "cuda", n) for n in (1, 2)}
    report = pipe.enable_fast_path(compile=compile, compile_vae=compile_vae)
    assert report["cuda_graphs"] == ["UNet", "VAE decode", "text encoder"], report
    vae_mode = compile if compile_vae is None else compile_vae
    assert report["compile"] == [w for w, m in (("UNet", compile), ("VAE decode", vae_mode)) if m], report
    # compiled: an uncompiled run plans the attention calls before each capture (no graph breaks)
    assert (pipe.unet.forward.graphed.prepare is not None) == bool(compile)
    assert (pipe.vae.decode.graphed.prepare is not None) == bool(vae_mode)
    assert (getattr(pipe.vae, "_fast_path_regions", None) is not None) == (vae_mode == "regional")
    assert fast_path.warmup_seconds(pipe) == {"UNet step": 0.0, "VAE decode": 0.0, "text encoder": 0.0}
    regions = getattr(pipe.unet, "_fast_path_regions", None)
    assert (regions is not None and len(regions.blocks) > 0) == (compile == "regional")
    assert isinstance(pipe.unet, UNet2DConditionModel) and pipe._timesteps_device == "cpu"
    for n in (1, 2, 1):  # a new batch captures new graphs; an old one is replayed
        fast = _run(pipe, "cuda", n)
        print(f"fast path, {n} image(s): max pixel difference {np.abs(fast - plain[n]).max() * 255:.3f}/255")
        np.testing.assert_allclose(fast, plain[n], atol=1 / 255)
    assert len(pipe.unet.forward.graphs) == 2 and len(pipe.vae.decode.graphed.graphs) == 2
    assert pipe.unet.forward.graphed.failed is None and pipe.vae.decode.graphed.failed is None
    assert regions is None or regions.failed is None
    assert all(s > 0 for s in fast_path.warmup_seconds(pipe).values())
    # both compiled: a helper process compiled the VAE decoder for each batch while the UNet compiled here
    # and this process's compile read it from inductor's cache (or, where nothing compiled here missed the
    # cache: compiled before on this machine or in this process, the helper was stopped)
    helper = fast_path.helper_results(pipe)
    side = 128 // getattr(pipe, "vae_scale_factor", 8)  # latents: 1/8 of the pixels to 0.9, the VAE's own from 0.10
    assert set(helper) == ({f"1x4x{side}x{side}", f"2x4x{side}x{side}"} if compile and vae_mode else set()), helper
    assert all(r == "compiled" or r.startswith("stopped: ") for r in helper.values()), helper
    pipe.disable_fast_path()
    assert fast_path.helper_results(pipe) == {}
    assert fast_path.warmup_seconds(pipe) == {}
    assert all(m._compiled_call_impl is None for m in pipe.unet.modules())
    assert "forward" not in vars(pipe.unet) and "forward" not in vars(pipe.text_encoder)
    assert "decode" not in vars(pipe.vae)
    assert pipe._timesteps_device == "cpu"  # the eager loop on a GPU too (flash/fastpath/host_timesteps.py)
    assert all(p.is_contiguous() for p in pipe.unet.parameters())
    np.testing.assert_array_equal(_run(pipe, "cuda", 1), plain[1])


CACHE_FILE_RUN = """
import json, sys, numpy as np, torch
from diffusers.flash import local_pipelines
from diffusers.flash.fastpath import engine as fast_path
pipe = local_pipelines.stable_diffusion("tiny").to("cuda")
def run(n):
    g = torch.Generator(device="cuda").manual_seed(0)
    return pipe(["a lighthouse"] * n, num_inference_steps=4, height=128, width=128, generator=g,
                output_type="np").images
plain = run(1)
report = pipe.enable_fast_path(compile=True, cache=sys.argv[1])
fast = run(1)
again = run(1)  # replayed
print(json.dumps({"diff": float(np.abs(fast - plain).max() * 255), "same": bool((fast == again).all()),
                  "reasons": report["reasons"], "cache": fast_path.cache_status(pipe),
                  "graphs": len(pipe.unet.forward.graphs), "failed": pipe.unet.forward.graphed.failed}))
"""


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cache_file_serves_a_new_process_the_unet_compiled_ahead(tmp_path):
    """cache=FILE across two processes with empty inductor and Triton caches of their own: the first compiles
    the UNet ahead of time into the file (torch 2.11+, precompile.py), the second loads it (no trace, no
    compile) and writes nothing; both give the plain pipeline's images within 1/255."""
    from diffusers.flash.fastpath import precompile

    (tmp_path / "work").mkdir(mode=0o700)
    path = tmp_path / "work" / "compiled.bin"

    def run(name):
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / name / "inductor"),
                   TRITON_CACHE_DIR=str(tmp_path / name / "triton"), XDG_CACHE_HOME=str(tmp_path / "user"))
        proc = subprocess.run([sys.executable, "-c", CACHE_FILE_RUN, str(path)], capture_output=True, text=True,
                              env=env, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    ahead = int(precompile.unavailable() is None)
    first, second = run("machine-1"), run("machine-2")
    for out in (first, second):
        print(f"cache file: {out['diff']:.3f}/255 from the plain pipeline, {out['cache']}")
        assert out["diff"] <= 1 and out["same"] and out["graphs"] == 1 and out["failed"] is None, out
        assert out["cache"]["precompiled"]["problems"] == [], out
    assert first["cache"]["precompiled"]["compiled"] == ahead and first["cache"]["written"] >= 1, first
    assert second["cache"]["loaded"] and second["cache"]["precompiled"]["loaded"] == ahead, second
    assert second["cache"]["written"] == 0 and second["cache"]["missed"] == [], second


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_capture_that_fails_falls_back_with_the_reason(caplog):
    def syncs(x):  # a host sync inside the forward cannot be captured
        return x * float(x.sum().item() > -1)

    call = fast_path.GraphedCall(syncs, "test model")
    x = torch.ones(4, device="cuda")
    np.testing.assert_array_equal(call(x).cpu().numpy(), x.cpu().numpy())
    assert call.failed and call.graphs == {}
    np.testing.assert_array_equal(call(2 * x).cpu().numpy(), 2 * x.cpu().numpy())


def test_a_compile_that_fails_at_its_first_call_runs_uncompiled(monkeypatch, caplog):
    """torch.compile compiles lazily: a failure there (no triton, no compiler) is logged and the model runs
    uncompiled; an error of the call itself still reaches the caller."""
    def broken_compile(fn, **kwargs):
        def compiled(*args, **kw):
            raise RuntimeError("backend compiler failed: no triton here")
        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    report = {"compile": [], "reasons": []}
    fn = fast_path._compile(lambda x: x * 2, "UNet", report)
    assert report["compile"] == ["UNet"]
    assert fn(torch.ones(2)).tolist() == [2.0, 2.0]
    assert "no triton here" in fn.failed
    assert fn(torch.ones(3)).tolist() == [2.0, 2.0, 2.0]
    with pytest.raises(TypeError):
        fn("not", "a tensor")


def test_regional_compile_routes_each_block_and_undoes(monkeypatch):
    """compile="regional" hands each ResnetBlock2D / SpatialTransformer (Transformer2DModel) / AttentionBlock to
    torch.compile (here a stand-in that counts calls and runs the block) with the same output; undo() restores them."""
    calls = []

    def counting_compile(fn, **kwargs):
        assert kwargs["dynamic"] is False and kwargs["options"] == fast_path.INDUCTOR_OPTIONS

        def compiled(*args, **kw):
            calls.append(type(fn.__self__).__name__)
            return fn(*args, **kw)
        return compiled

    unet = local_pipelines.components("tiny")["unet"].eval()
    x, t = torch.randn(2, 4, 16, 16), torch.tensor(7)
    ctx = torch.randn(2, 77, unet.config.cross_attention_dim)
    with torch.no_grad():
        ref = unet(x, t, ctx).sample
    monkeypatch.setattr(torch, "compile", counting_compile)
    report = {"compile": [], "reasons": []}
    fast_path._compile_regions(unet, "UNet", report)
    regions = unet._fast_path_regions
    kinds = {type(m).__name__ for m in regions.blocks}
    # the UNet's attention block: SpatialTransformer up to 0.6, Transformer2DModel from 0.7
    attention_block = "SpatialTransformer" if any(type(m).__name__ == "SpatialTransformer" for m in unet.modules()) \
        else "Transformer2DModel"
    assert report["compile"] == ["UNet"] and kinds == {"ResnetBlock2D", attention_block}
    with torch.no_grad():
        out = unet(x, t, ctx).sample
    np.testing.assert_array_equal(out.numpy(), ref.numpy())
    assert len(calls) == len(regions.blocks) and set(calls) == kinds
    calls.clear()
    with torch.no_grad():  # the planning run before a capture goes around the compiled blocks
        np.testing.assert_array_equal(regions.uncompiled(unet.forward)(x, t, ctx).sample.numpy(), ref.numpy())
        assert calls == [] and not regions.bypass
        unet(x, t, ctx)
    assert len(calls) == len(regions.blocks)
    calls.clear()
    regions.undo()
    calls.clear()
    with torch.no_grad():
        unet(x, t, ctx)
    assert calls == [] and all(m._compiled_call_impl is None for m in unet.modules())


def test_a_regional_compile_that_fails_runs_every_block_uncompiled(monkeypatch, caplog):
    def broken_compile(fn, **kwargs):
        def compiled(*args, **kw):
            raise RuntimeError("backend compiler failed: no C compiler")
        return compiled

    vae = local_pipelines.components("tiny")["vae"].eval()
    z = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        ref = vae.decode(z).sample
    monkeypatch.setattr(torch, "compile", broken_compile)
    regions = fast_path.RegionalCompile(vae, "VAE decode")
    assert {type(m).__name__ for m in regions.blocks} >= {"ResnetBlock2D"}
    with caplog.at_level("WARNING"), torch.no_grad():
        np.testing.assert_array_equal(vae.decode(z).sample.numpy(), ref.numpy())
        np.testing.assert_array_equal(vae.decode(z).sample.numpy(), ref.numpy())
    assert "no C compiler" in regions.failed
    assert sum("blocks failed" in r.getMessage() for r in caplog.records) == 1


def test_compile_takes_true_false_or_regional():
    pipe = local_pipelines.stable_diffusion("tiny")
    with pytest.raises(ValueError, match="regional"):
        pipe.enable_fast_path(compile="max-autotune")
    with pytest.raises(ValueError, match="compile_vae must be"):
        pipe.enable_fast_path(compile=True, compile_vae="all")
    assert not fast_path.is_enabled(pipe)


@pytest.mark.slow
def test_torch_compile_traces_the_attention_dispatcher_without_graph_breaks():
    """The dispatcher's first call of a shape plans it (and logs the choice): under torch.compile that must
    not break the graph, nor must the planned calls after it."""
    from diffusers.flash.attention import dispatch as attention_dispatch

    unet = local_pipelines.components("tiny")["unet"].eval()
    x, t = torch.randn(2, 4, 16, 16), torch.tensor(7)
    ctx = torch.randn(2, 77, unet.config.cross_attention_dim)
    attention_dispatch._cache.clear()
    torch._dynamo.reset()
    with torch.no_grad():
        first = torch._dynamo.explain(unet.forward)(x, t, ctx)
        unet(x, t, ctx)
        again = torch._dynamo.explain(unet.forward)(x, t, ctx)
    assert (first.graph_count, first.graph_break_count) == (1, 0), first.break_reasons
    assert (again.graph_count, again.graph_break_count) == (1, 0), again.break_reasons


def test_a_model_compiled_before_any_eager_call_compiles_once():
    """A user's own torch.compile(unet), called before the dispatcher has planned its shapes: the first trace
    plans them. The plans must not be written from the compiled call, or the guard dynamo puts on their
    absence fails at the second call and the whole model compiles again."""
    from diffusers.flash.attention import dispatch as attention_dispatch

    unet = local_pipelines.components("tiny")["unet"].eval()
    x, t = torch.randn(2, 4, 16, 16), torch.tensor(7)
    ctx = torch.randn(2, 77, unet.config.cross_attention_dim)
    graphs = []

    def count(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    attention_dispatch._cache.clear()
    torch._dynamo.reset()
    compiled = torch.compile(unet, backend=count, fullgraph=True)
    with torch.no_grad():
        expected = unet(x, t, ctx).sample
        attention_dispatch._cache.clear()  # as in a new process: nothing planned before the compiled call
        outs = [compiled(x, t, ctx).sample for _ in range(3)]
    assert len(graphs) == 1, f"compiled {len(graphs)} times"
    for out in outs:
        torch.testing.assert_close(out, expected)
    with torch.no_grad():  # an eager call afterwards plans and remembers, as before
        unet(x, t, ctx)
    assert any(key[0] == "plan" for key in attention_dispatch._cache)


@pytest.mark.slow
def test_the_fast_path_compile_options_keep_the_unet_output():
    """torch.compile with the fast path's inductor options (on the CPU here: the same graph passes as on
    CUDA, other code generation) gives the eager UNet's output to float32 rounding."""
    reason = _no_cpp_compiler()
    if reason:
        pytest.skip(reason)
    unet = local_pipelines.components("tiny")["unet"].eval()
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor(7)
    ctx = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    report = {"compile": [], "reasons": []}
    torch._dynamo.reset()
    compiled = fast_path._compile(unet.forward, "UNet", report)
    with torch.no_grad():
        eager = unet(x, t, ctx).sample
        out = compiled(x, t, ctx).sample
    assert compiled.failed is None, f"torch.compile failed where it should work: {compiled.failed}"
    assert report["compile"] == ["UNet"]
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)
    assert not torch.equal(out, torch.zeros_like(out))
