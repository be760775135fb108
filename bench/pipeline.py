#!/usr/bin/env python3
"""diffusers-flash benchmark: Stable Diffusion v1.x end to end, per attention backend and batch size.

  python -m bench [options]            the full pipeline (text encode, UNet steps, VAE decode)
  python -m bench attention [options]  attention kernels alone on the SD 1.x shapes

The pipeline is the real StableDiffusionPipeline.__call__ (output_type="np"): by default the SD 1.x
architecture with random weights (timings do not depend on weight values), fp16, 512x512, 50 steps,
classifier-free guidance. The safety checker is left out of the timing unless --keep-safety-checker
(Diffusers 0.4.2 always runs it; stand-ins that pass images through take its place). Without CUDA it
runs a tiny configuration on the CPU (--tiny), which CI uses. See BENCHMARKS.md for every column.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from .common import (DTYPES, KNOWN_BACKENDS, BenchError, Clock, backend_status_list, backend_verdicts, dispatcher,
                     fast_path_modes, free_memory, header, is_oom, machine, matmul_peak, median, parse_backends,
                     parse_ints, progress, table, write_json)

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a photograph of an astronaut riding a horse"
GIB = 2 ** 30


# ---------------------------------------------------------------------------------------------- pipelines
def _local_pipelines_source() -> ModuleType:
    """src/diffusers/flash/local_pipelines.py loaded by path: its SD 1.x configs and offline tokenizer, usable
    even when the installed diffusers is another release (--external-diffusers)."""
    path = ROOT / "src/diffusers/flash/local_pipelines.py"
    spec = importlib.util.spec_from_file_location("_bench_local_pipelines", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fork_pipeline(size: str) -> Any:
    from diffusers.flash import local_pipelines

    return local_pipelines.stable_diffusion(size)


def external_pipeline(size: str) -> Any:
    """SD 1.x from the installed diffusers' own classes (any release with the same constructor), random
    weights, no safety checker: for timing a newest-upstream environment against this fork."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel

    local = _local_pipelines_source()
    cfg = local.CONFIGS[size]
    tokenizer = local.make_tokenizer()
    vocab = max(len(tokenizer), 1000 if size == "tiny" else 49408)
    try:
        torch.manual_seed(0)
        unet = diffusers.UNet2DConditionModel(**cfg["unet"])
        vae = diffusers.AutoencoderKL(**cfg["vae"])
        text = CLIPTextModel(CLIPTextConfig(vocab_size=vocab, bos_token_id=tokenizer.bos_token_id,
                                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                            layer_norm_eps=1e-5, **cfg["text"])).eval()
        scheduler = diffusers.PNDMScheduler(skip_prk_steps=True, steps_offset=1, beta_start=0.00085, beta_end=0.012,
                                            beta_schedule="scaled_linear")  # steps_offset: SD 1.x's own config
    except (TypeError, ValueError, AttributeError) as e:
        raise BenchError(f"diffusers {diffusers.__version__}: cannot build the SD 1.x parts ({e})") from None
    parts = dict(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                 safety_checker=None, feature_extractor=None)
    try:
        return diffusers.StableDiffusionPipeline(**parts, requires_safety_checker=False)
    except TypeError:  # releases before requires_safety_checker (0.7), which also refuse None for a part
        try:
            parts.update(safety_checker=_PassThroughSafety(), feature_extractor=_PassThroughFeatures())
            return diffusers.StableDiffusionPipeline(**parts)
        except Exception as e:
            raise BenchError(f"diffusers {diffusers.__version__}: cannot build StableDiffusionPipeline ({e})") from None


def pretrained_pipeline(model: str, dtype: torch.dtype) -> Any:
    from diffusers import StableDiffusionPipeline

    try:
        return StableDiffusionPipeline.from_pretrained(model, torch_dtype=dtype)
    except Exception as e:
        raise BenchError(f"cannot load --model {model!r}: {type(e).__name__}: {e}") from None


class _PassThroughFeatures:
    """Takes the feature extractor's place while the safety checker is off: costs nothing."""

    def __call__(self, images, **kwargs):
        return self

    def to(self, *args, **kwargs):
        return self

    @property
    def pixel_values(self):
        return self


class _PassThroughSafety:
    def __call__(self, images, clip_input=None, **kwargs):
        return images, [False] * len(images)


