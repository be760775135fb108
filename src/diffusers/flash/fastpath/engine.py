# diffusers-flash: pipe.enable_fast_path(), the one call that makes generation as fast as the card allows
# while keeping the images: the UNet step, the VAE decode and the text encoder are each captured once as a
# CUDA graph per input shape and replayed, optionally after torch.compile.
"""The fast path for Stable Diffusion pipelines.

At one image a UNet step on an H100 spends most of its time launching kernels from Python (eager
26 ms against 12-13 ms of GPU work): replaying a CUDA graph removes that, for the UNet step, the VAE
decode and the text encoder alike. ``compile=True`` also runs the UNet and the VAE decoder through
torch.compile (fusions; channels-last; the warm-up is reported by the benchmark, per model);
``compile="regional"`` compiles each repeated block on its own instead (since the one-graph fix below it no
longer warms up faster on an H100, and its steps are 2% slower: an option for models whose whole graph
will not compile); ``compile_vae`` sets the VAE decoder's mode apart (``False``: graphed only, 14 ms more
per image); ``parallel_compile`` (default on) has a helper process compile the VAE
decoder while this one compiles the UNet (compile_ahead.py), so a fresh warm-up is about the UNet's compile
alone. Before each capture the model runs once uncompiled, so the attention
dispatcher has planned every shape and torch.compile traces one graph without breaks. cuDNN's benchmark
mode, fused QKV projections and inductor freezing were measured and left out (BENCHMARKS.md, third and
fourth rounds). ``cache="file"`` keeps torch.compile's work in a portable file (compile_cache.py: loading
it runs code from it, so only a file this user wrote and signed, or one they said to trust, is loaded).
Whatever cannot apply (no CUDA, a model that is not on the GPU, a compile or capture failure) is logged
with the reason and that part runs as before.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

import torch

from diffusers.flash.fastpath.compile_cache import CACHE_MAGIC, CompileCache, cache_status  # noqa: F401
from diffusers.utils import logging

logger = logging.get_logger(__name__)

# torch.compile options for the UNet and the VAE decoder (inductor config, scoped to these compiles): 1x1
# convolutions as matmuls; no pattern-matcher passes (they searched the UNet's graph for 7-9 s of the
# warm-up, and without them one image was no slower on the H100; attention already reaches its kernel
# through the dispatcher); no launch-config tuning of the fused pointwise kernels (6 s of a fresh warm-up
# for kernels that take 5% of a step; one image no slower). BENCHMARKS.md, fourth and fifth rounds.
# Coordinate-descent tuning was measured too and left out: it took the UNet's compile past five minutes.
INDUCTOR_OPTIONS = {"conv_1x1_as_mm": True, "pattern_matcher": False, "triton.autotune_pointwise": False}


# ------------------------------------------------------------------ private torch API: every use, here only
# (compile_ahead uses none). Each says what happens where a later torch moved it.
def cache_counts() -> tuple[int, int]:
    """inductor's compiled-graph cache hits and misses so far in this process (torch._dynamo.utils.counters).
    Moved: (0, 0), and a helper still compiling is stopped rather than awaited (this process compiles)."""
    try:
        from torch._dynamo.utils import counters

        return counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]
    except Exception:
        return 0, 0


def inductor_config() -> dict:
    """inductor's options as this process has them (torch._inductor.config.save_config_portable()), which
    its cache keys depend on. Moved: raises, and no helper is started (it could not match)."""
    import torch._inductor.config as config

    return config.save_config_portable()


def caches_on() -> bool:
    """Whether inductor keeps compiled graphs on disk (torch._inductor.config). Moved: False (no helper)."""
    try:
        import torch._inductor.config as config

        return bool(config.fx_graph_cache) and not config.force_disable_caches
    except Exception:
        return False


def set_inductor_config(wanted: dict) -> None:
    """In a helper: the options whose value differs from this process's own (compared as JSON holds them)."""
    import torch._inductor.config as config

    for key, value in wanted.items():
        if json.loads(json.dumps(getattr(config, key, None), default=str)) != value:
            setattr(config, key, value)


def raise_recompile_limit(limit: int) -> None:
    """torch._dynamo.config.recompile_limit (cache_size_limit before torch 2.7) to at least ``limit``.
    Moved: dynamo's default stays (blocks past it run uncompiled)."""
    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, max(getattr(torch._dynamo.config, knob), limit))
            return


