"""``python -m bench models``: today's models (SDXL, SD3, Flux) at full size, one side per process.

Each process times one model on the installed diffusers (the fork at 0.42.1, or pristine upstream) through
the model's own pipeline, with random weights made on the GPU from one seed (``local_sdxl_sd3_flux``: the
same numbers on both sides, no checkpoint on disk), and writes one JSON file. Rows:

  eager   the installed diffusers as it comes (the fork: ``auto`` attention; upstream: its default)
  math    the fork's reference attention (the pixels every row is compared with; one timed call)
  graphs  the fork's fast path without compile (CUDA graphs only)
  fast    the fork's fast path, ``enable_fast_path(compile=True)``
  best    upstream's own speed recipe (docs/source/en/optimization/fp16.md): inductor flags, channels-last
          where there are convolutions, ``fuse_qkv_projections()``, the denoiser and ``vae.decode`` compiled
          with ``mode="max-autotune", fullgraph=True``; ``--best-mode`` names another mode (say so when used)

Per row: seconds per image (median of ``--repeats`` calls after a warm-up call), the denoiser's ms per step,
the VAE decode's and the text encoders' ms (CUDA events around each call, no host wait), peak GiB, the
warm-up call's seconds, and the first image as uint8 in ``--images`` for ``python -m bench models compare``.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a photograph of an astronaut riding a horse on the moon"
SETTINGS = {  # steps, guidance, dtype: the settings (SDXL and SD3 with classifier-free guidance)
    "sdxl": dict(steps=30, guidance_scale=5.0, dtype="fp16"),
    "sd3": dict(steps=28, guidance_scale=7.0, dtype="fp16"),
    "flux": dict(steps=28, guidance_scale=3.5, dtype="bf16"),
}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
# upstream's recipe: torch._inductor.config as docs/source/en/optimization/fp16.md sets it
BEST_INDUCTOR = {"conv_1x1_as_mm": True, "coordinate_descent_tuning": True,
                 "coordinate_descent_check_all_directions": True, "epilogue_fusion": False}


def _load(name: str, relative: str) -> ModuleType:
    """One of our modules loaded by path: usable whichever diffusers is installed (pristine upstream too)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def builders() -> ModuleType:
    local = _load("_bench_local_pipelines", "src/diffusers/flash/local_pipelines.py")
    models = _load("_bench_local_sdxl_sd3_flux", "src/diffusers/flash/local_sdxl_sd3_flux.py")
    models.TOKENIZER_SOURCE = local
    return models


def is_fork() -> bool:
    import diffusers

    return "+flash" in diffusers.__version__


class Timers:
    """CUDA events around every call of the pipeline's parts; read after the call has synchronised."""

    def __init__(self, pipe: Any) -> None:
        self.events: dict[str, list[tuple[torch.cuda.Event, torch.cuda.Event]]] = {}
        self.undo: list[Callable[[], None]] = []
        denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
        self._hook(denoiser, "denoiser")
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            if getattr(pipe, name, None) is not None:
                self._hook(getattr(pipe, name), "text")
        vae = pipe.vae
        decode = vae.decode
        had = "decode" in vae.__dict__

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = self._start("vae")
            out = decode(*args, **kwargs)
            self._end("vae", start)
            return out

        vae.decode = timed
        self.undo.append(lambda: setattr(vae, "decode", decode) if had else vae.__dict__.pop("decode", None))

    def _start(self, name: str) -> torch.cuda.Event:
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def _end(self, name: str, start: torch.cuda.Event) -> None:
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        self.events.setdefault(name, []).append((start, e))

    def _hook(self, module: torch.nn.Module, name: str) -> None:
        starts: list[torch.cuda.Event] = []
        pre = module.register_forward_pre_hook(lambda m, a: starts.append(self._start(name)))
        post = module.register_forward_hook(lambda m, a, o: self._end(name, starts.pop()))
        self.undo += [pre.remove, post.remove]

    def reset(self) -> None:
        self.events = {}

    def ms(self) -> dict[str, float]:
        torch.cuda.synchronize()
        return {k: sum(s.elapsed_time(e) for s, e in v) for k, v in self.events.items()} | {
            f"{k}_calls": len(v) for k, v in self.events.items()}

    def close(self) -> None:
        for fn in self.undo:
            fn()


ROW_BACKEND = {"math": "math", "eager": None, "graphs": None, "fast": None}  # the fork's rows; None: auto