def drop_safety_checker(pipe: Any) -> str:
    """Leave the safety checker out of the timing. Releases that accept safety_checker=None skip it; 0.4.2
    calls it unconditionally, so pass-through stand-ins replace it, the feature extractor and the
    PIL conversion that feeds them (used for nothing else with output_type="np")."""
    if getattr(pipe, "safety_checker", None) is None:
        return "absent"
    if "requires_safety_checker" in getattr(pipe, "config", {}):  # releases >= 0.7 skip a None checker
        pipe.safety_checker = None
        return "set to None (not run)"
    pipe.safety_checker = _PassThroughSafety()
    pipe.feature_extractor = _PassThroughFeatures()
    pipe.numpy_to_pil = lambda images: images
    return "replaced by a pass-through (not timed)"


def place(pipe: Any, device: str, dtype: torch.dtype) -> Any:
    for part in vars(pipe).values():
        if isinstance(part, torch.nn.Module):
            part.to(device=device, dtype=dtype)
    return pipe


def use_backend(pipe: Any, name: str, scope: str) -> Callable[[], None]:
    """Force ``name`` on the whole pipeline or on its UNet only ("installed": leave attention alone).
    Returns what undoes a process-wide setting (a later backend overrides a per-model one)."""
    if name == "installed":
        return lambda: None
    target = pipe.unet if scope == "unet" else pipe
    if hasattr(target, "set_attention_backend"):
        target.set_attention_backend(name)
        return lambda: None
    if scope == "unet":
        raise BenchError("this diffusers' UNet has no set_attention_backend(); --scope unet needs it")
    ad = dispatcher()  # a dispatcher without the model/pipeline hooks: the process-wide default
    ad.set_attention_backend(name)
    return lambda: ad.set_attention_backend(None)


# ---------------------------------------------------------------------------------------------- timing core
def shadow(obj: Any, attr: str, fn: Callable) -> Callable[[], None]:
    """Put ``fn`` in place of ``obj.attr`` (an instance attribute shadows a method); returns the undo."""
    had, old = attr in vars(obj), vars(obj).get(attr)
    setattr(obj, attr, fn)
    return (lambda: setattr(obj, attr, old)) if had else (lambda: delattr(obj, attr))


class Sections:
    """Times every UNet and text-encoder call (forward hooks) and the VAE's decode (the method wrapped),
    on the device's timeline. Works on any pipeline with unet, text_encoder and vae.decode."""

    def __init__(self, pipe: Any, clock: Clock) -> None:
        self.clock, self.spans, self._undo = clock, {"unet": [], "text": [], "vae": []}, []
        self._hook(pipe.unet, "unet")
        self._hook(pipe.text_encoder, "text")
        self._wrap(pipe.vae, "decode", "vae")

    def _hook(self, module, name):
        starts = []
        pre = module.register_forward_pre_hook(lambda m, args: starts.append(self.clock.stamp()))
        post = module.register_forward_hook(lambda m, args, out: self.spans[name].append((starts.pop(),
                                                                                          self.clock.stamp())))
        self._undo += [pre.remove, post.remove]

    def _wrap(self, obj, attr, name):
        inner = getattr(obj, attr)

        def timed(*args, **kwargs):
            start = self.clock.stamp()
            out = inner(*args, **kwargs)
            self.spans[name].append((start, self.clock.stamp()))
            return out

        self._undo.append(shadow(obj, attr, timed))

    def reset(self) -> None:
        for spans in self.spans.values():
            spans.clear()

    def ms(self) -> dict[str, list[float]]:
        self.clock.sync()
        return {name: [self.clock.ms(a, b) for a, b in spans] for name, spans in self.spans.items()}

    def close(self):
        for undo in reversed(self._undo):
            undo()


def generate(pipe: Any, images: int, steps: int, height: int, width: int, guidance_scale: float, device: str,
             seed: int = 0) -> tuple[int, ...]:
    generator = torch.Generator(device=device).manual_seed(seed)
    out = pipe([PROMPT] * images, height=height, width=width, num_inference_steps=steps,
               guidance_scale=guidance_scale, generator=generator, output_type="np")
    pixels = out.images if hasattr(out, "images") else out[0]
    got = tuple(pixels.shape)
    if got[0] != images or got[-1] != 3:
        raise RuntimeError(f"the pipeline returned images of shape {got} for {images} requested")
    generate.last = pixels  # kept, not inspected here: the check runs after the timed calls
    return got


generate.last = None


def nonfinite_share(pixels: Any) -> float | None:
    """The share of pixel values that are inf or NaN (None: not an array). Random weights in fp16 can
    overflow, and a card runs such data at another speed, so each row reports it."""
    import numpy as np

    try:
        values = np.asarray(pixels, dtype=np.float32)
    except (TypeError, ValueError):
        return None
    return float(1.0 - np.isfinite(values).mean()) if values.size else None


