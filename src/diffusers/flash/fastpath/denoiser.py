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

from diffusers.flash.fastpath.graphs import GraphedCall, GraphedCalls, WeightCheck, join_extra, split_extra

# values that may be part of a layout: a graph per value (anything else is not captured)
STATIC = (bool, str)


def _output_class() -> type:
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    return Transformer2DModelOutput


class GraphedDenoiser(GraphedCalls):
    """Takes the place of a transformer denoiser's ``forward`` (the model object stays: saving, ``.to()``
    and its config work as before). Training (grad enabled), CPU inputs and calls with values that cannot
    be graph inputs take the plain forward. One graph per layout of the keyword arguments and per shapes."""

    def __init__(self, forward: Callable, pool: Any = None, warmup: int = 2, prepare: Callable | None = None,
                 after: Callable | None = None, weights: WeightCheck | None = None) -> None:
        self.inner = forward  # the model's own forward, or torch.compile of it
        self._args = (pool, warmup, prepare, after)
        self.weights = weights
        self.calls: dict[tuple, GraphedCall] = {}

    def _call(self, layout: tuple) -> GraphedCall:
        call = self.calls.get(layout)
        if call is None:
            pool, warmup, prepare, after = self._args

            def taking(fn: Callable | None) -> Callable | None:
                if fn is None:
                    return None
                return lambda *x: fn(**join_extra(layout, x), return_dict=False)

            forward = taking(self.inner)
            call = self.calls[layout] = GraphedCall(lambda *x: forward(*x)[0], "transformer step", pool, warmup,
                                                    taking(prepare), taking(after), self.weights)
        return call

    @property
    def graphed(self) -> GraphedCall | None:
        """The first layout's graphed call (what ``warmup_seconds`` looks for), None before the first call."""
        return next(iter(self.calls.values()), None)

    def __call__(self, *args: Any, return_dict: bool = True, **kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs.get("hidden_states")
        extra = None
        if len(args) <= 1 and isinstance(hidden, torch.Tensor) and hidden.is_cuda and not torch.is_grad_enabled():
            extra = split_extra({"hidden_states": hidden, **kwargs} if args else kwargs, hidden.device, STATIC)
        if extra is None:
            return self.inner(*args, return_dict=return_dict, **kwargs)
        layout, tensors = extra
        out = self._call(layout)(*tensors)
        return _output_class()(sample=out) if return_dict else (out,)
