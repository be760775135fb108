# diffusers-flash: the denoiser compiled ahead of time into the fast path's compile cache file
# (enable_fast_path(compile=True, cache=path)), so that a new machine with the file skips dynamo's trace of
# the model as well as inductor's compile.
"""The denoiser's compile kept whole in the cache file.

The cache file's artifacts (compile_cache.py) spare a new process inductor's compile, but not dynamo's trace
of the model's Python, which a process that compiles nothing still makes: most of the UNet's 11.9 s when a
new machine read the file (H100, SD 1.x, 2026-12-08). torch 2.11 and later compile ahead of time instead
(``torch.compile(...).aot_compile``): the trace, the compiled graph and its guards in bytes that a new
process loads without tracing. With ``cache=``, :class:`Precompiled` compiles the denoiser's forward so for
each new input signature (:func:`key_for`), keeps the bytes in the file, and where the file holds them for a
call, loads them instead of compiling. Checks:

- the key is a sha256 of what the compiled code depends on: torch's version, the model's class, config,
  weights' dtypes and layout, each input's shape, strides and dtype, inductor's options, the attention
  backends the dispatcher can use and is told to use, the attention processors' classes, and the backend
  flags; torch keeps its own guards with the function, less those it cannot save (torch_private's
  ``_serializable_guards``);
- before a loaded function serves, its output for the first call is compared with the model's own
  (uncompiled) output for the same inputs; one that differs is dropped with the reason logged;
- anything that fails (a torch without ahead-of-time compile, a model whose forward breaks the graph, bytes
  torch cannot load) is logged once and the model compiles as without this (``fallback``).

The bytes are unpickled when loaded: they come only from a cache file that passed compile_cache's checks
(this user's signature, or ``trust_cache``). The modules the compiled code names are taken from those this
process has imported; an entry naming another is not loaded.
"""
from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable
from typing import Any

import torch

from diffusers.flash.fastpath.graphs import reason
from diffusers.utils import logging

logger = logging.get_logger(__name__)

ENABLED = True  # False: the cache file holds torch's artifacts only (bench coldstart's artifacts-* rows compare)
HALF_TOLERANCE = 2e-2  # largest difference from the uncompiled output, relative to its largest magnitude: fp16/bf16
FLOAT_TOLERANCE = 1e-3  # the same in float32
CHANNELS_LAST = torch.channels_last
DAMAGED = "damaged: its header does not describe its contents"


def unavailable() -> str | None:
    """Why this torch cannot compile ahead of time (None: it can)."""
    if not hasattr(torch.compiler, "load_compiled_function"):
        return (f"torch {torch.__version__} cannot compile ahead of time (torch.compiler.load_compiled_function, "
                f"2.11 on)")
    return None


def _describe(value: Any) -> Any:
    """``value`` as JSON for the key: tensors by shape, strides, dtype and device; None where a value is
    neither a tensor nor plain data (such a call is not compiled ahead)."""
    if isinstance(value, torch.Tensor):
        return ["tensor", list(value.shape), list(value.stride()), str(value.dtype), value.device.type,
                value.requires_grad]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        items = [_describe(v) for v in value]
        return None if any(i is None and v is not None for i, v in zip(items, value)) else [type(value).__name__, items]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        items = {k: _describe(v) for k, v in value.items()}
        return None if any(items[k] is None and value[k] is not None for k in value) else ["dict", items]
    return None


def _layout(p: torch.Tensor) -> str:
    return "channels_last" if p.dim() == 4 and p.is_contiguous(memory_format=CHANNELS_LAST) and not \
        p.is_contiguous() else "contiguous" if p.is_contiguous() else "strided"