def set_row_backend(row: str) -> None:
    """The fork's attention backend for ``row`` (``math`` for the reference row, ``auto`` for the others)."""
    from diffusers.flash.attention.dispatch import set_attention_backend

    set_attention_backend(ROW_BACKEND[row])


def apply_best(pipe: Any, mode: str) -> list[str]:
    """Upstream's own speed recipe on ``pipe``; returns what was applied."""
    import torch._inductor.config as config

    done = []
    for key, value in BEST_INDUCTOR.items():
        setattr(config, key, value)
    done.append("inductor flags")
    # the pipeline's fuse_qkv_projections where it has one (SDXL), else each model's (SD3's and Flux's transformer)
    owners = [("pipeline", pipe)] if hasattr(pipe, "fuse_qkv_projections") else [
        (name, getattr(pipe, name, None)) for name in ("unet", "transformer", "vae")]
    for name, owner in owners:
        if owner is None or not hasattr(owner, "fuse_qkv_projections"):
            continue
        try:
            owner.fuse_qkv_projections()
            done.append(f"fuse_qkv_projections ({name})")
        except Exception as e:  # models that cannot fuse: the recipe goes on without
            done.append(f"no fuse_qkv_projections ({name}: {type(e).__name__})")
    if getattr(pipe, "unet", None) is not None:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.unet = torch.compile(pipe.unet, mode=mode, fullgraph=True)
        done.append("channels-last UNet")
    else:
        pipe.transformer = torch.compile(pipe.transformer, mode=mode, fullgraph=True)
    pipe.vae.to(memory_format=torch.channels_last)
    pipe.vae.decode = torch.compile(pipe.vae.decode, mode=mode, fullgraph=True)
    done += ["channels-last VAE", f"denoiser and vae.decode compiled ({mode}, fullgraph)"]
    return done


def call(pipe: Any, model: str, images: int, size: int, seed: int = 0) -> np.ndarray:
    s = SETTINGS[model]
    kwargs: dict[str, Any] = dict(prompt=[PROMPT] * images, height=size, width=size,
                                  num_inference_steps=s["steps"], guidance_scale=s["guidance_scale"],
                                  generator=torch.Generator("cuda").manual_seed(seed), output_type="np")
    if model == "flux":
        kwargs["max_sequence_length"] = 512
    out = pipe(**kwargs).images
    torch.cuda.synchronize()
    return np.asarray(out)


