"""The attention microbenchmark: ``python -m bench attention [options]``.

Every attention call Stable Diffusion v1.x makes at 512x512 (UNet batch = 2 x images, 8 heads; the
VAE's single head of dim 512), or with --today those of SDXL, SD3 medium and Flux.1-dev at 1024x1024,
run through ``attention_dispatch.attention(q, k, v, backend=name)`` for each backend, plus the backend
that ``auto`` picks (``attention_dispatch.choose``). Milliseconds are the median over --repeats blocks
of calls timed with CUDA events; TFLOP/s counts 4 * B * H * Sq * Sk * D.
A backend that is unavailable, or that refuses a shape, is reported with its reason.
"""
from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import torch

from .common import (DTYPES, KNOWN_BACKENDS, BenchError, Clock, accepted, backend_status_list, backend_verdicts,
                     dispatcher, free_memory, header, is_oom, machine, median, parse_backends, table, write_json)

# (label, batch, heads, query length, key length, head dim, fp32 softmax as the VAE's AttentionBlock)
SHAPES = [
    ("UNet self, 1 image, 64x64", 2, 8, 4096, 4096, 40, False),
    ("UNet self, 8 images, 64x64", 16, 8, 4096, 4096, 40, False),
    ("UNet self, 8 images, 32x32", 16, 8, 1024, 1024, 80, False),
    ("UNet self, 8 images, 16x16", 16, 8, 256, 256, 160, False),
    ("UNet cross, 8 images, 64x64", 16, 8, 4096, 77, 40, False),
    ("VAE, 1 image, 1 head", 1, 1, 4096, 4096, 512, True),
    ("VAE, 8 images, 1 head", 8, 1, 4096, 4096, 512, True),
]
# --sd2: SD 2.x's UNet heads of dim 64 (5 of them at 64x64 latents) and a head dim of 128, where the
# H200 run of 2026-11-29 saw FlashAttention-4 ahead of cuDNN
SD2_SHAPES = [
    ("SD 2.x self, 8 images, 64x64", 16, 5, 4096, 4096, 64, False),
    ("SD 2.x cross, 8 images, 64x64", 16, 5, 4096, 77, 64, False),
    ("self, head dim 128, 8 images", 16, 8, 4096, 4096, 128, False),
]
# --today: the attention of today's models at 1024x1024, 1 image (bench/models.py): SDXL's UNet (10 heads of 64 at
# 64x64 latents, 20 at 32x32, guidance: batch 2), SD3 medium's joint attention (24 heads of 64 over 4096 image +
# 333 text tokens, guidance: batch 2) and Flux.1-dev's (24 heads of 128 over 4096 + 512 tokens, batch 1)
TODAY_SHAPES = [
    ("SDXL self, 1 image, 64x64", 2, 10, 4096, 4096, 64, False),
    ("SDXL self, 1 image, 32x32", 2, 20, 1024, 1024, 64, False),
    ("SDXL cross, 1 image, 64x64", 2, 10, 4096, 77, 64, False),
    ("SD3 joint, 1 image", 2, 24, 4429, 4429, 64, False),
    ("Flux joint, 1 image", 1, 24, 4608, 4608, 128, False),
    ("SDXL self, 4 images, 64x64", 8, 10, 4096, 4096, 64, False),
]
TINY_DIVISOR = 64  # --tiny: query and key lengths / 64 (text's 77 stays), for a CPU in seconds


Shape = tuple[str, int, int, int, int, int, bool]


