# diffusers-flash: every use of torch's private API in diffusers.flash, in one place. Each function says
# what happens where a later torch moved what it uses.
"""torch's private API as diffusers-flash uses it, each call with its fallback."""
from __future__ import annotations

import io
import json
import types
from collections.abc import Callable
from typing import Any

import torch


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


def set_compiled_call(module: torch.nn.Module, wrap: Callable[[Callable], Any] | None) -> None:
    """A block's call replaced by ``wrap(its own call)`` as ``Module.compile()`` does it (nn.Module's
    ``_call_impl`` and ``_compiled_call_impl``; ``wrap=None`` undoes). Moved: raises, and regional compile is
    not applied (the reason is reported)."""
    if not hasattr(module, "_compiled_call_impl"):
        raise RuntimeError("this torch's nn.Module has no _compiled_call_impl")
    module._compiled_call_impl = None if wrap is None else wrap(module._call_impl)



def sdpa_would_pick(kernel: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> bool:
    """Whether PyTorch's own SDPA choice for this call is ``kernel`` (a name of ``SDPBackend``, e.g.
    "CUDNN_ATTENTION"), by torch._fused_sdp_choice. Moved: False, and the dispatcher forces the kernel."""
    try:
        from torch.nn.attention import SDPBackend

        choice = torch._fused_sdp_choice(q, k, v, None, 0.0, False, scale=scale)
        return int(choice) == int(getattr(SDPBackend, kernel).value)
    except Exception:
        return False


def aot_compile(func: Callable[..., Any], args: tuple, kwargs: dict, options: dict) -> Any:
    """``torch.compile(func, fullgraph=True, dynamic=False, options=options).aot_compile((args, kwargs))``:
    dynamo's trace and inductor's compile made now for these inputs, into a function torch can serialize
    (torch 2.11 on; ``torch._dynamo.config.enable_aot_compile``, off by default before 2.13, is switched on
    for the ``torch.compile`` call). Moved: raises, and the model compiles as usual."""
    patch = ({"enable_aot_compile": True} if hasattr(torch._dynamo.config, "enable_aot_compile") else {})
    with torch._dynamo.config.patch(**patch):
        held = closure_data(func)
        names = [name for i, name in enumerate(getattr(getattr(func, "__code__", None), "co_freevars", ()))
                 if f"closure {i}" in held]

        def keep(entries: Any) -> list[bool]:  # guard names: "forward_fn", "forward_fn.__defaults__", ...
            return [ok and not any(e.name == n or e.name.startswith((n + ".", n + "[")) for n in names)
                    for ok, e in zip(_serializable_guards(entries), entries)]

        compiled = torch.compile(func, fullgraph=True, dynamic=False, options=dict(options, guard_filter_fn=keep))
    if not hasattr(compiled, "aot_compile"):
        raise RuntimeError(f"torch {torch.__version__} cannot compile ahead of time (aot_compile, torch 2.11 on)")
    return compiled.aot_compile((tuple(args), dict(kwargs)))


def _serializable_guards(entries: Any) -> list[bool]:
    """The guards kept with a function compiled ahead: torch's default for it (no guard on a global), and no
    guard torch cannot serialize, whether by its type or by a type it derives from: upstream's Attention
    (0.15 on) reads ``inspect.signature(self.processor.__call__)``, which dynamo guards by the code object's
    identity (ID_MATCH), so without this no model of 0.42.1 could be saved. What those guards held is in
    precompile.key_for's key instead (the processors' classes), and a loaded function's first output is
    checked against the model's own. (``aot_compile`` also drops the guards on the compiled function's
    closure: ``closure_data``'s functions, which a loading process supplies from its own code.)"""
    from torch._dynamo.guards import CheckFunctionManager

    unsupported = set(CheckFunctionManager.UNSUPPORTED_SERIALIZATION_GUARD_TYPES)
    return [not (e.is_global or e.guard_type in unsupported or unsupported & set(e.derived_guard_types or ()))
            for e in entries]


def closure_data(func: Callable[..., Any]) -> dict[str, object]:
    """The functions in ``func``'s closure, by position: a decorated forward (upstream's ``apply_lora_scale``,
    0.3x on) holds the undecorated one there, which pickle cannot name. They are left out of the saved bytes
    and handed back from the loading process's own ``func`` (the same code)."""
    return {f"closure {i}": cell.cell_contents for i, cell in enumerate(getattr(func, "__closure__", None) or ())
            if callable(cell.cell_contents)}


def aot_serialize(compiled: Any, external: dict[str, object]) -> tuple[bytes, dict[str, str]]:
    """An ``aot_compile`` result as bytes (``external``: objects left out, see ``closure_data``), with the
    modules its code reaches through globals dynamo installed (``___module_<name>_<id>_c<n>``, which the bytes
    name but do not hold): {global name: module name}. Moved: raises, and nothing is kept for a new process."""
    data = type(compiled).serialize(compiled, external).serialized_data
    modules = {name: value.__name__ for name, value in compiled.fn.__globals__.items()
               if name.startswith("___module_") and isinstance(value, types.ModuleType)}
    return data, modules


def aot_load(data: bytes, f_globals: dict[str, Any], external: dict[str, object]) -> Callable[..., Any]:
    """``torch.compiler.load_compiled_function`` of ``aot_serialize``'s bytes, in the scope ``f_globals``
    (the compiled function's module's globals and the modules it names), ``external`` what was left out.
    Moved: raises, and the model compiles as usual."""
    return torch.compiler.load_compiled_function(io.BytesIO(data), f_globals=f_globals, external_data=external)