def time_row(pipe: Any, model: str, row: str, images: int, size: int, repeats: int) -> dict[str, Any]:
    steps = SETTINGS[model]["steps"]
    t0 = time.perf_counter()
    first = call(pipe, model, images, size)
    warm = time.perf_counter() - t0
    torch.cuda.reset_peak_memory_stats()
    timers = Timers(pipe)
    walls, parts = [], []
    try:
        for _ in range(repeats):
            timers.reset()
            t0 = time.perf_counter()
            pixels = call(pipe, model, images, size)
            walls.append(time.perf_counter() - t0)
            parts.append(timers.ms())
    finally:
        timers.close()
    med = statistics.median(walls)
    part = {k: statistics.median(p.get(k, 0.0) for p in parts) for k in parts[0]}
    return {
        "row": row, "images": images, "s_per_call": med, "s_per_image": med / images, "img_per_s": images / med,
        "calls_s": walls, "warmup_s": warm,
        "denoiser_ms_per_step": part.get("denoiser", 0.0) / steps,
        "denoiser_calls": part.get("denoiser_calls"), "vae_ms": part.get("vae", 0.0),
        "text_ms": part.get("text", 0.0), "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "nonfinite": float(np.mean(~np.isfinite(pixels))), "same_as_warmup": bool(np.array_equal(first, pixels)),
        "_pixels": pixels[0],
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    import diffusers
    import transformers

    fork = is_fork()
    for row in args.rows:
        if row in ("math", "graphs", "fast") and not fork:
            raise SystemExit(f"bench models: row {row!r} needs the fork (installed: diffusers {diffusers.__version__})")
        if row == "best" and fork:
            raise SystemExit("bench models: the 'best' row is upstream's: run it with pristine diffusers installed")
    s = SETTINGS[args.model]
    local = builders()
    size = local.image_size(args.model, "full")
    t0 = time.perf_counter()
    pipe = local.pipeline(args.model, "full", seed=0, device="cuda", dtype=DTYPES[s["dtype"]])
    build_s = time.perf_counter() - t0
    pipe.set_progress_bar_config(disable=True)
    fa4 = importlib.util.find_spec("flash_attn") is not None
    report: dict[str, Any] = {
        "model": args.model, "side": "fork" if fork else "upstream", "diffusers": diffusers.__version__,
        "torch": torch.__version__, "transformers": transformers.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(), "card": torch.cuda.get_device_name(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "flash_attn_4_installed": fa4,
        "size": size, "build_s": build_s, "rows": [], **s,
    }
    os.makedirs(args.images, exist_ok=True)
    for row in args.rows:
        applied: Any = None
        if fork:  # every row names its backend: an eager row after the math row is auto's, not math's
            set_row_backend(row)
        if row in ("graphs", "fast"):
            applied = pipe.enable_fast_path(compile=row == "fast")
        elif row == "best":
            applied = apply_best(pipe, args.best_mode)
        for images in args.batch:
            print(f"[{time.strftime('%H:%M:%S')}] {args.model} {report['side']} {row} x{images}", flush=True)
            try:
                r = time_row(pipe, args.model, row, images, size, 1 if row == "math" else args.repeats)
            except torch.OutOfMemoryError as e:
                r = {"row": row, "images": images, "error": f"out of memory: {str(e).splitlines()[0]}"}
                torch.cuda.empty_cache()
            pixels = r.pop("_pixels", None)
            if pixels is not None:
                mine = (np.clip(pixels, 0, 1) * 255).round().astype(np.uint8)
                np.save(Path(args.images) / f"{args.model}-{report['side']}-{row}-{images}.npy", mine)
                ref = Path(args.images) / f"{args.model}-fork-math-{images}.npy"
                if ref.exists():  # the largest pixel difference against the fork's math path, in 1/255
                    r["max_diff_vs_math"] = int(np.abs(mine.astype(np.int16) - np.load(ref).astype(np.int16)).max())
            r["applied"] = applied if isinstance(applied, (list, str)) or applied is None else {
                k: v for k, v in applied.items() if k in ("cuda_graphs", "compile", "float32", "reasons")}
            report["rows"].append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "calls_s"}), flush=True)
            if args.json:  # after every row: a call stopped at its time limit keeps what it measured
                Path(args.json).write_text(json.dumps(report, indent=1))
        if row in ("graphs", "fast"):
            pipe.disable_fast_path()
    return report