def _attention(model: torch.nn.Module) -> dict:
    """What the dispatcher compiles into the graph: the backends this process has, and those each attention
    module is told to use."""
    from diffusers.flash.attention import dispatch
    from diffusers.flash.attention.mixin import attention_classes

    device = next(model.parameters()).device
    return {
        "available": [name for name, ok, _ in dispatch.backend_status() if ok],
        "capability": list(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None,
        "modules": {name: dispatch.current(m) for name, m in model.named_modules()
                    if isinstance(m, attention_classes())},
        "processors": sorted({f"{type(p).__module__}:{type(p).__qualname__}" for p in
                              (getattr(m, "processor", None) for m in model.modules()) if p is not None}),
    }


def key_for(model: torch.nn.Module, func: Callable[..., Any], args: tuple, kwargs: dict,
            options: dict) -> str | None:
    """The sha256 naming ``func(model, *args, **kwargs)``'s compiled code (see the module's notes); None where
    an input cannot be described."""
    from diffusers.flash.fastpath.compile_ahead import backend_flags

    inputs = _describe([list(args), dict(kwargs)])
    if inputs is None:
        return None
    desc = {
        "torch": torch.__version__, "python": sys.version_info[:2],
        "function": f"{func.__module__}:{func.__qualname__}",
        "class": f"{type(model).__module__}:{type(model).__qualname__}",
        "config": dict(getattr(model, "config", {}) or {}),
        "weights": sorted({(str(p.dtype), p.device.type, _layout(p)) for p in model.parameters()}),
        "training": model.training, "inputs": inputs, "options": options,
        "attention": _attention(model),
        "flags": backend_flags(),
    }
    text = json.dumps(desc, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()


def _scope(func: Callable[..., Any], modules: dict[str, str]) -> dict[str, Any]:
    """The globals a loaded function runs in: its module's, and the modules dynamo named (imported already)."""
    scope = dict(vars(sys.modules[func.__module__]))
    for name, module in modules.items():
        if module not in sys.modules:
            raise ValueError(f"it names the module {module!r}, which this process has not imported")
        scope[name] = sys.modules[module]
    return scope


def _leaves(out: Any) -> list[torch.Tensor]:
    """The tensors of a model's output: a tensor, an output class (``to_tuple``), or tuples, lists and dicts."""
    if isinstance(out, torch.Tensor):
        return [out]
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    items = out.values() if isinstance(out, dict) else out if isinstance(out, (tuple, list)) else ()
    return [t for item in items for t in _leaves(item)]


class Differs(ValueError):
    """A loaded function's output is not the model's."""


def check_same(got: Any, want: Any) -> None:
    """Differs where ``got`` (a loaded function's output) is not ``want`` (the model's own) within
    compiled code's rounding."""
    a, b = _leaves(got), _leaves(want)
    if len(a) != len(b) or any(x.shape != y.shape or x.dtype != y.dtype for x, y in zip(a, b)):
        raise Differs("its output is not shaped as the model's")
    for x, y in zip(a, b):
        scale = y.detach().float().abs().max().item() if y.numel() else 0.0
        tol = (HALF_TOLERANCE if y.dtype in (torch.float16, torch.bfloat16) else FLOAT_TOLERANCE) * max(scale, 1.0)
        diff = (x.detach().float() - y.detach().float()).abs().max().item() if y.numel() else 0.0
        if not diff <= tol:
            raise Differs(f"its output differs from the model's by {diff:.3g} (at most {tol:.3g} expected)")


class Precompiled:
    """``func(model, ...)`` (the model's forward) compiled ahead of time per input signature, the bytes kept in
    ``store`` (a ``CompileCache``, which counts in ``ahead`` what was loaded, compiled, and why not); a call
    whose signature the store holds loads them instead of compiling.
    Where neither serves, ``fallback`` (the usual ``torch.compile``) runs the call."""

    def __init__(self, model: torch.nn.Module, func: Callable[..., Any], what: str, options: dict, store: Any,
                 fallback: Callable[..., Any]) -> None:
        self.model, self.func, self.what, self.options, self.store = model, func, what, dict(options), store
        self.fallback = fallback
        self.ready: dict[str, Callable[..., Any]] = {}  # per input signature: what serves it

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        signature = json.dumps(_describe([list(args), dict(kwargs)]), sort_keys=True, default=repr)
        fn = self.ready.get(signature)
        if fn is None:
            fn = self.ready[signature] = self._prepare(args, kwargs)
        return fn(*args, **kwargs)

    def _note(self, why: str) -> None:
        self.store.ahead["problems"].append(why)
        logger.warning(f"fast path: the {self.what} is compiled as usual, not ahead of time ({why})")

    def _prepare(self, args: tuple, kwargs: dict) -> Callable[..., Any]:
        key = key_for(self.model, self.func, args, kwargs, self.options)  # torch's support: checked by the engine
        if key is None:
            self._note("an input is neither a tensor nor plain data")
            return self.fallback
        entry = self.store.precompiled.get(key)
        if entry is not None:
            served = self._load(key, entry, args, kwargs)
            if served is not None:
                return served
        from diffusers.flash.torch_private import aot_compile, aot_serialize, closure_data

        try:
            compiled = aot_compile(self.func, (self.model, *args), kwargs, self.options)
        except Exception as e:  # a graph break, a torch that moved: compiled as usual
            self._note(reason(e))
            return self.fallback
        try:
            data, modules = aot_serialize(compiled, closure_data(self.func))
        except Exception as e:  # compiled, but not kept: it serves this process all the same
            self.store.ahead["problems"].append(reason(e))
            logger.warning(f"fast path: the {self.what} compiled ahead of time cannot be kept in {self.store.path} "
                           f"({reason(e)}): a new machine will compile it again")
            return self._bound(compiled)
        self.store.add_precompiled(key, data, modules)
        self.store.ahead["compiled"] += 1
        return self._bound(compiled)

    def _load(self, key: str, entry: dict, args: tuple, kwargs: dict) -> Callable[..., Any] | None:
        from diffusers.flash.torch_private import aot_load, closure_data

        try:
            loaded = aot_load(entry["data"], _scope(self.func, entry["modules"]), closure_data(self.func))
            check_same(loaded(self.model, *args, **kwargs), self.func(self.model, *args, **kwargs))
        except Exception as e:
            why = str(e) if isinstance(e, Differs) else reason(e)
            if "GuardManager check failed" in str(e):  # torch's guards kept with the function
                why = "its guards do not hold for this model: a value the key does not record differs"
            self.store.drop_precompiled(key)
            self.store.ahead["problems"].append(why)
            logger.warning(f"fast path: the precompiled {self.what} in {self.store.path} is not used ({why}); "
                           f"it is compiled here")
            return None
        self.store.ahead["loaded"] += 1
        logger.info(f"fast path: the {self.what} was loaded precompiled from {self.store.path} (no trace, no compile)")
        return self._bound(loaded)

    def _bound(self, compiled: Callable[..., Any]) -> Callable[..., Any]:
        model = self.model

        def run(*args: Any, **kwargs: Any) -> Any:
            return compiled(model, *args, **kwargs)

        return run


# ------------------------------------------------------------------ their place in the cache file
def split(header: dict, payload: bytes) -> tuple[bytes, dict[str, dict]]:
    """A verified payload as torch's artifacts and precompile.py's entries (after them, in the header's
    order); ValueError where the header does not describe the payload."""
    listed = header.get("precompiled", [])
    size = header.get("artifacts", len(payload))
    if not (isinstance(listed, list) and isinstance(size, int) and 0 <= size <= len(payload)):
        raise ValueError(DAMAGED)
    at, out = size, {}
    for entry in listed:
        entry = entry if isinstance(entry, dict) else {}
        n, key, modules = entry.get("size"), entry.get("key"), entry.get("modules")
        if not (isinstance(n, int) and 0 <= n <= len(payload) - at and isinstance(key, str)
                and isinstance(modules, dict)
                and all(isinstance(k, str) and isinstance(v, str) for k, v in modules.items())):
            raise ValueError(DAMAGED)
        out[key] = {"data": payload[at:at + n], "modules": modules}
        at += n
    if at != len(payload):
        raise ValueError(DAMAGED)
    return payload[:size], out


def join(artifacts: bytes, precompiled: dict[str, dict]) -> tuple[bytes, list[dict]]:
    """``split``'s inverse: the payload and the header's list of precompiled entries."""
    entries = [{"key": key, "size": len(e["data"]), "modules": e["modules"]} for key, e in precompiled.items()]
    return artifacts + b"".join(e["data"] for e in precompiled.values()), entries