def set_compiled_call(module: torch.nn.Module, wrap) -> None:
    """A block's call replaced by ``wrap(its own call)`` as ``Module.compile()`` does it (nn.Module's
    ``_call_impl`` and ``_compiled_call_impl``; ``wrap=None`` undoes). Moved: raises, and regional compile is
    not applied (the reason is reported)."""
    if not hasattr(module, "_compiled_call_impl"):
        raise RuntimeError("this torch's nn.Module has no _compiled_call_impl")
    module._compiled_call_impl = None if wrap is None else wrap(module._call_impl)


def _reason(e: Exception) -> str:
    """An exception as one line for the log: its type and the first line of its message."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


class _Captured:
    __slots__ = ("graph", "inputs", "out")


class GraphedCall:
    """``fn(*tensors)`` (returning a tensor or a tuple of tensors) captured as a CUDA graph once per input
    signature, with static input buffers; later calls copy their inputs in, replay, and get clones of the
    outputs (callers such as PNDM keep past outputs: the static buffers are never handed out). A capture
    that fails is logged once with its reason and ``fn`` runs eagerly from then on."""

    def __init__(self, fn, name: str, pool=None, warmup: int = 2, prepare=None, after=None):
        # prepare: called with the same inputs once before a capture's warm-up, its result unused; after:
        # called with them once the warm-up (where torch.compile compiles) is done, before the capture
        self.fn, self.name, self.pool, self.warmup, self.prepare = fn, name, pool, warmup, prepare
        self.after = after
        self.graphs = {}
        self.failed = None  # the reason capture was given up, if it was
        self.capture_s = 0.0  # seconds spent capturing, compiles included (the warm-up this model costs)

    def __call__(self, *tensors):
        if self.failed is not None:
            return self.fn(*tensors)
        key = tuple((t.shape, t.dtype, t.device) for t in tensors)
        cap = self.graphs.get(key)
        if cap is None:
            try:
                cap = self.graphs[key] = self._capture(tensors)
            except Exception as e:  # e.g. a model that syncs with the host inside its forward
                self.failed = _reason(e)
                logger.warning(f"fast path: the {self.name} is not captured as a CUDA graph and runs as before "
                               f"({self.failed})")
                torch.cuda.synchronize()
                return self.fn(*tensors)
        for buf, t in zip(cap.inputs, tensors):
            buf.copy_(t)
        cap.graph.replay()
        out = tuple(o.clone() for o in cap.out)
        return out if len(out) > 1 else out[0]

    def _capture(self, tensors):
        start = time.perf_counter()
        cap = _Captured()
        # contiguous static buffers whatever the caller's layout (copy_ converts): the compiled code then
        # sees one layout per shape (the helper process compiles for that one)
        cap.inputs = tuple(t.clone(memory_format=torch.contiguous_format) for t in tensors)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            if self.prepare is not None:  # an uncompiled run first: the attention dispatcher plans each shape
                self.prepare(*cap.inputs)  # eagerly, so torch.compile then traces no planning code (no graph breaks)
            for _ in range(self.warmup):  # compiles, kernels pick algorithms and attention plans are made here
                self.fn(*cap.inputs)
            if self.after is not None:
                self.after(*cap.inputs)
        torch.cuda.current_stream().wait_stream(side)
        cap.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(cap.graph, pool=self.pool):
            out = self.fn(*cap.inputs)
        cap.out = out if isinstance(out, tuple) else (out,)
        torch.cuda.synchronize()
        took = time.perf_counter() - start
        self.capture_s += took
        shapes = ", ".join(str(tuple(t.shape)) for t in tensors)
        logger.info(f"fast path: captured the {self.name} for {shapes} in {took:.1f} s")
        return cap


def split_extra(kwargs: dict, device: torch.device) -> tuple[tuple, tuple] | None:
    """The UNet call's keyword arguments beyond (sample, timestep, encoder_hidden_states) as (layout,
    tensors) for a graph: None values are left out, a tensor on ``device`` (the sample's) is an input, a dict
    of such tensors (SDXL's ``added_cond_kwargs``: ``text_embeds``, ``time_ids``) gives one input per entry;
    ``layout`` names them (hashable: one graph per layout and shapes). None where a value is anything else (e.g. LoRA's
    ``cross_attention_kwargs={"scale": 0.5}``, a tensor on another device): that call is not captured."""
    def here(value):
        return isinstance(value, torch.Tensor) and value.device == device

    layout, tensors = [], []
    for name in sorted(kwargs):
        value = kwargs[name]
        if value is None:
            continue
        if here(value):
            layout.append((name, None))
            tensors.append(value)
        elif isinstance(value, dict) and all(here(v) for v in value.values()):
            layout.append((name, tuple(sorted(value))))
            tensors.extend(value[k] for k in sorted(value))
        else:
            return None
    return tuple(layout), tuple(tensors)


def join_extra(layout: tuple, tensors: tuple) -> dict:
    """The keyword arguments ``split_extra`` took apart, rebuilt around ``tensors`` (the graph's buffers)."""
    out, at = {}, 0
    for name, keys in layout:
        if keys is None:
            out[name], at = tensors[at], at + 1
        else:
            out[name], at = dict(zip(keys, tensors[at:at + len(keys)])), at + len(keys)
    return out


class GraphedForward:
    """Takes the place of a UNet2DConditionModel's ``forward`` (the UNet object itself stays, so saving,
    ``.to()`` and its config work as before). Training (grad enabled) and CPU inputs take the plain
    forward. Tensor keyword arguments (SDXL's ``added_cond_kwargs``, ``timestep_cond``) are graph inputs:
    one graph per layout of them (``split_extra``) and per shapes."""

    def __init__(self, forward, pool=None, warmup: int = 2, prepare=None, after=None):
        self.inner = forward  # the UNet's own forward, or torch.compile of it
        self._args = (pool, warmup, prepare, after)
        self.calls: dict[tuple, GraphedCall] = {}
        self.graphed = self._call(())  # SD 1.x/2.x: (sample, timestep, encoder_hidden_states) alone
        self._timesteps = {}

    def _call(self, layout: tuple) -> GraphedCall:
        call = self.calls.get(layout)
        if call is None:
            pool, warmup, prepare, after = self._args

            def taking(fn):  # fn(sample, timestep, states, **kwargs) called with the kwargs as extra tensors
                if fn is None:
                    return None
                return lambda s, t, c, *x: fn(s, t, c, **join_extra(layout, x))

            forward = taking(self.inner)
            call = self.calls[layout] = GraphedCall(lambda *a: forward(*a).sample, "UNet step", pool, warmup,
                                                    taking(prepare), taking(after))
        return call

    @property
    def graphs(self):
        return {(layout, key): cap for layout, call in self.calls.items() for key, cap in call.graphs.items()}

    @property
    def capture_s(self) -> float:
        return sum(call.capture_s for call in self.calls.values())

    def __call__(self, sample, timestep, encoder_hidden_states, *args, return_dict: bool = True, **kwargs):
        UNet2DConditionOutput = _output_class("UNet2DConditionOutput", "unet_2d_condition", "unets.unet_2d_condition")

        # newer releases pass more (timestep_cond, cross_attention_kwargs, added_cond_kwargs, ...): tensors are
        # graph inputs; a call with anything else set is not the captured one and takes the UNet's own forward
        extra = None if args else split_extra(kwargs, sample.device)
        if torch.is_grad_enabled() or not sample.is_cuda or extra is None:
            return self.inner(sample, timestep, encoder_hidden_states, *args, return_dict=return_dict, **kwargs)
        layout, tensors = extra
        out = self._call(layout)(sample, self._timestep(timestep, sample.device), encoder_hidden_states, *tensors)
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)

    def _timestep(self, t, device):
        if isinstance(t, torch.Tensor) and t.device == device:
            return t.reshape(())
        # a Python number or a CPU tensor: copied to the GPU once per value (a copy per step would make the
        # host wait for the GPU at every step)
        t = torch.as_tensor(t)
        key = (t.item(), t.dtype)
        if key not in self._timesteps:
            self._timesteps[key] = t.reshape(()).to(device)
        return self._timesteps[key]


def _output_class(name: str, *modules: str) -> type:
    """Upstream's output dataclass ``name`` from the first of ``diffusers.models.<module>`` that has it (it
    moved between releases: unet_2d_condition -> unets.unet_2d_condition, vae -> autoencoders.vae)."""
    import importlib

    for mod in modules:
        try:
            return getattr(importlib.import_module(f"diffusers.models.{mod}"), name)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"no diffusers.models module of {', '.join(modules)} has {name}")


class GraphedDecode:
    """Takes the place of an AutoencoderKL's ``decode``."""

    def __init__(self, decode, pool=None, prepare=None, after=None):
        self.inner = decode
        self.graphed = GraphedCall(lambda z: decode(z).sample, "VAE decode", pool, warmup=1, prepare=prepare,
                                   after=after)

    def __call__(self, z, return_dict: bool = True, generator=None, **kwargs):
        DecoderOutput = _output_class("DecoderOutput", "vae", "autoencoders.vae")

        # newer pipelines pass generator= (AutoencoderKL.decode takes it and does not use it): the captured call
        # serves it; any other argument set takes the VAE's own decode
        if torch.is_grad_enabled() or not z.is_cuda or any(v is not None for v in kwargs.values()):
            if generator is not None:
                kwargs["generator"] = generator
            return self.inner(z, return_dict=return_dict, **kwargs)
        dec = self.graphed(z)
        return DecoderOutput(sample=dec) if return_dict else (dec,)


class GraphedTextForward:
    """Takes the place of a CLIPTextModel's ``forward`` for the pipelines' plain ``text_encoder(ids)`` call;
    any other call (masks, hidden states, grad) takes the model's own forward."""

    def __init__(self, forward, pool=None, prepare=None, after=None):
        self.inner = forward

        def run(ids):
            out = forward(ids)
            return out[0], out[1]

        self.graphed = GraphedCall(run, "text encoder", pool, warmup=1, prepare=prepare, after=after)

    def __call__(self, input_ids=None, *args, **kwargs):
        if (args or any(v is not None for v in kwargs.values()) or input_ids is None or not input_ids.is_cuda
                or torch.is_grad_enabled()):
            return self.inner(input_ids, *args, **kwargs)
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        hidden, pooled = self.graphed(input_ids)
        return BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=pooled)