def time_pipeline(pipe: Any, images: int, *, steps: int = 50, height: int = 512, width: int = 512,
                  guidance_scale: float = 7.5, repeats: int = 3, warmup_steps: int = 5,
                  device: str = "cuda") -> dict[str, Any]:
    """Time ``pipe(...)`` (any Stable Diffusion pipeline with 0.4.2's __call__ signature) making ``images``
    images: one warm-up call of ``warmup_steps`` steps, then ``repeats`` timed calls, synchronised.
    Returns medians over the repeats; raises torch.cuda.OutOfMemoryError like the pipeline does."""
    clock = Clock(device)
    sections = Sections(pipe, clock)
    cuda = clock.cuda
    try:
        warmup_s = None
        if warmup_steps:  # also where the fast path captures (and compiles): reported as warm-up time
            clock.sync()
            start = time.perf_counter()
            generate(pipe, images, warmup_steps, height, width, guidance_scale, device)
            clock.sync()
            warmup_s = time.perf_counter() - start
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        runs = []
        for _ in range(repeats):
            sections.reset()
            clock.sync()
            start = time.perf_counter()
            shape = generate(pipe, images, steps, height, width, guidance_scale, device)
            clock.sync()
            wall = time.perf_counter() - start
            ms = sections.ms()
            runs.append(dict(wall_s=wall, unet_step_ms=median(ms["unet"]), unet_calls=len(ms["unet"]),
                             vae_decode_ms=sum(ms["vae"]), text_encode_ms=sum(ms["text"])))
    finally:
        sections.close()
    wall = median([r["wall_s"] for r in runs])
    return dict(img_per_s=images / wall, s_per_img=wall / images, wall_s=wall, warmup_s=warmup_s,
                nonfinite_share=nonfinite_share(generate.last),
                wall_s_runs=[round(r["wall_s"], 4) for r in runs],
                unet_step_ms=median([r["unet_step_ms"] for r in runs]), unet_calls=runs[0]["unet_calls"],
                vae_decode_ms=median([r["vae_decode_ms"] for r in runs]),
                text_encode_ms=median([r["text_encode_ms"] for r in runs]),
                peak_mem_gib=torch.cuda.max_memory_allocated() / GIB if cuda else None,
                image_shape=list(shape[1:]))


def fits(pipe: Any, images: int, steps: int, height: int, width: int, guidance_scale: float, device: str) -> bool:
    """Whether ``images`` images go through the pipeline without running out of memory."""
    try:
        generate(pipe, images, steps, height, width, guidance_scale, device)
        return True
    except Exception as e:
        if not is_oom(e):
            raise
        return False
    finally:
        free_memory()


def find_max_batch(fits_fn: Callable[[int], bool], limit: int = 1024, start: int = 1) -> int:
    """Largest n <= limit with fits_fn(n): double from ``start`` until one does not fit, then bisect.
    0 when not even ``start`` fits."""
    if not fits_fn(start):
        return 0
    lo, hi = start, None
    while hi is None:
        n = min(2 * lo, limit)
        if n == lo:
            return lo
        if fits_fn(n):
            lo = n
        else:
            hi = n
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits_fn(mid) else (lo, mid)
    return lo


# ---------------------------------------------------------------------------------------------- work (FLOPs)
class FlopSections:
    """FLOPs of the first UNet call, the VAE decode and the text encoder in one pipeline call, counted by
    torch.utils.flop_counter.FlopCounterMode entered around each section through hooks; later UNet
    calls are only counted (PNDM makes steps + 1 of them)."""

    def __init__(self, pipe: Any) -> None:
        self.counts, self.unet_calls, self._undo, self._open = {"unet": [], "text": [], "vae": []}, 0, [], None
        for module, name in ((pipe.unet, "unet"), (pipe.text_encoder, "text")):
            pre = module.register_forward_pre_hook(lambda m, a, name=name: self._enter(name))
            post = module.register_forward_hook(lambda m, a, o, name=name: self._exit(name))
            self._undo += [pre.remove, post.remove]
        inner = pipe.vae.decode

        def decode(*args, **kwargs):
            self._enter("vae")
            try:
                return inner(*args, **kwargs)
            finally:
                self._exit("vae")

        self._undo.append(shadow(pipe.vae, "decode", decode))

    def _enter(self, name):
        if name == "unet":
            self.unet_calls += 1
            if self.unet_calls > 1:
                return
        from torch.utils.flop_counter import FlopCounterMode

        self._open = FlopCounterMode(display=False)
        self._open.__enter__()

    def _exit(self, name):
        mode, self._open = self._open, None
        if mode is not None:
            mode.__exit__(None, None, None)
            if name:
                self.counts[name].append(mode.get_total_flops())

    def close(self):
        if self._open is not None:  # an error inside a section
            self._exit(None)
        for undo in reversed(self._undo):
            undo()


