"""``python -m bench profile``: where the fast path's compiled UNet step and VAE decode spend their GPU time.

  python -m bench profile --images 8 --json profile.json

SD 1.x architecture, random weights, fp16, 512x512, guidance (UNet batch = 2 x images), the fork's
``enable_fast_path(compile=True)``. After one pipeline call (compiles and captures), the captured UNet
step and VAE decode are timed as graph replays (CUDA events), then their compiled functions run on the same
input buffers under torch.profiler: every kernel is put in a class by its name (``CLASSES``: attention,
convolution, GEMM, normalisation, elementwise, other), and the FLOPs of one call (FlopCounterMode on the
same inputs) are split by aten op the same way, so each arithmetic class gets its TFLOP/s against the
card's measured matmul peak. Normalisation and elementwise kernels are bound by memory, not arithmetic:
their share of the step is what matters there.
"""
from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .common import BenchError, Clock, machine, matmul_peak, median, table, write_json

# inductor's own kernels by their prefix (their names also list the ops fused in, "convolution" among them):
# templates (matmul and convolution), reductions (GroupNorm and LayerNorm in these models), pointwise
TRITON = (("triton_tem", None), ("triton_red", "normalisation"), ("triton_per", "normalisation"),
          ("triton_poi", "elementwise"))
# other kernels by name, first match wins (cuDNN's attention kernels say "fprop" too: attention goes first)
CLASSES = (
    ("attention", re.compile(r"fmha|flash|sdpa|attn|attention", re.I)),
    ("convolution", re.compile(r"conv|fprop|dgrad|wgrad|implicit_?gemm|winograd", re.I)),
    ("gemm", re.compile(r"gemm|nvjet|cutlass|xmma|_mm_|matmul", re.I)),
    ("normalisation", re.compile(r"norm|welford|reduce", re.I)),
    ("elementwise", re.compile(r"elementwise|vectorized|copy|fill|cat|index", re.I)),
)
# aten op (its overload packet's name) -> class, for the FLOPs
OP_CLASSES = {"convolution": "convolution", "mm": "gemm", "addmm": "gemm", "bmm": "gemm", "baddbmm": "gemm",
              "_scaled_dot_product_cudnn_attention": "attention",
              "_scaled_dot_product_flash_attention": "attention",
              "_scaled_dot_product_efficient_attention": "attention", "scaled_dot_product_attention": "attention"}


def kernel_class(name: str) -> str:
    for prefix, cls in TRITON:
        if name.startswith(prefix):
            return cls or ("convolution" if "conv" in name else "gemm")
    for cls, pattern in CLASSES:
        if pattern.search(name):
            return cls
    return "other"


def flops_by_class(fn: Callable[..., Any], inputs: Sequence[torch.Tensor]) -> dict[str, float]:
    """FLOPs of one ``fn(*inputs)`` by class (FlopCounterMode's per-op counts)."""
    from torch.utils.flop_counter import FlopCounterMode

    mode = FlopCounterMode(display=False)
    with mode:
        fn(*inputs)
    out: dict[str, float] = {}
    for op, flops in mode.get_flop_counts().get("Global", {}).items():
        name = str(op).removeprefix("aten.").split(".")[0]
        cls = OP_CLASSES.get(name, "other")
        out[cls] = out.get(cls, 0.0) + float(flops)
    return out


def kernels_by_class(fn: Callable[..., Any], inputs: Sequence[torch.Tensor], iters: int) -> tuple[dict, list]:
    """GPU ms per call by class, and the 15 costliest kernels, from torch.profiler over ``iters`` calls."""
    from torch.profiler import ProfilerActivity, profile

    fn(*inputs)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn(*inputs)
        torch.cuda.synchronize()
    per_kernel: dict[str, float] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time_total > 0:
            per_kernel[e.name] = per_kernel.get(e.name, 0.0) + e.device_time_total / 1e3 / iters
    out: dict[str, float] = {}
    for name, ms in per_kernel.items():
        cls = kernel_class(name)
        out[cls] = out.get(cls, 0.0) + ms
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:15]
    return out, [{"kernel": k[:120], "class": kernel_class(k), "ms": v} for k, v in top]


def replay_ms(graph: Any, iters: int) -> float:
    clock = Clock("cuda")
    graph.replay()
    spans = []
    for _ in range(iters):
        start = clock.stamp()
        graph.replay()
        spans.append((start, clock.stamp()))
    clock.sync()
    return median([clock.ms(s, e) for s, e in spans])