def _on_cuda(model) -> bool:
    p = next(model.parameters(), None)
    return p is not None and p.device.type == "cuda"


class CompiledOrEager:
    """``torch.compile(fn)``, which compiles at its first call: where compiling fails there (no triton, no C
    compiler, an unsupported op), the failure is logged with its reason and ``fn`` runs uncompiled from then
    on; an error of the call itself is raised again by the uncompiled run."""

    def __init__(self, fn, compiled, what):
        self.fn, self.compiled, self.what = fn, compiled, what
        self.failed = None

    def __call__(self, *args, **kwargs):
        if self.failed is None:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as e:
                self.failed = _reason(e)
                logger.warning(f"fast path: torch.compile of the {self.what} failed, it runs uncompiled "
                               f"({self.failed})")
        return self.fn(*args, **kwargs)


# regional compilation: the blocks the models repeat, each compiled on its own so that blocks of the same
# shape share one compiled graph (since the one-graph fix no shorter a warm-up than the whole model on the
# H100: BENCHMARKS.md, fourth round)
# (SpatialTransformer is 0.4-0.6's name of the UNet's attention block, Transformer2DModel 0.7's and later)
REGIONS = ("ResnetBlock2D", "SpatialTransformer", "Transformer2DModel", "AttentionBlock",
           "JointTransformerBlock", "FluxTransformerBlock", "FluxSingleTransformerBlock")  # SD3's, Flux's