def count_work(pipe: Any, steps: int, height: int, width: int, guidance_scale: float, device: str,
               backend: str) -> dict[str, Any]:
    """FLOPs per image: one UNet call (batch 2 under guidance) x the UNet calls + VAE decode + text
    encode, from one pipeline call making one image. Attention is counted on ``backend`` ("math" when
    the dispatcher exists: FlopCounterMode sees its matmuls, not a fused CPU or outside kernel)."""
    flops = FlopSections(pipe)
    try:
        ad = dispatcher() if backend != "installed" else None
        ctx = ad.attention_backend(backend) if ad and hasattr(ad, "attention_backend") else contextlib.nullcontext()
        with ctx:
            generate(pipe, 1, steps, height, width, guidance_scale, device)
    finally:
        flops.close()
    c = flops.counts
    if not c["unet"] or not c["vae"] or not c["unet"][0]:
        raise RuntimeError(f"FLOP count saw {flops.unet_calls} UNet and {len(c['vae'])} VAE calls, "
                           f"{c['unet'][:1]} UNet FLOPs")
    unet, vae, text = c["unet"][0], sum(c["vae"]), sum(c["text"])
    return dict(unet_step_tflop=unet / 1e12, unet_calls=flops.unet_calls, vae_decode_tflop=vae / 1e12,
                text_encode_tflop=text / 1e12, tflop_per_image=(flops.unet_calls * unet + vae + text) / 1e12,
                attention_counted_on=backend)


# ---------------------------------------------------------------------------------------------- the run
def build(args: argparse.Namespace) -> tuple[Any, dict[str, str]]:
    device, dtype = args.device, DTYPES[args.dtype]
    size = "tiny" if args.tiny else "sd1"
    if args.model:
        pipe, source = pretrained_pipeline(args.model, dtype), f"weights from {args.model}"
    elif args.external_diffusers:
        pipe, source = external_pipeline(size), f"installed diffusers' own classes, {size}, random weights"
    else:
        pipe, source = fork_pipeline(size), f"local_pipelines.stable_diffusion({size!r}), random weights"
    safety = "kept (timed)" if args.keep_safety_checker else drop_safety_checker(pipe)
    place(pipe, device, dtype)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    return pipe, dict(model=source, safety_checker=safety, pipeline=type(pipe).__name__,
                      scheduler=type(pipe.scheduler).__name__)


def measure_backend(pipe: Any, name: str, args: argparse.Namespace, bar: Any,
                    add: Callable[[dict], None]) -> int | None:
    """Rows for one backend (one per batch size, passed to ``add``); its largest batch (None: not probed)."""
    gen = dict(height=args.height, width=args.width, guidance_scale=args.guidance_scale, device=args.device)
    base, _, fast = name.partition("+")
    undo = use_backend(pipe, base, args.scope)
    if fast == "reduce-overhead":  # the peer: the UNet's forward through torch.compile with CUDA graphs
        pipe.unet.forward = torch.compile(pipe.unet.forward, mode="reduce-overhead")
        undo = lambda: pipe.unet.__dict__.pop("forward", None)  # noqa: E731
        fast = None
    elif fast == "best":  # the peer at its best: upstream's own recipe (fp16.md), see bench/models.apply_best
        from bench.models import apply_best

        unet = pipe.unet
        apply_best(pipe, args.best_mode)
        undo = lambda: (setattr(pipe, "unet", unet), pipe.vae.__dict__.pop("decode", None))  # noqa: E731
        fast = None
    elif fast:  # the fast path on top: CUDA graphs of the UNet step (and torch.compile with +compile)
        compile, compile_vae = fast_path_modes(fast)  # e.g. compile-graphs: the UNet compiled, the VAE graphed
        report = pipe.enable_fast_path(compile=compile, compile_vae=compile_vae,
                                       parallel_compile=args.parallel_compile)
        if not report["cuda_graphs"]:
            undo()
            add(failed_row(name, None, BenchError("fast path not applied: " + "; ".join(report["reasons"]))))
            return None
    try:
        max_batch, batches = None, args.batch_sizes
        if args.find_max_batch:
            bar.set_postfix_str(f"{name}: probing the largest batch")
            try:
                max_batch = find_max_batch(lambda n: fits(pipe, n, args.probe_steps, **gen), args.max_batch_limit)
            except Exception as e:
                add(failed_row(name, None, e))
                return None
            powers = {2 ** i for i in range(max_batch.bit_length())}  # 1, 2, 4, ... up to max_batch
            batches = batches or (sorted(powers | {max_batch}) if max_batch else [1])  # [1]: reported as oom
        for images in batches:
            add(time_row(pipe, name, images, args, gen, bar))
        return max_batch
    finally:
        undo()
        if fast:
            pipe.disable_fast_path()