def shapes(tiny: bool, sd2: bool = False, today: bool = False) -> list[Shape]:
    chosen = (TODAY_SHAPES if today else SHAPES) + (SD2_SHAPES if sd2 else [])
    if not tiny:
        return chosen
    return [(f"{label} /{TINY_DIVISOR}", b, h, sq // TINY_DIVISOR, sk if sk == 77 else sk // TINY_DIVISOR, d, up)
            for label, b, h, sq, sk, d, up in chosen]


def graphed(fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` captured once as a CUDA graph (after an eager warm-up on a side stream, where kernels that
    compile on first use, FlashAttention-4's, do so): its replay, which leaves out Python and launches."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def tensors(b: int, h: int, sq: int, sk: int, d: int, device: str, dtype: torch.dtype,
            seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(seed)
    make = lambda s: torch.randn(b, h, s, d, generator=g, device=device, dtype=dtype)  # noqa: E731
    return make(sq), make(sk), make(sk)


def time_call(fn: Callable[[], Any], device: str, repeats: int, warmup: int = 3, target_ms: float = 5.0) -> float:
    """Median milliseconds per call over ``repeats`` blocks; each block runs enough calls to last about
    ``target_ms`` (one block is timed by two events, so per-call launch overhead is included)."""
    clock = Clock(device)
    for _ in range(warmup):
        fn()
    start = clock.stamp()
    fn()
    end = clock.stamp()
    clock.sync()
    inner = max(1, min(100, int(target_ms / max(clock.ms(start, end), 1e-3))))
    spans = []
    for _ in range(repeats):
        start = clock.stamp()
        for _ in range(inner):
            fn()
        spans.append((start, clock.stamp()))
    clock.sync()
    return median([clock.ms(a, b) / inner for a, b in spans])


def measure(ad: ModuleType, shape: Shape, backends: Sequence[str], verdicts: dict[str, str | None], device: str,
            dtype: torch.dtype, repeats: int, cuda_graph: bool = False) -> list[dict[str, Any]]:
    label, b, h, sq, sk, d, upcast = shape
    q, k, v = tensors(b, h, sq, sk, d, device, dtype)
    extra = accepted(ad.attention, upcast=upcast)
    refused = getattr(ad, "AttentionBackendError", ())
    base = dict(shape=label, batch=b, heads=h, q_len=sq, kv_len=sk, head_dim=d, fp32_softmax=upcast)
    try:
        chose = ad.choose(q, k, v, **accepted(ad.choose, backend="auto", upcast=upcast))
    except refused as e:
        chose = f"none ({str(e).splitlines()[0]})"
    rows = []
    for name in backends:
        row = dict(base, backend=name, auto_choice=chose, status="ok", reason=None, ms=None, tflops=None)
        rows.append(row)
        if verdicts[name] is not None:
            row.update(status="skipped", reason=verdicts[name])
            continue
        fn = lambda name=name: ad.attention(q, k, v, backend=name, **extra)  # noqa: E731
        try:
            out = fn()
            if tuple(out.shape) != tuple(q.shape):
                raise RuntimeError(f"backend {name} returned shape {tuple(out.shape)} for q {tuple(q.shape)}")
            row["ms"] = time_call(graphed(fn) if cuda_graph else fn, device, repeats)
        except Exception as e:  # oom, refused (AttentionBackendError: the backend cannot serve this shape), error
            status = "oom" if is_oom(e) else "refused" if refused and isinstance(e, refused) else "error"
            if status == "error":
                traceback.print_exception(e, file=sys.stderr)
            row.update(status=status, reason=f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}")
        finally:
            free_memory()
        if row["ms"]:
            row["tflops"] = 4 * b * h * sq * sk * d / (row["ms"] * 1e-3) / 1e12
    return rows


def run(args: argparse.Namespace) -> dict[str, Any]:
    ad = dispatcher()  # a clear BenchError while it is absent
    verdicts = backend_verdicts(args.backends)
    info = machine(args.device)
    rows = []
    with torch.no_grad():
        for shape in shapes(args.tiny, args.sd2, args.today):
            rows += measure(ad, shape, args.backends, verdicts, args.device, DTYPES[args.dtype], args.repeats,
                            args.cuda_graph)
            print(f"attention: {shape[0]} done", file=sys.stderr)
    return dict(kind="attention", schema=1, machine=info, backend_status=backend_status_list(),
                config=dict(device=args.device, dtype=args.dtype, tiny=args.tiny, repeats=args.repeats,
                            backends=args.backends, tiny_divisor=TINY_DIVISOR if args.tiny else None,
                            sd2=args.sd2, today=args.today, cuda_graph=args.cuda_graph),
                rows=rows)


def render(report: dict[str, Any]) -> str:
    rows, backends = report["rows"], report["config"]["backends"]
    by_shape = {}
    for r in rows:
        dims = f"{r['batch']}x{r['heads']}x{r['q_len']}x{r['kv_len']}x{r['head_dim']}"
        by_shape.setdefault(r["shape"], dict(shape=r["shape"], dims=dims, chose=r["auto_choice"]))[r["backend"]] = r

    def cell(name):
        def fmt(entry):
            r = entry[name]
            if r["status"] == "ok":
                return f"{r['ms']:.3f} ({r['tflops']:.3g})"
            return r["status"]
        return fmt

    columns = [("shape", "shape", None), ("B x H x Sq x Sk x D", "dims", None)]
    columns += [(name, cell(name), None) for name in backends] + [("auto chose", "chose", None)]
    c = report["config"]
    notes = sorted({f"{r['backend']}: {r['status']}: {r['reason']}" for r in rows if r["status"] != "ok"})
    return "\n".join([header(report["machine"]),
                      f"# attention: {c['dtype']} on {c['device']}, ms per call (TFLOP/s), median of {c['repeats']}"
                      + (f"; --tiny: sequence lengths / {c['tiny_divisor']}" if c["tiny"] else "")
                      + ("; each call a CUDA graph replay" if c.get("cuda_graph") else ""),
                      "", table(columns, list(by_shape.values()))] + (["", *notes] if notes else []))


def parse(argv: Sequence[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench attention", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    names = [n for n in KNOWN_BACKENDS if n != "installed"]
    try:  # and whatever else this dispatcher registers (flash-attn-4, ...), so that the default measures all
        names += [n for n in dispatcher().BACKENDS if n not in names]
    except (BenchError, AttributeError):
        pass
    ap.add_argument("--backends", default=",".join(names), help=f"comma-separated, from: {', '.join(names)}")
    ap.add_argument("--device", help="default: cuda when available, else cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), help="default: fp16 on CUDA, fp32 on CPU")
    ap.add_argument("--tiny", action="store_true", help=f"sequence lengths / {TINY_DIVISOR} (the default without CUDA)")
    ap.add_argument("--repeats", type=int, help="timed blocks per cell; the median is reported (default 10, "
                                                "3 on a CPU)")
    ap.add_argument("--sd2", action="store_true", help="also SD 2.x's head dim 64 and a head dim of 128")
    ap.add_argument("--today", action="store_true",
                    help="the shapes of SDXL, SD3 medium and Flux.1-dev at 1024x1024 instead of SD 1.x's")
    ap.add_argument("--cuda-graph", action="store_true", help="time each call as the replay of a CUDA graph "
                                                                "(the fast path's view: no Python, no launches)")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    try:
        args.backends = parse_backends(args.backends, names)
        args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        cuda = torch.device(args.device).type == "cuda"
        if cuda and not torch.cuda.is_available():
            raise BenchError(f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA device")
        args.dtype = args.dtype or ("fp16" if cuda else "fp32")
        args.tiny = args.tiny or not cuda
        args.repeats = args.repeats if args.repeats is not None else (10 if cuda else 3)
        if args.cuda_graph and not cuda:
            raise BenchError("--cuda-graph needs a CUDA device")
        if args.repeats < 1:
            raise BenchError("--repeats must be at least 1")
    except BenchError as e:
        ap.error(str(e))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    try:
        report = run(args)
    except BenchError as e:
        print(f"benchmark attention: error: {e}", file=sys.stderr)
        return 2
    print(render(report))
    if args.json:
        write_json(args.json, report)
        print(f"\nJSON: {args.json}")
    return 1 if any(r["status"] == "error" for r in report["rows"]) else 0