# compiled graphs per block type (one per shape and batch): dynamo's default of 8 would leave the rest eager
RECOMPILE_LIMIT = 128


class RegionalCompile:
    """torch.compile of each block of ``model`` whose class is in ``REGIONS`` (nn.Module's own
    ``_compiled_call_impl`` hook, as ``Module.compile()`` sets it). A compile that fails in any block is
    logged once with its reason, and every block of the model runs uncompiled from then on."""

    def __init__(self, model, what, options: dict | None = None):
        self.what, self.failed, self.blocks, self.bypass = what, None, [], False
        self.options = INDUCTOR_OPTIONS if options is None else options
        raise_recompile_limit(RECOMPILE_LIMIT)
        for m in model.modules():
            if type(m).__name__ in REGIONS:
                set_compiled_call(m, self._wrap)
                self.blocks.append(m)

    def _wrap(self, eager):
        compiled = _torch_compile(eager, self.options)

        def call(*args, **kwargs):
            if self.failed is None and not self.bypass:
                try:
                    return compiled(*args, **kwargs)
                except Exception as e:
                    self.failed = _reason(e)
                    logger.warning(f"fast path: torch.compile of the {self.what}'s blocks failed, they run "
                                   f"uncompiled ({self.failed})")
            return eager(*args, **kwargs)

        return call

    def uncompiled(self, fn):
        """``fn`` run with every block uncompiled (the fast path's planning run before a capture)."""
        def run(*args, **kwargs):
            self.bypass = True
            try:
                return fn(*args, **kwargs)
            finally:
                self.bypass = False

        return run

    def undo(self):
        for m in self.blocks:
            set_compiled_call(m, None)