def time_row(pipe: Any, name: str, images: int, args: argparse.Namespace, gen: dict[str, Any],
             bar: Any) -> dict[str, Any]:
    bar.set_postfix_str(f"{name}, {images} images")
    try:
        row = dict(backend=name, images=images, status="ok", reason=None)
        before = warmup_parts(pipe)
        row.update(time_pipeline(pipe, images, steps=args.steps, repeats=args.repeats,
                                 warmup_steps=args.warmup_steps, **gen))
        after = warmup_parts(pipe)
        if after:  # the fast path's capture (and compile) seconds per model, for this batch size
            row["warmup_parts_s"] = {k: round(v - before.get(k, 0.0), 2) for k, v in after.items()}
            helper = compile_helper(pipe)
            if helper:  # what the helper-process compile of the VAE decoder did, per shape
                row["compile_helper"] = helper
    except Exception as e:
        row = failed_row(name, images, e)
    finally:
        free_memory()
    bar.write(f"{name:>14} {images:>4} images: " + (f"{row['img_per_s']:.3f} img/s" if row["status"] == "ok"
                                                     else f"{row['status']} ({row['reason']})"))
    bar.update(1)
    return row


def _fast_path_report(pipe, what) -> dict:
    """``fast_path.<what>(pipe)``, or {} for an installed diffusers without the fast path (the peer)."""
    try:
        from diffusers.flash.fastpath import engine as fast_path
    except ImportError:
        return {}
    return getattr(fast_path, what)(pipe)


def warmup_parts(pipe: Any) -> dict[str, float]:
    return _fast_path_report(pipe, "warmup_seconds")


def compile_helper(pipe: Any) -> dict[str, Any]:
    return _fast_path_report(pipe, "helper_results")


def failed_row(name: str, images: int | None, e: BaseException) -> dict[str, Any]:
    """oom, refused (the backend cannot serve one of the model's calls) or error (printed in full)."""
    status = "oom" if is_oom(e) else "refused" if _refusal(e) else "error"
    if status == "error":
        traceback.print_exception(e, file=sys.stderr)
    text = str(e).strip().splitlines()
    return dict(backend=name, images=images, status=status, reason=f"{type(e).__name__}: {text[0] if text else ''}")


