# diffusers-flash: the fast path for transformer denoisers (SD3, Flux, and the pipelines of their shape),
# which the pipelines call with keyword tensors only.
"""A transformer denoiser's step as a CUDA graph per input layout and shapes.

SD3's and Flux's pipelines call their denoiser as ``transformer(hidden_states=..., timestep=...,
encoder_hidden_states=..., pooled_projections=..., [guidance=..., txt_ids=..., img_ids=...],
joint_attention_kwargs=None, return_dict=False)``: every input is a tensor on the GPU (their schedulers
keep the timesteps on the device without a host wait), so the whole step can be replayed. Each tensor
argument is a graph input; ``None`` is left out; ``True``/``False`` and strings are part of the layout
(one graph each); any other value (a list of layers to skip, attention kwargs with a LoRA scale, ...)
means the call is not the captured one and takes the model's own forward.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from diffusers.flash.fastpath.graphs import GraphedCall

# values that may be part of a layout: a graph per value (anything else is not captured)
_STATIC = (bool, str)


def split_keywords(kwargs: dict[str, Any], device: torch.device) -> tuple[tuple, tuple] | None:
    """``kwargs`` as (layout, tensors): a tensor on ``device`` is an input, a dict of such tensors one input
    per entry, ``None`` is left out, a bool or str is part of the layout. None where a value is anything
    else (that call runs the model's own forward)."""
    def here(value: Any) -> bool:
        return isinstance(value, torch.Tensor) and value.device == device

    layout, tensors = [], []
    for name in sorted(kwargs):
        value = kwargs[name]
        if value is None:
            continue
        if here(value):
            layout.append((name, "tensor"))
            tensors.append(value)
        elif isinstance(value, dict) and value and all(here(v) for v in value.values()):
            layout.append((name, ("dict", tuple(sorted(value)))))
            tensors.extend(value[k] for k in sorted(value))
        elif isinstance(value, _STATIC):
            layout.append((name, ("static", value)))
        else:
            return None
    return tuple(layout), tuple(tensors)


def join_keywords(layout: tuple, tensors: tuple) -> dict[str, Any]:
    """The keyword arguments ``split_keywords`` took apart, rebuilt around ``tensors`` (the graph's buffers)."""
    out, at = {}, 0
    for name, kind in layout:
        if kind == "tensor":
            out[name], at = tensors[at], at + 1
        elif kind[0] == "dict":
            keys = kind[1]
            out[name], at = dict(zip(keys, tensors[at:at + len(keys)])), at + len(keys)
        else:
            out[name] = kind[1]
    return out


def _output_class() -> type:
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    return Transformer2DModelOutput


class GraphedDenoiser:
    """Takes the place of a transformer denoiser's ``forward`` (the model object stays: saving, ``.to()``
    and its config work as before). Training (grad enabled), CPU inputs and calls with values that cannot
    be graph inputs take the plain forward. One graph per layout of the keyword arguments and per shapes."""

    def __init__(self, forward: Callable, pool: Any = None, warmup: int = 2, prepare: Callable | None = None,
                 after: Callable | None = None) -> None:
        self.inner = forward  # the model's own forward, or torch.compile of it
        self._args = (pool, warmup, prepare, after)
        self.calls: dict[tuple, GraphedCall] = {}

    def _call(self, layout: tuple) -> GraphedCall:
        call = self.calls.get(layout)
        if call is None:
            pool, warmup, prepare, after = self._args

            def taking(fn: Callable | None) -> Callable | None:
                if fn is None:
                    return None
                return lambda *x: fn(**join_keywords(layout, x), return_dict=False)

            forward = taking(self.inner)
            call = self.calls[layout] = GraphedCall(lambda *x: forward(*x)[0], "transformer step", pool, warmup,
                                                    taking(prepare), taking(after))
        return call

    @property
    def graphs(self) -> dict:
        return {(layout, key): cap for layout, call in self.calls.items() for key, cap in call.graphs.items()}

    @property
    def capture_s(self) -> float:
        return sum(call.capture_s for call in self.calls.values())

    @property
    def graphed(self) -> GraphedCall | None:
        """The first layout's graphed call (what ``warmup_seconds`` looks for), None before the first call."""
        return next(iter(self.calls.values()), None)

    def __call__(self, *args: Any, return_dict: bool = True, **kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs.get("hidden_states")
        extra = None
        if len(args) <= 1 and isinstance(hidden, torch.Tensor) and hidden.is_cuda and not torch.is_grad_enabled():
            extra = split_keywords({"hidden_states": hidden, **kwargs} if args else kwargs, hidden.device)
        if extra is None:
            return self.inner(*args, return_dict=return_dict, **kwargs)
        layout, tensors = extra
        out = self._call(layout)(*tensors)
        return _output_class()(sample=out) if return_dict else (out,)