def _compile_regions(model, what, report, options=None):
    try:
        regions = RegionalCompile(model, what, options)
    except Exception as e:  # an old torch: say so and go on without
        report["reasons"].append(f"torch.compile not applied to the {what}: {type(e).__name__}: {e}")
        return
    if regions.blocks:
        model._fast_path_regions = regions
        report["compile"].append(what)
        return regions
    report["reasons"].append(f"the {what} has no blocks to compile regionally ({', '.join(REGIONS)})")
    return None


def _torch_compile(fn, options=None):
    """torch.compile as the fast path calls it: static shapes, ``options`` (default: INDUCTOR_OPTIONS)."""
    return torch.compile(fn, dynamic=False, options=dict(INDUCTOR_OPTIONS if options is None else options))


def _compile(fn, what, report, options=None):
    try:
        compiled = _torch_compile(fn, options)
    except Exception as e:  # an old torch: say so and go on without
        report["reasons"].append(f"torch.compile not applied to the {what}: {type(e).__name__}: {e}")
        return fn
    report["compile"].append(what)
    return CompiledOrEager(fn, compiled, what)


WRAPPERS = {"UNet": GraphedForward, "VAE decode": GraphedDecode, "text encoder": GraphedTextForward}


def _wrapper(what: str):
    if what == "transformer":  # imported here: denoiser.py imports this module
        from diffusers.flash.fastpath.denoiser import GraphedDenoiser

        return GraphedDenoiser
    return WRAPPERS[what]


def _report() -> dict:
    return {"cuda_graphs": [], "compile": [], "channels_last": [], "reasons": []}


def apply_to(model, what, attr, mode, report, channels_last=None, cuda_graphs=True, pool=None, hook=None,
             options: dict | None = None, cache: CompileCache | None = None):
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
        if cache is not None and prepare is not None:
            fn = AfterNewInputs(fn, cache.update)
    after = None
    if prepare is not None and hook:
        prepare, after = hook["before"](prepare), hook.get("after")
    if cuda_graphs:
        fn = _wrapper(what)(fn, pool, prepare=prepare, after=after)
        report["cuda_graphs"].append(what)
    if fn is not getattr(model, attr):
        setattr(model, attr, fn)
    return fn