def profile_part(name: str, graphed: Any, peak_tflops: float, iters: int) -> dict[str, Any]:
    """One captured part (a GraphedCall with one graph): its replay time and its kernels by class."""
    if len(graphed.graphs) != 1:
        raise BenchError(f"the {name} has {len(graphed.graphs)} graphs (expected 1): run one batch size")
    cap = next(iter(graphed.graphs.values()))
    with torch.no_grad():
        step_ms = replay_ms(cap.graph, iters)
        ms, top = kernels_by_class(graphed.fn, cap.inputs, iters)
        # FLOPs on the uncompiled model (a dispatch mode around compiled code could make it compile again)
        flops = flops_by_class(graphed.prepare or graphed.fn, cap.inputs)
    total = sum(ms.values())
    rows = []
    for cls in [c for c, _ in CLASSES] + ["other"]:
        t, f = ms.get(cls, 0.0), flops.get(cls, 0.0)
        tflops = f / (t * 1e-3) / 1e12 if t and f else None
        rows.append(dict(part=name, cls=cls, ms=t, share=t / total if total else 0.0, tflop=f / 1e12,
                         tflops=tflops, of_peak=tflops / peak_tflops if tflops else None))
    return dict(part=name, replay_ms=step_ms, kernel_ms=total, rows=rows, top=top,
                inputs=[list(t.shape) for t in cap.inputs])


COLUMNS = [("part", "part", None), ("class", "cls", None), ("ms", "ms", "{:.2f}"), ("share", "share", "{:.0%}"),
           ("TFLOP", "tflop", "{:.3f}"), ("TFLOP/s", "tflops", "{:.0f}"), ("of peak", "of_peak", "{:.0%}")]


def run(args: argparse.Namespace) -> dict[str, Any]:
    from .pipeline import PROMPT, build

    ns = argparse.Namespace(device="cuda", dtype="fp16", tiny=False, model=None, external_diffusers=False,
                            keep_safety_checker=False)
    pipe, _ = build(ns)
    torch.set_grad_enabled(False)
    peak = matmul_peak("cuda", torch.float16)
    applied = pipe.enable_fast_path(compile=True, channels_last=not args.contiguous)
    pipe([PROMPT] * args.images, num_inference_steps=args.steps, guidance_scale=7.5, height=512, width=512,
         generator=torch.Generator("cuda").manual_seed(0), output_type="np")
    torch.cuda.synchronize()
    parts = [profile_part("UNet step", pipe.unet.forward.graphed, peak["tflops"], args.iters),
             profile_part("VAE decode", pipe.vae.decode.graphed, peak["tflops"], args.iters)]
    return dict(kind="profile", machine=machine("cuda"), images=args.images, matmul_peak=peak,
                applied={k: applied[k] for k in ("cuda_graphs", "compile", "channels_last", "reasons")},
                parts=parts)


def render(report: dict[str, Any]) -> str:
    lines = [f"# {report['machine'].get('card')}, {report['images']} images (UNet batch {2 * report['images']}), "
             f"fp16 matmul peak measured {report['matmul_peak']['tflops']:.0f} TFLOP/s"]
    for p in report["parts"]:
        lines.append(f"# {p['part']}: graph replay {p['replay_ms']:.2f} ms, kernels {p['kernel_ms']:.2f} ms")
    lines += ["", table(COLUMNS, [r for p in report["parts"] for r in p["rows"]]), ""]
    for p in report["parts"]:
        lines.append(f"## {p['part']}: costliest kernels")
        lines += [f"- {k['ms']:.3f} ms {k['class']}: {k['kernel']}" for k in p["top"]]
    return "\n".join(lines)


def parse(argv: Sequence[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench profile", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=8, help="images per call (default 8)")
    ap.add_argument("--steps", type=int, default=2, help="steps of the call that compiles and captures")
    ap.add_argument("--iters", type=int, default=20, help="calls timed and profiled per part")
    ap.add_argument("--contiguous", action="store_true",
                    help="keep the weights in the contiguous layout (default: channels-last where compiled)")
    ap.add_argument("--json", metavar="FILE", help="write the report as JSON")
    args = ap.parse_args(argv)
    if args.images < 1 or args.iters < 1 or args.steps < 1:
        ap.error("--images, --steps and --iters must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(list(sys.argv[1:] if argv is None else argv))
    if not torch.cuda.is_available():
        print("bench profile: needs a CUDA device (it profiles the fast path's CUDA graphs)", file=sys.stderr)
        return 2
    try:
        report = run(args)
    except BenchError as e:
        print(f"bench profile: {e}", file=sys.stderr)
        return 2
    print(render(report))
    if args.json:
        write_json(args.json, report)
    return 0