def _refusal(e):
    try:
        return isinstance(e, dispatcher().AttentionBackendError)
    except (BenchError, AttributeError):
        return False


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole benchmark; with --json the report is rewritten after every row (complete: false until
    the end), so a run cut short by a time limit still leaves its rows."""
    verdicts = backend_verdicts(args.backends)
    pipe, built = build(args)
    # pixels per latent as the pipeline counts them: 8 up to 0.9, from 0.10 the VAE's own (the tiny one's 2);
    # --tiny's default size keeps the same 16x16 latents
    factor = getattr(pipe, "vae_scale_factor", 8)
    if args.tiny and getattr(args, "default_size", False) and factor != 8:
        args.height = args.width = args.height // 8 * factor
    config = {k: v for k, v in vars(args).items() if k not in ("json", "charts", "no_progress", "compile_times")}
    if not args.external_diffusers:  # the inductor options the fast path's compiles ran with
        from diffusers.flash.fastpath import engine as fast_path

        config["inductor_options"] = dict(fast_path.INDUCTOR_OPTIONS)
    report = dict(kind="pipeline", schema=1, complete=False, machine=machine(args.device), config={**config, **built},
                  backend_status=backend_status_list(), matmul_peak=matmul_peak(args.device, DTYPES[args.dtype]),
                  work=None, max_batch={}, rows=[])
    if not args.no_flops:  # attention counted on "math" where the dispatcher has it: FlopCounterMode sees matmuls
        on_math = not args.external_diffusers and backend_verdicts(["math"])["math"] is None
        work = count_work(pipe, args.steps, args.height, args.width, args.guidance_scale, args.device,
                          "math" if on_math else "installed")
        work["floor_ms_per_image"] = work["tflop_per_image"] / report["matmul_peak"]["tflops"] * 1e3
        report["work"] = work

    def add(row):
        if row["status"] == "ok" and report["work"]:
            row["floor_share"] = row["img_per_s"] * report["work"]["tflop_per_image"] / report["matmul_peak"]["tflops"]
        report["rows"].append(row)
        if args.json:
            write_json(args.json, report)

    live = [n for n in args.backends if verdicts[n] is None]
    bar = progress(len(live) * len(args.batch_sizes or [None] * 8), args.no_progress, "benchmark")
    try:
        for name in args.backends:
            if verdicts[name] is not None:
                add(dict(backend=name, images=None, status="skipped", reason=verdicts[name]))
            else:
                report["max_batch"][name] = measure_backend(pipe, name, args, bar, add)
    finally:
        bar.close()
    report["complete"] = True
    return report


# ---------------------------------------------------------------------------------------------- reports
COLUMNS = [
    ("backend", "backend", None), ("imgs", "images", None), ("img/s", "img_per_s", "{:.3f}"),
    ("s/img", "s_per_img", "{:.3f}"), ("UNet step ms", "unet_step_ms", "{:.1f}"),
    ("VAE decode ms", "vae_decode_ms", "{:.1f}"), ("text ms", "text_encode_ms", "{:.1f}"),
    ("peak GiB", "peak_mem_gib", "{:.2f}"), ("warm-up s", "warmup_s", "{:.1f}"),
    ("% of floor", lambda r: r.get("floor_share") and 100 * r["floor_share"], "{:.1f}"),
    ("non-finite %", lambda r: None if r.get("nonfinite_share") is None else 100 * r["nonfinite_share"], "{:.1f}"),
    ("status", lambda r: r["status"] + (f": {r['reason']}" if r.get("reason") else ""), None),
]


def render(report: dict[str, Any]) -> str:
    c, peak, work = report["config"], report["matmul_peak"], report["work"]
    scope = (f"backends forced on the {c['scope']}" if c["backends"] != ["installed"]
             else "attention as the installed diffusers has it")
    lines = [header(report["machine"]),
             f"# pipeline: {c['pipeline']} ({c['model']}), {c['dtype']} on {c['device']}, {c['height']}x{c['width']}, "
             f"{c['steps']} steps ({c['scheduler']}), guidance {c['guidance_scale']}, median of {c['repeats']} "
             f"after a {c['warmup_steps']}-step warm-up; {scope}; safety checker "
             f"{c['safety_checker']}",
             f"# matmul peak: {_flop(peak['tflops'])}/s ({peak['dtype']} {peak['n']}^3)"]
    if work:
        lines.append(f"# work per image: {_flop(work['tflop_per_image'])} (UNet step {_flop(work['unet_step_tflop'])} "
                     f"x {work['unet_calls']} calls, VAE decode {_flop(work['vae_decode_tflop'])}, "
                     f"text {_flop(work['text_encode_tflop'])}; attention counted on {work['attention_counted_on']})"
                     f"; floor {work['floor_ms_per_image']:.1f} ms/image")
    lines += ["", table(COLUMNS, report["rows"])]
    probed = {k: v for k, v in report["max_batch"].items() if v is not None}
    if probed:
        lines += ["", f"largest batch that fits (images; probes of {c['probe_steps']} steps): "
                  + ", ".join(f"{k} {v}" for k, v in probed.items())]
    return "\n".join(lines)


def _flop(tflop):
    return f"{tflop:.3f} TFLOP" if tflop >= 0.1 else f"{tflop * 1e3:.3f} GFLOP"


def charts(report: dict[str, Any], directory: str | Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BenchError("--charts needs matplotlib, which is not installed (pip install matplotlib); "
                         "the table and the JSON were written") from None
    Path(directory).mkdir(parents=True, exist_ok=True)
    rows = [r for r in report["rows"] if r["status"] == "ok"]
    title = f"{report['machine']['card']}, {report['config']['height']}px, {report['config']['steps']} steps"
    written = []
    for key, ylabel, name in (("img_per_s", "images / s", "throughput.png"),
                              ("peak_mem_gib", "peak memory (GiB)", "memory.png")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for backend in dict.fromkeys(r["backend"] for r in rows):
            pts = [(r["images"], r[key]) for r in rows if r["backend"] == backend and r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=backend)
        ax.set_xscale("log", base=2)
        batches = sorted({r["images"] for r in rows})
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set(xlabel="images per batch", ylabel=ylabel, title=title)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(title="attention backend")
        else:
            ax.text(0.5, 0.5, "not measured (no CUDA)", ha="center", va="center", transform=ax.transAxes)
        fig.tight_layout()
        fig.savefig(Path(directory) / name, dpi=120)
        plt.close(fig)
        written.append(str(Path(directory) / name))
    return written


# ---------------------------------------------------------------------------------------------- CLI
def parse(argv: Sequence[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="folder or Hub repo id of real SD 1.x weights (default: random weights)")
    ap.add_argument("--save-model", metavar="DIR",
                    help="save the random-weight pipeline (this fork's, or the installed diffusers' with "
                         "--external-diffusers) to DIR and stop: give both sides --model DIR to time the same "
                         "weights, hence the same numbers")
    ap.add_argument("--external-diffusers", action="store_true",
                    help="build SD 1.x from the installed diffusers' own classes (e.g. newest upstream) and "
                         "leave its attention as it is (backend 'installed')")
    ap.add_argument("--tiny", action="store_true", help="tiny random model, fp32, CPU, 3 steps, 128px "
                                                        "(the default without CUDA)")
    ap.add_argument("--device", help="default: cuda when available (cpu with --tiny)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), help="default: fp16 on CUDA, fp32 on CPU")
    ap.add_argument("--height", type=int)
    ap.add_argument("--width", type=int)
    ap.add_argument("--steps", type=int, help="denoising steps (default 50; 3 with --tiny)")
    ap.add_argument("--guidance-scale", type=float, default=7.5, help="> 1: classifier-free guidance (UNet batch "
                                                                      "= 2 x images)")
    ap.add_argument("--batch-sizes", help="images per call, comma-separated (default 1,8,32; 1,2 with --tiny)")
    ap.add_argument("--find-max-batch", action="store_true",
                    help="probe the largest batch that fits per backend (doubling, then bisecting on OOM); "
                         "without --batch-sizes, time powers of two up to it and it")
    ap.add_argument("--max-batch-limit", type=int, default=1024, help="stop probing here (default 1024)")
    ap.add_argument("--probe-steps", type=int, default=2, help="steps per probe call (memory does not grow "
                                                               "with steps; default 2)")
    ap.add_argument("--backends", default="math,auto",
                    help=f"comma-separated, from: {', '.join(KNOWN_BACKENDS)} (default math,auto)")
    ap.add_argument("--scope", choices=("pipeline", "unet"), default="pipeline",
                    help="force the backend on every model (default) or on the UNet only (the VAE's head dim "
                         "512 is refused by flash kernels)")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per row; the median is reported")
    ap.add_argument("--warmup-steps", type=int, help="steps of the warm-up call (default 5; 1 with --tiny; 0: none)")
    ap.add_argument("--keep-safety-checker", action="store_true", help="time the safety checker too")
    ap.add_argument("--no-flops", action="store_true", help="skip the FLOP count (no '%% of floor' column)")
    ap.add_argument("--json", metavar="FILE", help="write the report as JSON")
    ap.add_argument("--charts", metavar="DIR", help="write throughput.png and memory.png (needs matplotlib)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--inductor", action="append", default=[], metavar="KEY=VALUE",
                    help="an inductor option for the fast path's compiles, over its own INDUCTOR_OPTIONS "
                         "(e.g. pattern_matcher=True); repeatable")
    ap.add_argument("--no-parallel-compile", dest="parallel_compile", action="store_false",
                    help="fast-path rows: compile the VAE decoder in this process after the UNet, not in a helper "
                         "process alongside it (enable_fast_path(parallel_compile=False))")
    ap.add_argument("--compile-times", metavar="FILE",
                    help="write torch.compile's own time breakdown (torch._dynamo.utils.compile_times) here")
    ap.add_argument("--best-mode", default="max-autotune",
                    help="torch.compile mode of the installed+best peer (upstream's recipe: max-autotune)")
    args = ap.parse_args(argv)
    try:
        return settle(args)
    except BenchError as e:
        ap.error(str(e))


def inductor_options(items: Sequence[str]) -> dict[str, Any]:
    """--inductor KEY=VALUE items as a dict; keys must be inductor config names, values Python literals
    (True, 2, "x") or bare words."""
    if not items:  # inductor's config is a heavy import: only where it is asked for
        return {}
    import ast

    import torch._inductor.config as inductor_config

    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not hasattr(inductor_config, key):
            raise BenchError(f"--inductor {item!r}: expected KEY=VALUE with KEY an inductor config option")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def settle(args: argparse.Namespace) -> argparse.Namespace:
    """Defaults that depend on the machine and --tiny; refusal of bad combinations."""
    args.inductor = inductor_options(args.inductor)
    if args.inductor and args.external_diffusers:
        raise BenchError("--inductor sets the fork's fast-path compiles; the peer (--external-diffusers) has none")
    if not args.tiny and not torch.cuda.is_available() and args.device is None and not (args.model or args.save_model):
        print("benchmark: no CUDA device: running the tiny configuration (--tiny)", file=sys.stderr)
        args.tiny = True
    if args.device is None:
        args.device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise BenchError(f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA device")
    cuda = torch.device(args.device).type == "cuda"
    args.dtype = args.dtype or ("fp16" if cuda else "fp32")
    if args.dtype != "fp32" and not cuda:
        raise BenchError(f"--dtype {args.dtype} on {args.device}: half precision needs CUDA (use fp32)")
    size = 128 if args.tiny else 512
    args.default_size = args.height is None and args.width is None
    args.height, args.width = args.height or size, args.width or size
    if args.height % 8 or args.width % 8 or min(args.height, args.width) < 8:
        raise BenchError(f"--height/--width must be positive multiples of 8, not {args.height}x{args.width}")
    args.steps = args.steps if args.steps is not None else (3 if args.tiny else 50)
    args.warmup_steps = args.warmup_steps if args.warmup_steps is not None else (1 if args.tiny else 5)
    for option in ("steps", "repeats", "probe_steps", "max_batch_limit"):
        if getattr(args, option) < 1:
            raise BenchError(f"--{option.replace('_', '-')} must be at least 1, not {getattr(args, option)}")
    if args.warmup_steps < 0:
        raise BenchError("--warmup-steps must be 0 or more")
    default_batches = None if args.find_max_batch else ("1,2" if args.tiny else "1,8,32")
    text = args.batch_sizes or default_batches
    args.batch_sizes = parse_ints(text, "--batch-sizes") if text else None
    args.backends = parse_backends(args.backends)
    if args.external_diffusers:
        if args.backends == ["math", "auto"]:  # the default
            args.backends = ["installed"]
        if not set(args.backends) <= {"installed", "installed+reduce-overhead", "installed+best"}:
            raise BenchError("--external-diffusers times the installed diffusers as it is: only --backends installed,"
                             " installed+reduce-overhead and installed+best")
    if args.model and args.tiny:
        raise BenchError("--model and --tiny exclude each other")
    if args.save_model:
        if args.model:
            raise BenchError("--save-model writes random weights; --model loads weights: give one of them")
        target = Path(args.save_model)
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise BenchError(f"--save-model {args.save_model}: exists and is not an empty folder (nothing written)")
    # "installed" first: the others set a backend on the models that would stay behind
    # and "installed+best" last: upstream's recipe fuses projections and changes memory layouts for good
    args.backends.sort(key=lambda n: (n == "installed+best", n != "installed"))
    return args


def save_model(args: argparse.Namespace) -> int:
    """Write the random-weight pipeline to ``--save-model`` through a temporary folder renamed at the end."""
    import shutil
    import tempfile

    target = Path(args.save_model).resolve()
    size = "tiny" if args.tiny else "sd1"
    pipe = external_pipeline(size) if args.external_diffusers else fork_pipeline(size)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        pipe.save_pretrained(str(tmp))
        if target.exists():
            target.rmdir()  # empty (checked by parse)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"saved the {size} pipeline with random weights (seed 0) to {target}; time it with --model {target}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["attention"]:
        from . import attention

        return attention.main(argv[1:])
    args = parse(argv)
    torch.set_grad_enabled(False)
    if args.save_model:
        return save_model(args)
    if args.inductor:
        from diffusers.flash.fastpath import engine as fast_path

        fast_path.INDUCTOR_OPTIONS.update(args.inductor)
    try:
        report = run(args)
        print(render(report))
        if args.json:
            write_json(args.json, report)
            print(f"\nJSON: {args.json}")
        if args.charts:
            print("charts: " + ", ".join(charts(report, args.charts)))
    except BenchError as e:
        print(f"benchmark: error: {e}", file=sys.stderr)
        return 2
    finally:
        if args.compile_times:
            from torch._dynamo.utils import compile_times

            Path(args.compile_times).write_text(compile_times(repr="str", aggregate=True))
    return 1 if any(r["status"] == "error" for r in report["rows"]) else 0