def enable(pipe, cuda_graphs: bool = True, compile: bool | str = False, channels_last: bool | None = None,
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
    ``CompileCache`` (loading it runs code from it: use only files you wrote or trust like code);
    ``trust_cache``: ``CompileCache``'s ``trust``; ``options``: inductor options (default
    ``INDUCTOR_OPTIONS``)."""
    for name, value in (("compile", compile), ("compile_vae", compile_vae)):
        if value not in (False, True, "regional") and not (name == "compile_vae" and value is None):
            raise ValueError(f"{name} must be False, True or 'regional', not {value!r}")
    modes = {"UNet": compile, "transformer": compile, "VAE decode": compile if compile_vae is None else compile_vae,
             "text encoder": False}
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
            why = _vae_upcast(pipe)
            if why:
                report["reasons"].append(why)
            else:
                parts.append(("VAE decode", pipe.vae, "decode"))
        if text_encoder and getattr(pipe, "text_encoder", None) is not None:
            if type(pipe.text_encoder).__name__ == "CLIPTextModel":
                parts.append(("text encoder", pipe.text_encoder, "forward"))
            else:
                report["reasons"].append(f"the text encoder ({type(pipe.text_encoder).__name__}) runs as before: "
                                         f"only a CLIPTextModel's plain call is graphed")
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


def _vae_upcast(pipe) -> str | None:
    """Why the VAE decode is not graphed, where the pipeline casts the VAE to float32 for each decode and back
    (SDXL's ``upcast_vae`` where the VAE's config has ``force_upcast``): a graph of the float16 VAE would
    read weights that are no longer there. None where it can be graphed."""
    vae = pipe.vae
    config = getattr(vae, "config", None)
    force = config.get("force_upcast", False) if isinstance(config, dict) else getattr(config, "force_upcast", False)
    if hasattr(pipe, "upcast_vae") and force and getattr(vae, "dtype", None) == torch.float16:
        return ("the VAE decode is left as it is: this pipeline casts the VAE to float32 around each decode "
                "(force_upcast in the VAE's config), which a graph of the float16 VAE cannot follow; a VAE "
                "with force_upcast=False (one that is exact in float16) is graphed")
    return None


def _ahead(pipe, parts, modes, report, channels_last, options):
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
    try:
        latent_channels = int(dict(vae.config)["latent_channels"])
    except Exception as e:  # e.g. a VAE without diffusers' config
        report["reasons"].append(f"no helper process for the VAE decode's compile: {_reason(e)}")
        return None

    def extra():  # what compile_in_helper needs, as this process has it when a helper starts
        return {"mode": modes["VAE decode"], "options": options, "channels_last": channels_last is not False,
                "inductor_config": inductor_config()}

    ahead = pipe._fast_path_ahead = compile_ahead.Ahead(vae, "decode", "VAE decode", f"{__name__}:compile_in_helper",
                                                        extra, cache_counts)

    def starting(prepare):
        def run(sample, *args, **kwargs):
            if sample.dim() == 4:
                n = sample.shape[0]
                ahead.start((n // 2 if n % 2 == 0 else n, latent_channels, sample.shape[2], sample.shape[3]))
            return prepare(sample, *args, **kwargs)
        return run

    def waiting(prepare):
        def run(z, *args):
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
    report = _report()
    apply_to(model, spec["what"], spec["attr"], extra["mode"], report, channels_last=extra["channels_last"],
             cuda_graphs=param.device.type == "cuda", options=extra["options"])
    if spec["what"] not in report["compile"]:
        return f"not compiled: {report['reasons']}"
    with torch.no_grad():
        getattr(model, spec["attr"])(torch.randn(spec["shape"], device=param.device, dtype=param.dtype))
    if param.device.type == "cuda":
        torch.cuda.synchronize(param.device)
    regions = model.__dict__.get("_fast_path_regions")
    if regions is not None:
        return regions.failed
    fn = model.__dict__.get(spec["attr"])
    inner = getattr(fn, "inner", fn)
    inner = getattr(inner, "fn", inner) if isinstance(inner, AfterNewInputs) else inner
    return inner.failed if isinstance(inner, CompiledOrEager) else None


# ------------------------------------------------------------------ the portable compile cache
class AfterNewInputs:
    """``fn``, with ``then()`` called after each call whose tensor inputs (shapes, dtypes, devices) are new:
    the calls where torch.compile compiles."""

    def __init__(self, fn: Callable, then: Callable[[], Any]):
        self.fn, self.then, self.seen = fn, then, set()

    def __call__(self, *args, **kwargs):
        out = self.fn(*args, **kwargs)
        key = tuple((k, tuple(v.shape), v.dtype, v.device) for k, v in list(enumerate(args)) + sorted(kwargs.items())
                    if isinstance(v, torch.Tensor))
        if key not in self.seen:
            self.seen.add(key)
            self.then()
        return out


# the pipeline's models the fast path wraps, and the method of each it takes the place of
WRAPPED = (("unet", "forward"), ("transformer", "forward"), ("vae", "decode"), ("text_encoder", "forward"))


def warmup_seconds(pipe) -> dict:
    """Seconds each graphed model has spent so far on capturing (its compiles included), by name."""
    out = {}
    for name, attr in WRAPPED:
        wrapper = getattr(getattr(pipe, name, None), "__dict__", {}).get(attr)
        graphed = getattr(wrapper, "graphed", None)
        if isinstance(graphed, GraphedCall):
            out[graphed.name] = getattr(wrapper, "capture_s", graphed.capture_s)
    return out


def helper_results(pipe) -> dict:
    """What the helper-process compile did so far, per shape ("2x4x64x64"): "compiled", or why not."""
    ahead = getattr(pipe, "__dict__", {}).get("_fast_path_ahead")
    if ahead is None:
        return {}
    return {"x".join(map(str, shape)): why or "compiled" for shape, why in ahead.done.items()}


def _denoiser(pipe) -> tuple[Any, str]:
    """The pipeline's denoiser and its name in the report: its UNet, else its transformer (SD3, Flux, ...)."""
    unet = getattr(pipe, "unet", None)
    if unet is not None:
        return unet, "UNet"
    transformer = getattr(pipe, "transformer", None)
    if isinstance(transformer, torch.nn.Module):
        return transformer, "transformer"
    return None, "denoiser"


def is_enabled(pipe) -> bool:
    denoiser, _ = _denoiser(pipe)
    forward = getattr(denoiser, "__dict__", {}).get("forward")
    return forward is not None and type(forward).__name__ in ("GraphedForward", "GraphedDenoiser")


def disable(pipe):
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
            if name != "text_encoder":
                model.to(memory_format=torch.contiguous_format)
