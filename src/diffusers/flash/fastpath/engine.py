# diffusers-flash: pipe.enable_fast_path(), the one call that makes generation as fast as the card allows
# while keeping the images: enable() and disable(), and what they report.
"""The fast path for diffusion pipelines: the denoiser (a UNet, or the transformer of SD3, Flux and their
kin), the VAE decode and the text encoders (CLIP, T5) each captured as a CUDA graph per input shape and replayed.

At one image a UNet step on an H100 spends most of its time launching kernels from Python (eager
26 ms against 12-13 ms of GPU work): replaying a CUDA graph removes that. ``compile=True`` also runs the
denoiser and the VAE decoder through torch.compile (compiling.py: fusions, channels-last);
``compile="regional"`` compiles each repeated block on its own instead (an option for models whose whole
graph will not compile; its steps were 2% slower on an H100); ``compile_vae`` sets the VAE decoder's mode
apart (``False``: graphed only); ``parallel_compile`` (default on) has a helper process compile the VAE
decoder while this one compiles the UNet (compile_ahead.py), so a fresh warm-up is about the UNet's compile
alone. Before each capture the model runs once uncompiled, so the attention dispatcher has planned every
shape and torch.compile traces one graph without breaks. ``cache="file"`` keeps torch.compile's work in a
portable file (compile_cache.py: loading it runs code from it, so only a file this user wrote and signed,
or one they said to trust, is loaded). Whatever cannot apply (no CUDA, a model that is not on the GPU, a
compile or capture failure) is logged with the reason and that part runs as before. Graph capture and
replay live in graphs.py (the transformer denoisers' wrapper in denoiser.py), every private torch call in
diffusers/flash/torch_private.py.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import torch

from diffusers.flash.fastpath.compile_cache import CACHE_MAGIC, CompileCache, cache_status  # noqa: F401
from diffusers.flash.fastpath import precompile
from diffusers.flash.fastpath.compiling import (INDUCTOR_OPTIONS, REGIONS, AfterNewInputs,  # noqa: F401
                                                CompiledOrEager, RegionalCompile, _compile, _compile_regions,
                                                _torch_compile)
from diffusers.flash.fastpath.graphs import (GraphedCall, GraphedDecode, GraphedForward,  # noqa: F401
                                             GraphedTextForward, TEXT_ENCODERS, WeightCheck, join_extra,
                                             split_extra)
from diffusers.flash.fastpath.graphs import reason as _reason
from diffusers.flash.torch_private import (cache_counts, caches_on, inductor_config,  # noqa: F401
                                           set_inductor_config)
from diffusers.utils import logging

logger = logging.get_logger(__name__)


def _on_cuda(model: torch.nn.Module) -> bool:
    p = next(model.parameters(), None)
    return p is not None and p.device.type == "cuda"


# a pipeline's text encoders (SDXL has two, SD3 three) and their names in the report
TEXT_ENCODER_PARTS = (("text_encoder", "text encoder"), ("text_encoder_2", "text encoder 2"),
                      ("text_encoder_3", "text encoder 3"))
WRAPPERS = {"UNet": GraphedForward, "VAE decode": GraphedDecode} | {
    what: GraphedTextForward for _, what in TEXT_ENCODER_PARTS}


def _wrapper(what: str) -> type:
    if what == "transformer":  # imported here: denoiser.py imports this module
        from diffusers.flash.fastpath.denoiser import GraphedDenoiser

        return GraphedDenoiser
    return WRAPPERS[what]


def _report() -> dict:
    return {"cuda_graphs": [], "compile": [], "channels_last": [], "float32": [], "reasons": []}


def apply_to(model: torch.nn.Module, what: str, attr: str, mode: bool | str, report: dict,
             channels_last: bool | None = None, cuda_graphs: bool = True, pool: Any = None,
             hook: dict | None = None, options: dict | None = None, cache: CompileCache | None = None) -> Any:
    """The fast path for one model (``what``: a key of ``WRAPPERS``) in place of its method ``attr``:
    compiled as ``mode`` says (False, True or "regional") with inductor ``options`` (default
    INDUCTOR_OPTIONS), then graphed. ``hook`` (the helper-process compile's): ``hook["before"](prepare)``
    wraps the uncompiled run made before each capture, the optional ``hook["after"]`` runs once the
    capture's warm-up has compiled. ``cache``: updated after each compiled call of new input shapes.
    Returns the wrapper."""
    fn = own = getattr(model, attr)
    prepare = None  # the model uncompiled, run once before each capture (see GraphedCall)
    if mode:
        if channels_last or channels_last is None:  # default: channels-last where compiled
            model.to(memory_format=torch.channels_last)
            report["channels_last"].append(what)
        if mode == "regional":
            regions = _compile_regions(model, what, report, options)
            prepare = regions and regions.uncompiled(own)
        else:
            fn = _compile(fn, what, report, options)
            prepare = own if fn is not own else None
            if cache is not None and prepare is not None and what in DENOISERS:
                fn = _precompiled(model, own, what, options, cache, fn, report)
        if cache is not None and prepare is not None:
            fn = AfterNewInputs(fn, cache.update)
    after = None
    if prepare is not None and hook:
        prepare, after = hook["before"](prepare), hook.get("after")
    if cuda_graphs:
        wrapper = _wrapper(what)
        named = {"name": what} if wrapper is GraphedTextForward else {}
        fn = wrapper(fn, pool, prepare=prepare, after=after, weights=WeightCheck(model, what), **named)
        report["cuda_graphs"].append(what)
    if fn is not getattr(model, attr):
        setattr(model, attr, fn)
    return fn


DENOISERS = ("UNet", "transformer")  # compiled ahead of time into a cache file (precompile.py)


def _precompiled(model: torch.nn.Module, own: Any, what: str, options: dict | None, cache: CompileCache,
                 fallback: Any, report: dict) -> Any:
    """The denoiser's forward compiled ahead of time into ``cache`` (precompile.py), ``fallback`` where it
    cannot be (the reason reported)."""
    if not precompile.ENABLED:
        return fallback
    why = precompile.unavailable()
    if why is None and getattr(own, "__self__", None) is not model:
        why = f"its forward is wrapped ({type(own).__name__}), not the model's own method"
    if why:
        report["reasons"].append(f"the {what} is not compiled ahead of time into the cache file: {why}")
        return fallback
    return precompile.Precompiled(model, own.__func__, what, dict(INDUCTOR_OPTIONS if options is None else options),
                                  cache, fallback)


def enable(pipe: Any, cuda_graphs: bool = True, compile: bool | str = False, channels_last: bool | None = None,
           vae: bool = True, text_encoder: bool = True, compile_vae: bool | str | None = None,
           parallel_compile: bool = True, cache: str | os.PathLike | None = None,
           options: dict | None = None, trust_cache: bool | str = False) -> dict:
    """Apply the fast path to ``pipe``; returns what was applied and, for what was not, why.

    ``compile``: False, True (torch.compile of the UNet's forward and the VAE's decode: fastest), or
    ``"regional"`` (each repeated block compiled on its own: steps a little slower).
    ``channels_last`` (default: for each compiled model) stores the UNet's and VAE's weights channels-last, which
    only pays under torch.compile; ``vae``/``text_encoder``: also graph (and compile) those models;
    ``compile_vae`` (default: as ``compile``) sets the VAE decoder's apart, e.g. ``False``: graphed only;
    ``parallel_compile``: when both are compiled, a helper process compiles the VAE decoder while this one
    compiles the UNet (``compile_ahead``; not where ``cache`` was loaded); ``cache``: a file for
    ``CompileCache`` (loading it runs code from it: use only files you wrote or trust like code), which
    from torch 2.11 also holds the UNet or transformer compiled ahead of time (``precompile``: a process
    that loads it does not trace the model again);
    ``trust_cache``: ``CompileCache``'s ``trust``; ``options``: inductor options (default
    ``INDUCTOR_OPTIONS``)."""
    for name, value in (("compile", compile), ("compile_vae", compile_vae)):
        if value not in (False, True, "regional") and not (name == "compile_vae" and value is None):
            raise ValueError(f"{name} must be False, True or 'regional', not {value!r}")
    modes = {"UNet": compile, "transformer": compile, "VAE decode": compile if compile_vae is None else compile_vae,
             **{what: False for _, what in TEXT_ENCODER_PARTS}}
    if cache is not None and not (modes["UNet"] or modes["VAE decode"]):
        raise ValueError("cache= keeps torch.compile's work: it needs compile=True or 'regional'")
    if trust_cache is not False and cache is None:
        raise ValueError("trust_cache= names the cache file to trust: it needs cache=")
    options = dict(INDUCTOR_OPTIONS if options is None else options)
    report = _report()
    denoiser, name = _denoiser(pipe)
    if denoiser is None:
        report["reasons"].append("the pipeline has no UNet or transformer denoiser")
    elif not torch.cuda.is_available():
        report["reasons"].append("no CUDA device: the pipeline runs as before")
    elif is_enabled(pipe):
        report["reasons"].append("already enabled")
    elif not _on_cuda(denoiser):
        report["reasons"].append(f"the {name} is not on a CUDA device: call pipe.to('cuda') first")
    else:
        store = None
        if cache is not None and not hasattr(torch.compiler, "load_cache_artifacts"):
            report["reasons"].append(f"cache= not used: torch {torch.__version__} has no portable compile cache "
                                     f"(torch.compiler.save_cache_artifacts, torch 2.7 on)")
        elif cache is not None:
            store = pipe._fast_path_cache = CompileCache(cache, trust=trust_cache)
            store.load()
        pool = torch.cuda.graph_pool_handle() if cuda_graphs else None  # one memory pool for all the graphs
        parts = [(name, denoiser, "forward")]
        if vae and getattr(pipe, "vae", None) is not None and hasattr(pipe.vae, "decode"):
            if _vae_upcast(pipe) and _on_cuda(pipe.vae):
                _keep_vae_float32(pipe, report)
            parts.append(("VAE decode", pipe.vae, "decode"))
        for attr, what in TEXT_ENCODER_PARTS if text_encoder else ():
            model = getattr(pipe, attr, None)
            if model is None:
                continue
            if type(model).__name__ in TEXT_ENCODERS:
                parts.append((what, model, "forward"))
            else:
                report["reasons"].append(f"the {what} ({type(model).__name__}) runs as before: only the plain "
                                         f"calls of {', '.join(TEXT_ENCODERS)} are graphed")
        ahead = None
        if parallel_compile and cuda_graphs and name == "UNet" and not (store and store.loaded):
            ahead = _ahead(pipe, parts, modes, report, channels_last, options)
        for what, model, attr in parts:
            if not _on_cuda(model):
                report["reasons"].append(f"the {what} is not on a CUDA device: left as it is")
                continue
            apply_to(model, what, attr, modes[what], report, channels_last, cuda_graphs, pool,
                     ahead and ahead.get(what), options, store)
    for why in report["reasons"]:
        logger.warning(f"fast path: {why}")
    return report


def _vae_upcast(pipe: Any) -> bool:
    """Whether the pipeline casts its float16 VAE to float32 around each decode and back (SDXL's
    ``upcast_vae``, where the VAE's config has ``force_upcast``): a graph of the float16 VAE would then read
    weights that are no longer there."""
    vae = pipe.vae
    config = getattr(vae, "config", None)
    force = config.get("force_upcast", False) if isinstance(config, dict) else getattr(config, "force_upcast", False)
    return bool(hasattr(pipe, "upcast_vae") and force and getattr(vae, "dtype", None) == torch.float16)


def _keep_vae_float32(pipe: Any, report: dict) -> None:
    """Where the pipeline would cast its VAE to float32 for each decode (``_vae_upcast``), cast it once and
    keep it so (upstream's own advice in ``upcast_vae``'s deprecation), so that its decode can be graphed and
    compiled. The cast is the pipeline's own ``upcast_vae`` (0.19-0.39 leave a few layers in float16, and its
    deprecation notice is not the user's to see), and the decode takes the latents in the dtype the pipeline
    gives them for it (its first layer's): the same arithmetic as the pipeline's, for the VAE's weights in
    float32 once more on the GPU. ``disable`` casts it back."""
    vae = pipe.vae
    pipe._fast_path_vae_dtype = vae.dtype
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        pipe.upcast_vae()
    vae.decode = decode_as(vae.decode, _first_layer(vae))
    report["float32"].append("VAE")
    logger.info("fast path: the VAE is kept in float32 (force_upcast in its config: the pipeline would cast it "
                "to float32 around each decode), so that its decode is graphed")


def _first_layer(vae: torch.nn.Module) -> torch.nn.Module:
    """The layer a VAE's decode starts with: its ``post_quant_conv`` where it has one, else its decoder's first."""
    return getattr(vae, "post_quant_conv", None) or vae.decoder.conv_in


def decode_as(decode: Callable[..., Any], layer: torch.nn.Module) -> Callable[..., Any]:
    """``decode`` taking latents of any floating dtype, cast to the dtype of ``layer``'s weight (the layer the
    decode starts with) at each call: as the pipeline casts them, whatever it has done to the VAE since."""
    def decode_cast(z: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return decode(z.to(layer.weight.dtype), *args, **kwargs)

    decode_cast.layer = layer
    return decode_cast


def _ahead(pipe: Any, parts: list[tuple[str, Any, str]], modes: dict[str, bool | str], report: dict,
           channels_last: bool | None, options: dict | None) -> dict | None:
    """Hooks for the helper-process compile of the VAE decoder: started by the UNet's first capture of a
    shape, awaited by the decoder's own capture and checked once it has compiled. The decoder's shape is the
    UNet's latents with half its batch when that is even (classifier-free guidance, the pipelines' default,
    runs the UNet on the unconditional and the conditional half together); a wrong guess (no guidance) only
    means the decoder compiles here as without a helper. None where it cannot apply: both must be compiled,
    on CUDA, inductor's on-disk cache on, and the VAE must say its latent channels."""
    from diffusers.flash.fastpath import compile_ahead

    names = {what: model for what, model, _ in parts}
    if not (modes["UNet"] and modes["VAE decode"] and "VAE decode" in names
            and all(_on_cuda(names[w]) for w in ("UNet", "VAE decode"))):
        return None
    if not caches_on():
        logger.info("fast path: no helper process for the VAE decode's compile: inductor's on-disk cache is off")
        return None
    vae = names["VAE decode"]
    # the latents' dtype where the decode casts them (a VAE kept in float32), else the VAE's own
    latents_dtype = str(getattr(pipe, "_fast_path_vae_dtype", next(vae.parameters()).dtype)).replace("torch.", "")
    try:
        latent_channels = int(dict(vae.config)["latent_channels"])
    except Exception as e:  # e.g. a VAE without diffusers' config
        report["reasons"].append(f"no helper process for the VAE decode's compile: {_reason(e)}")
        return None

    def extra() -> dict:  # what compile_in_helper needs, as this process has it when a helper starts
        return {"mode": modes["VAE decode"], "options": options, "channels_last": channels_last is not False,
                "inductor_config": inductor_config(), "latents_dtype": latents_dtype}

    ahead = pipe._fast_path_ahead = compile_ahead.Ahead(vae, "decode", "VAE decode", f"{__name__}:compile_in_helper",
                                                        extra, cache_counts)

    def starting(prepare: Callable[..., Any]) -> Callable[..., Any]:
        def run(sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if sample.dim() == 4:
                n = sample.shape[0]
                ahead.start((n // 2 if n % 2 == 0 else n, latent_channels, sample.shape[2], sample.shape[3]))
            return prepare(sample, *args, **kwargs)
        return run

    def waiting(prepare: Callable[..., Any]) -> Callable[..., Any]:
        def run(z: torch.Tensor, *args: Any) -> Any:
            ahead.wait(z.shape)
            return prepare(z, *args)
        return run

    return {"UNet": {"before": starting}, "VAE decode": {"before": waiting, "after": lambda z: ahead.check(z.shape)}}


def compile_in_helper(model: torch.nn.Module, spec: dict) -> str | None:
    """compile_ahead's target, in the helper process: the fast path's compile of ``model.<attr>`` as
    ``spec`` describes it, run once on random inputs of its shape; None, or why it did not compile."""
    extra = spec["extra"]
    set_inductor_config(extra["inductor_config"])
    param = next(model.parameters())
    latents = getattr(torch, extra.get("latents_dtype") or spec["dtype"])
    if latents != param.dtype:  # as this process's decode of a VAE kept in float32: latents cast in the graph
        setattr(model, spec["attr"], decode_as(getattr(model, spec["attr"]), _first_layer(model)))
    report = _report()
    apply_to(model, spec["what"], spec["attr"], extra["mode"], report, channels_last=extra["channels_last"],
             cuda_graphs=param.device.type == "cuda", options=extra["options"])
    if spec["what"] not in report["compile"]:
        return f"not compiled: {report['reasons']}"
    with torch.no_grad():
        getattr(model, spec["attr"])(torch.randn(spec["shape"], device=param.device, dtype=latents))
    if param.device.type == "cuda":
        torch.cuda.synchronize(param.device)
    regions = model.__dict__.get("_fast_path_regions")
    if regions is not None:
        return regions.failed
    fn = model.__dict__.get(spec["attr"])
    inner = getattr(fn, "inner", fn)
    inner = getattr(inner, "fn", inner) if isinstance(inner, AfterNewInputs) else inner
    return inner.failed if isinstance(inner, CompiledOrEager) else None


# the pipeline's models the fast path wraps, and the method of each it takes the place of
WRAPPED = (("unet", "forward"), ("transformer", "forward"), ("vae", "decode")) + tuple(
    (attr, "forward") for attr, _ in TEXT_ENCODER_PARTS)


def warmup_seconds(pipe: Any) -> dict:
    """Seconds each graphed model has spent so far on capturing (its compiles included), by name."""
    out = {}
    for name, attr in WRAPPED:
        wrapper = getattr(getattr(pipe, name, None), "__dict__", {}).get(attr)
        graphed = getattr(wrapper, "graphed", None)
        if isinstance(graphed, GraphedCall):
            out[graphed.name] = getattr(wrapper, "capture_s", graphed.capture_s)
    return out


def helper_results(pipe: Any) -> dict:
    """What the helper-process compile did so far, per shape ("2x4x64x64"): "compiled", or why not."""
    ahead = getattr(pipe, "__dict__", {}).get("_fast_path_ahead")
    if ahead is None:
        return {}
    return {"x".join(map(str, shape)): why or "compiled" for shape, why in ahead.done.items()}


def _denoiser(pipe: Any) -> tuple[Any, str]:
    """The pipeline's denoiser and its name in the report: its UNet, else its transformer (SD3, Flux, ...)."""
    unet = getattr(pipe, "unet", None)
    if unet is not None:
        return unet, "UNet"
    transformer = getattr(pipe, "transformer", None)
    if isinstance(transformer, torch.nn.Module):
        return transformer, "transformer"
    return None, "denoiser"


def is_enabled(pipe: Any) -> bool:
    denoiser, _ = _denoiser(pipe)
    forward = getattr(denoiser, "__dict__", {}).get("forward")
    return forward is not None and type(forward).__name__ in ("GraphedForward", "GraphedDenoiser")


def disable(pipe: Any) -> None:
    """Undo ``enable``: the models' own forward/decode, weights back to the contiguous layout."""
    pipe.__dict__.pop("_fast_path_cache", None)
    ahead = pipe.__dict__.pop("_fast_path_ahead", None)
    if ahead is not None:
        ahead.stop()
    for name, attr in WRAPPED:
        model = getattr(pipe, name, None)
        if model is None:
            continue
        regions = model.__dict__.pop("_fast_path_regions", None)
        if regions is not None:
            regions.undo()
        if regions is not None or attr in model.__dict__:
            model.__dict__.pop(attr, None)  # back to the class's own method
            if not name.startswith("text_encoder"):
                model.to(memory_format=torch.contiguous_format)
    dtype = pipe.__dict__.pop("_fast_path_vae_dtype", None)
    if dtype is not None:  # the VAE kept in float32 for its graphs (its decode_as went above): back to its dtype
        pipe.vae.to(dtype)
