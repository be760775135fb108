#!/usr/bin/env python3
"""Measure fast-path candidates one by one on the GPU, to decide which enable_fast_path() keeps.

SD 1.x architecture with random weights, fp16, 512x512 (64x64 latents), classifier-free guidance (UNet
batch = 2 x images). For each candidate: warm-up (compile + capture) seconds and the time per call of the
graphed UNet step / VAE decode / text encoder (CUDA-event timed, median of --repeats batches of --calls
calls), in one process so every candidate sees the same card. Writes JSON lines to --out as it goes.

  python scripts/fast_path_variants.py --images 1 --out variants.jsonl
"""
import argparse
import json
import statistics
import time
import types

import torch
import torch.nn.functional as F

import bench_common  # scripts/, beside this file
from diffusers import fast_path, local_pipelines
from diffusers.models import attention_dispatch
from diffusers.models.attention import CrossAttention

UNET_VARIANTS = {
    "graph": dict(compile=False),
    "compile": dict(compile=True, options={}),
    "compile+cl": dict(compile=True, cl=True, options={}),
    "compile+mm": dict(compile=True, cl=False),
    "compile+cl+mm": dict(compile=True, cl=True),
    "compile+cl+mm+tuned": dict(compile=True, cl=True, options={
        **fast_path.INDUCTOR_OPTIONS, "coordinate_descent_tuning": True, "epilogue_fusion": False,
        "coordinate_descent_check_all_directions": True}),
    "compile+cl+mm+qkv": dict(compile=True, cl=True, qkv=True),
    "compile+cl+mm+cudnnbench": dict(compile=True, cl=True, bench=True),
    # inductor freezing: weights become constants of the compiled graph (inference only)
    "compile+cl+mm+freeze": dict(compile=True, cl=True, options={**fast_path.INDUCTOR_OPTIONS, "freezing": True}),
    # the pattern-matcher passes and pointwise launch-config tuning back on (INDUCTOR_OPTIONS turns them off)
    "compile+cl+mm+pm": dict(compile=True, cl=True, options={
        **fast_path.INDUCTOR_OPTIONS, "pattern_matcher": True, "triton.autotune_pointwise": True}),
    # GEMMs autotuned: cuBLAS against Triton templates, which can take the bias/residual/GEGLU epilogues
    # (and prologues) into the matmul kernel
    "compile+cl+mm+gemmtune": dict(compile=True, cl=True, options={
        **fast_path.INDUCTOR_OPTIONS, "max_autotune_gemm": True}),
    # GEMMs and convolutions autotuned (Triton convolution templates against cuDNN)
    "compile+cl+mm+autotune": dict(compile=True, cl=True, options={
        **fast_path.INDUCTOR_OPTIONS, "max_autotune": True}),
    # regional compilation: each ResnetBlock2D / SpatialTransformer compiled on its own (same-shaped blocks
    # share their compiled code): a shorter compile, fewer fusions across block boundaries
    "regional+cl+mm": dict(compile="regional", cl=True),
    "regional+cl+mm+cudnnbench": dict(compile="regional", cl=True, bench=True),
}

_regions = {}  # model -> fast_path.RegionalCompile in force


def set_regional(model, on, what=""):
    """The fast path's own regional compilation (``compile="regional"``) on or off; returns it when on."""
    old = _regions.pop(id(model), None)
    if old is not None:
        old.undo()
    if on:
        _regions[id(model)] = fast_path.RegionalCompile(model, what)
        return _regions[id(model)]


def fused_qkv_forward(self, hidden_states, context=None, mask=None):
    if context is not None:
        return type(self).forward(self, hidden_states, context, mask)
    q, k, v = F.linear(hidden_states, self._fused_qkv).chunk(3, dim=-1)
    return self.to_out(attention_dispatch.cross_attention(self, q, k, v))


def set_qkv(unet, on):
    for m in unet.modules():
        if isinstance(m, CrossAttention):
            m.__dict__.pop("forward", None)
            if on and m.to_q.in_features == m.to_k.in_features:
                m._fused_qkv = torch.cat([m.to_q.weight, m.to_k.weight, m.to_v.weight]).detach()
                m.forward = types.MethodType(fused_qkv_forward, m)


def per_call_ms(call, calls, repeats, clocks=None):
    """Median ms per call over ``repeats`` batches of ``calls``; ``clocks`` (a list) gets the SM clock read
    while each batch is still running on the GPU."""
    out = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            call()
        end.record()
        if clocks is not None:
            clocks.append(bench_common.sm_clock_mhz(torch.cuda.current_device()))
        torch.cuda.synchronize()
        out.append(start.elapsed_time(end) / calls)
    return statistics.median(out)


FAMILIES = [("attention", r"fmha|flash|attention|cudnn_generated_fort_native_sdpa|sdpa"),
            ("convolution", r"conv|implicit|dgrad|wgrad|fprop|cutlass.*nhwc|xmma"),
            ("gemm", r"gemm|cutlass|sm90_xmma|nvjet|cublas"),
            ("triton (fused)", r"triton"),
            ("copy/other", r".")]