def work(model: str, size: str = "full", device: str = "meta") -> dict[str, float]:
    """TFLOP of one denoiser call (the batch each pipeline runs for one image: 2 under guidance for SDXL and SD3,
    1 for guidance-distilled Flux) and of one VAE decode, at the benchmark's image size, counted by
    FlopCounterMode. On ``meta`` tensors (the default) nothing is allocated, so the full models count on any
    machine; the dispatcher does not serve meta tensors, so there attention is torch's SDPA, which FlopCounterMode
    counts as its two matmuls, as the dispatcher's ``math`` backend counts on real tensors."""
    import unittest.mock

    from torch.utils.flop_counter import FlopCounterMode

    local = builders()
    cfg = local.CONFIGS[model][size]
    side = cfg["image_size"] // 2 ** (len(cfg["vae"]["block_out_channels"]) - 1)  # latents
    import diffusers
    from diffusers.flash.attention import dispatch

    def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None, *args: Any,
             **kwargs: Any) -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)

    def count(fn: Callable[[], Any]) -> float:
        mode = FlopCounterMode(display=False)
        with mode, torch.no_grad():
            if device == "meta":
                with unittest.mock.patch.object(dispatch, "attention", sdpa):
                    fn()
            else:
                with dispatch.attention_backend("math"):
                    fn()
        return mode.get_total_flops() / 1e12

    with local._building(device, torch.float32 if device == "cpu" else torch.bfloat16):
        torch.manual_seed(0)
        r = torch.randn
        if model == "sdxl":
            c = cfg["unet"]
            net = diffusers.UNet2DConditionModel(**c)
            text_embeds = c["projection_class_embeddings_input_dim"] - 6 * c["addition_time_embed_dim"]
            step = lambda: net(r(2, c["in_channels"], side, side), torch.ones(2), r(2, 77, c["cross_attention_dim"]),  # noqa: E731
                               added_cond_kwargs={"text_embeds": r(2, text_embeds), "time_ids": r(2, 6)})
        elif model == "sd3":
            c = cfg["transformer"]
            net = diffusers.SD3Transformer2DModel(**c)
            step = lambda: net(hidden_states=r(2, c["in_channels"], side, side), timestep=torch.ones(2),  # noqa: E731
                               encoder_hidden_states=r(2, 77 + 256, c["joint_attention_dim"]),
                               pooled_projections=r(2, c["pooled_projection_dim"]))
        else:
            c = cfg["transformer"]
            net = diffusers.FluxTransformer2DModel(**c)
            tokens, guidance = (side // 2) ** 2, torch.ones(1) if c.get("guidance_embeds") else None
            step = lambda: net(hidden_states=r(1, tokens, c["in_channels"]), timestep=torch.ones(1),  # noqa: E731
                               encoder_hidden_states=r(1, 512, c["joint_attention_dim"]),
                               pooled_projections=r(1, c["pooled_projection_dim"]), img_ids=torch.zeros(tokens, 3),
                               txt_ids=torch.zeros(512, 3), guidance=guidance)
        vae = diffusers.AutoencoderKL(**cfg["vae"])
        decode = lambda: vae.decode(r(1, cfg["vae"]["latent_channels"], side, side))  # noqa: E731
        return {"denoiser_tflop": count(step), "vae_tflop": count(decode),
                "denoiser_params_b": sum(p.numel() for p in net.parameters()) / 1e9}


# Flux's transformer shrunk for the CPU, from Flux.1-dev's: 12 heads of 128 (not 24), 2 double and 4 single
# blocks (not 19 and 38), text features of 1024 (not 4096)
DRIFT_REDUCED = dict(num_attention_heads=12, num_layers=2, num_single_layers=4, joint_attention_dim=1024)
DRIFT_ROWS = (("bf16 math", "math", False), ("bf16 auto", "auto", False), ("bf16 auto compiled", "auto", True))


def drift(size: str = "reduced", steps: int = 28, image_tokens: int = 256, text_tokens: int = 128,
          device: str = "cpu", rows: Sequence[tuple[str, str, bool]] = DRIFT_ROWS) -> dict[str, Any]:
    """How far Flux's bf16 rows land from a float32 computation after ``steps`` Euler steps of its transformer
    (random weights rounded to bf16 first, so only the arithmetic differs; random text embeddings), in units of
    the float32 result's standard deviation: each row against float32 ``math``, and each pair of rows. Shows
    whether a row that differs from bf16 ``math`` is further from the exact result, or as far in another
    direction. ``size``: "reduced" (Flux.1-dev's with :data:`DRIFT_REDUCED`, minutes on a CPU), "full"
    (Flux.1-dev's, a GPU) or "tiny"."""
    import diffusers
    from diffusers.flash.attention import dispatch

    side = round(max(image_tokens, 0) ** 0.5)
    if steps < 1 or text_tokens < 1 or side * side != image_tokens or side < 1:
        raise ValueError("steps and text_tokens must be at least 1, image_tokens a square number "
                         f"(got {steps}, {text_tokens}, {image_tokens})")
    configs = builders().CONFIGS["flux"]
    cfg = dict(configs["full"]["transformer"], **DRIFT_REDUCED) if size == "reduced" else configs[size]["transformer"]
    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel(**cfg).eval().to(device, torch.bfloat16).float()
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(1, image_tokens, cfg["in_channels"], generator=g).to(device)
    text = torch.randn(1, text_tokens, cfg["joint_attention_dim"], generator=g).to(device)
    pooled = torch.randn(1, cfg["pooled_projection_dim"], generator=g).to(device)
    grid = torch.arange(side, dtype=torch.float32)
    img_ids = torch.stack([torch.zeros(side, side), grid[:, None].expand(side, side),
                           grid[None].expand(side, side)], -1).reshape(-1, 3).to(device)
    txt_ids = torch.zeros(text_tokens, 3, device=device)
    sigmas = torch.linspace(1.0, 0.0, steps + 1)

    def run(dtype: torch.dtype, backend: str, compiled: bool) -> torch.Tensor:
        net = model.to(dtype)
        fn = torch.compile(net) if compiled else net
        x = x0.to(dtype)
        guidance = torch.full((1,), 3.5, device=device, dtype=dtype) if cfg.get("guidance_embeds") else None
        with torch.no_grad(), dispatch.attention_backend(backend):
            for i in range(steps):
                v = fn(hidden_states=x, timestep=sigmas[i].reshape(1).to(device, dtype), guidance=guidance,
                       encoder_hidden_states=text.to(dtype), pooled_projections=pooled.to(dtype), img_ids=img_ids,
                       txt_ids=txt_ids, return_dict=False)[0]
                x = (x.float() + float(sigmas[i + 1] - sigmas[i]) * v.float()).to(dtype)
        return x.float()

    exact = run(torch.float32, "math", False)
    unit = exact.std().item()

    def diff(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
        d = (a - b).abs()
        return {"max": d.max().item() / unit, "mean": d.mean().item() / unit}

    out = {name: run(torch.bfloat16, backend, compiled) for name, backend, compiled in rows}
    names = list(out)
    return {"size": size, "steps": steps, "tokens": [image_tokens, text_tokens], "device": device,
            "torch": torch.__version__, "vs_float32_math": {n: diff(out[n], exact) for n in names},
            "pairs": {f"{a} vs {b}": diff(out[a], out[b]) for i, a in enumerate(names) for b in names[i + 1:]}}


def compare(directory: str) -> dict[str, float]:
    """Largest pixel difference (in 1/255) of every saved first image against the fork's ``math`` image of the
    same model and batch."""
    out = {}
    files = sorted(Path(directory).glob("*.npy"))
    for f in files:
        model, side, row, images = f.stem.split("-")
        ref = Path(directory) / f"{model}-fork-math-{images}.npy"
        if not ref.exists() or f == ref:
            continue
        a, b = np.load(f).astype(np.int16), np.load(ref).astype(np.int16)
        out[f.stem] = int(np.abs(a - b).max())
    return out


def parse(argv: Sequence[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench models", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", choices=sorted(SETTINGS), help="which model, or 'compare DIR' for the pixel table")
    ap.add_argument("--rows", default="eager", help="comma-separated: eager, math, graphs, fast, best")
    ap.add_argument("--batch", default="1", help="images per call, comma-separated (default 1)")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per row after the warm-up call")
    ap.add_argument("--best-mode", default="max-autotune", help="torch.compile mode of the 'best' row")
    ap.add_argument("--images", default="out/bench-models", help="folder for the first image of each row")
    ap.add_argument("--json", help="write the report here")
    args = ap.parse_args(argv)
    args.rows = [r for r in args.rows.split(",") if r]
    bad = [r for r in args.rows if r not in ("eager", "math", "graphs", "fast", "best")]
    if bad:
        ap.error(f"unknown rows: {', '.join(bad)}")
    try:
        args.batch = [int(b) for b in args.batch.split(",")]
    except ValueError:
        ap.error(f"--batch takes whole numbers, not {args.batch!r}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["work"]:  # FLOPs of each model's step and VAE decode, on meta tensors (no GPU needed)
        print(json.dumps({m: work(m) for m in (argv[1:] or sorted(SETTINGS))}, indent=1))
        return 0
    if argv[:1] == ["drift"]:  # Flux's bf16 rows against a float32 computation (see drift)
        ap = argparse.ArgumentParser(prog="python -m bench models drift", description=drift.__doc__)
        ap.add_argument("--size", choices=("tiny", "reduced", "full"), default="reduced")
        ap.add_argument("--steps", type=int, default=28)
        ap.add_argument("--image-tokens", type=int, default=256, help="a square number (Flux at 1024x1024: 4096)")
        ap.add_argument("--text-tokens", type=int, default=128, help="(Flux.1-dev: 512)")
        ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        ap.add_argument("--json", help="write the report here")
        a = ap.parse_args(argv[1:])
        import diffusers

        if not hasattr(diffusers, "FluxTransformer2DModel"):
            print(f"bench models drift: needs Flux (diffusers 0.30 on; installed: {diffusers.__version__})",
                  file=sys.stderr)
            return 2
        try:
            report = drift(a.size, a.steps, a.image_tokens, a.text_tokens, a.device)
        except ValueError as e:
            ap.error(str(e))
        print(json.dumps(report, indent=1))
        if a.json:
            Path(a.json).write_text(json.dumps(report, indent=1))
        return 0
    if argv[:1] == ["compare"]:
        print(json.dumps(compare(argv[1] if len(argv) > 1 else "out/bench-models"), indent=1))
        return 0
    args = parse(argv)
    if not torch.cuda.is_available():
        print("bench models: needs a CUDA device (full-size SDXL, SD3 and Flux)", file=sys.stderr)
        return 2
    run(args)
    return 0