def kernel_profile(call, calls=5):
    """GPU time per call by kernel (graph replays are traced kernel by kernel): the top kernels and the
    share per family."""
    import re
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            call()
        torch.cuda.synchronize()
    per, spans = {}, []
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per[e.name] = per.get(e.name, 0.0) + e.device_time / 1000 / calls
            spans.append((e.time_range.start, e.time_range.end, e.name))
    fams = {}
    for name, ms in per.items():
        fam = next(f for f, pat in FAMILIES if re.search(pat, name, re.I))
        fams[fam] = fams.get(fam, 0.0) + ms
    top = sorted(per.items(), key=lambda kv: -kv[1])[:20]
    return dict(total_ms=round(sum(per.values()), 3), families={k: round(v, 3) for k, v in fams.items()},
                kernels=len(per), top=[(n[:120], round(ms, 4)) for n, ms in top],
                timeline=bench_common.timeline(spans, calls))


def emit(args, row):
    row = {"images": args.images, **row}
    print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")


def measure(args, what, name, make, call_args, reference=None):
    torch._dynamo.reset()
    try:
        start = time.perf_counter()
        fn = make()
        with torch.no_grad():
            out = fn(*call_args)
            torch.cuda.synchronize()
            warm = time.perf_counter() - start
            clocks = []
            ms = per_call_ms(lambda: fn(*call_args), args.calls, args.repeats, clocks)
            prof = None
            if name in args.profile.split(","):
                try:
                    prof = kernel_profile(lambda: fn(*call_args))
                except Exception as e:
                    prof = {"error": f"{type(e).__name__}: {e}"[:300]}
        diff = None if reference is None else (out.float() - reference.float()).abs().max().item()
        emit(args, dict(part=what, variant=name, warmup_s=round(warm, 1), ms=round(ms, 3), max_abs_diff=diff,
                        sm_clock_mhz=clocks,
                        **({"profile": prof} if prof else {})))
        return out
    except Exception as e:
        emit(args, dict(part=what, variant=name, error=f"{type(e).__name__}: {str(e)[:300]}"))
        return None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1)
    ap.add_argument("--unet", default=",".join(UNET_VARIANTS))
    ap.add_argument("--parts", default="unet,vae,text")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--vae", default="eager,graph,compile+cl+mm+graph")
    ap.add_argument("--profile", default="", help="variants (by name) to profile kernel by kernel")
    ap.add_argument("--out")
    args = ap.parse_args()
    dev, dt = "cuda", torch.float16
    parts = local_pipelines.components("sd1")
    unet = parts["unet"].to(dev, dt).eval()
    vae = parts["vae"].to(dev, dt).eval()
    text = parts["text_encoder"].to(dev, dt).eval()
    emit(args, dict(card=torch.cuda.get_device_name(), torch=torch.__version__, cudnn=torch.backends.cudnn.version()))
    g = torch.Generator(device=dev).manual_seed(0)
    b = 2 * args.images
    sample = torch.randn(b, 4, 64, 64, device=dev, dtype=dt, generator=g)
    ctx = torch.randn(b, 77, 768, device=dev, dtype=dt, generator=g)
    t = torch.tensor(981, device=dev)

    if "unet" in args.parts:
        with torch.no_grad():
            reference = unet(sample, t, ctx).sample
        for name in args.unet.split(","):
            v = UNET_VARIANTS[name]

            def make(v=v):
                unet.to(memory_format=torch.channels_last if v.get("cl") else torch.contiguous_format)
                set_qkv(unet, v.get("qkv", False))
                torch.backends.cudnn.benchmark = v.get("bench", False)
                # as enable_fast_path() does: an uncompiled run plans the attention before each capture
                fn = prepare = unet.forward
                set_regional(unet, False)
                if v["compile"] == "regional":
                    prepare = set_regional(unet, True, "UNet").uncompiled(unet.forward)
                elif v["compile"]:
                    fn = fast_path._torch_compile(fn, v.get("options"))
                graphed = fast_path.GraphedForward(fn, prepare=prepare if v["compile"] else None)
                return lambda s, tt, c: graphed(s, tt, c).sample

            measure(args, "unet", name, make, (sample, t, ctx), reference)
        unet.to(memory_format=torch.contiguous_format)
        set_qkv(unet, False)
        set_regional(unet, False)
        torch.backends.cudnn.benchmark = False

    if "vae" in args.parts:
        z = torch.randn(args.images, 4, 64, 64, device=dev, dtype=dt, generator=g)
        with torch.no_grad():
            reference = vae.decode(z).sample
        def vae_variant(name):
            vae.to(memory_format=torch.channels_last if "+cl" in name else torch.contiguous_format)
            set_regional(vae, False)
            fn = prepare = vae.decode
            if name.startswith("compile"):
                fn = fast_path._torch_compile(vae.decode)  # as enable_fast_path() compiles it
            elif name.startswith("regional"):
                prepare = set_regional(vae, True, "VAE decode").uncompiled(vae.decode)
            if name == "eager":
                return lambda z: vae.decode(z).sample
            d = fast_path.GraphedDecode(fn, prepare=prepare if name != "graph" else None)
            return lambda z: d(z).sample

        for name in args.vae.split(","):
            measure(args, "vae", name, lambda name=name: vae_variant(name), (z,), reference)
        vae.to(memory_format=torch.contiguous_format)
        set_regional(vae, False)

    if "text" in args.parts:
        ids = torch.randint(0, 49408, (args.images, 77), device=dev, generator=g)
        with torch.no_grad():
            reference = text(ids)[0]
        measure(args, "text", "eager", lambda: (lambda i: text(i)[0]), (ids,), reference)

        def graphed():
            f = fast_path.GraphedTextForward(text.forward)
            return lambda i: f(i)[0]

        measure(args, "text", "graph", graphed, (ids,), reference)


if __name__ == "__main__":
    main()
