# diffusers-flash: torch.compile for the fast path: the whole model, or each repeated block (regional),
# falling back to the uncompiled call with the reason where a compile fails.
"""torch.compile as the fast path applies it (engine.py)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from diffusers.flash.fastpath.graphs import reason
from diffusers.flash.torch_private import raise_recompile_limit, set_compiled_call
from diffusers.utils import logging

logger = logging.get_logger(__name__)

# torch.compile options for the UNet and the VAE decoder (inductor config, scoped to these compiles): 1x1
# convolutions as matmuls; no pattern-matcher passes (they searched the UNet's graph for 7-9 s of the
# warm-up, and without them one image was no slower on the H100; attention already reaches its kernel
# through the dispatcher); no launch-config tuning of the fused pointwise kernels (6 s of a fresh warm-up
# for kernels that take 5% of a step; one image no slower): docs/history/benchmarks-2026-11.md.
# Coordinate-descent tuning was measured too and left out: it took the UNet's compile past five minutes.
INDUCTOR_OPTIONS = {"conv_1x1_as_mm": True, "pattern_matcher": False, "triton.autotune_pointwise": False}


class CompiledOrEager:
    """``torch.compile(fn)``, which compiles at its first call: where compiling fails there (no triton, no C
    compiler, an unsupported op), the failure is logged with its reason and ``fn`` runs uncompiled from then
    on; an error of the call itself is raised again by the uncompiled run."""

    def __init__(self, fn: Callable[..., Any], compiled: Callable[..., Any], what: str) -> None:
        self.fn, self.compiled, self.what = fn, compiled, what
        self.failed = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.failed is None:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as e:
                self.failed = reason(e)
                logger.warning(f"fast path: torch.compile of the {self.what} failed, it runs uncompiled "
                               f"({self.failed})")
        return self.fn(*args, **kwargs)


# regional compilation: the blocks the models repeat, each compiled on its own so that blocks of the same
# shape share one compiled graph (on the H100 no shorter a warm-up than the whole model's compile, and steps
# 2% slower: docs/history/benchmarks-2026-11.md); SD3's and Flux's transformer blocks likewise
# (SpatialTransformer is 0.4-0.6's name of the UNet's attention block, Transformer2DModel 0.7's and later)
REGIONS = ("ResnetBlock2D", "SpatialTransformer", "Transformer2DModel", "AttentionBlock",
           "JointTransformerBlock", "FluxTransformerBlock", "FluxSingleTransformerBlock")  # SD3's, Flux's
# compiled graphs per block type (one per shape and batch): dynamo's default of 8 would leave the rest eager
RECOMPILE_LIMIT = 128


class RegionalCompile:
    """torch.compile of each block of ``model`` whose class is in ``REGIONS`` (nn.Module's own
    ``_compiled_call_impl`` hook, as ``Module.compile()`` sets it). A compile that fails in any block is
    logged once with its reason, and every block of the model runs uncompiled from then on."""

    def __init__(self, model: torch.nn.Module, what: str, options: dict | None = None) -> None:
        self.what, self.failed, self.blocks, self.bypass = what, None, [], False
        self.options = INDUCTOR_OPTIONS if options is None else options
        raise_recompile_limit(RECOMPILE_LIMIT)
        for m in model.modules():
            if type(m).__name__ in REGIONS:
                set_compiled_call(m, self._wrap)
                self.blocks.append(m)

    def _wrap(self, eager: Callable[..., Any]) -> Callable[..., Any]:
        compiled = _torch_compile(eager, self.options)

        def call(*args: Any, **kwargs: Any) -> Any:
            if self.failed is None and not self.bypass:
                try:
                    return compiled(*args, **kwargs)
                except Exception as e:
                    self.failed = reason(e)
                    logger.warning(f"fast path: torch.compile of the {self.what}'s blocks failed, they run "
                                   f"uncompiled ({self.failed})")
            return eager(*args, **kwargs)

        return call

    def uncompiled(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` run with every block uncompiled (the fast path's planning run before a capture)."""
        def run(*args: Any, **kwargs: Any) -> Any:
            self.bypass = True
            try:
                return fn(*args, **kwargs)
            finally:
                self.bypass = False

        return run

    def undo(self) -> None:
        for m in self.blocks:
            set_compiled_call(m, None)


def _compile_regions(model: torch.nn.Module, what: str, report: dict,
                     options: dict | None = None) -> RegionalCompile | None:
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


def _torch_compile(fn: Callable[..., Any], options: dict | None = None) -> Callable[..., Any]:
    """torch.compile as the fast path calls it: static shapes, ``options`` (default: INDUCTOR_OPTIONS)."""
    return torch.compile(fn, dynamic=False, options=dict(INDUCTOR_OPTIONS if options is None else options))


def _compile(fn: Callable[..., Any], what: str, report: dict, options: dict | None = None) -> Callable[..., Any]:
    try:
        compiled = _torch_compile(fn, options)
    except Exception as e:  # an old torch: say so and go on without
        report["reasons"].append(f"torch.compile not applied to the {what}: {type(e).__name__}: {e}")
        return fn
    report["compile"].append(what)
    return CompiledOrEager(fn, compiled, what)


class AfterNewInputs:
    """``fn``, with ``then()`` called after each call whose tensor inputs (shapes, dtypes, devices) are new:
    the calls where torch.compile compiles."""

    def __init__(self, fn: Callable, then: Callable[[], Any]) -> None:
        self.fn, self.then, self.seen = fn, then, set()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = self.fn(*args, **kwargs)
        key = tuple((k, tuple(v.shape), v.dtype, v.device) for k, v in list(enumerate(args)) + sorted(kwargs.items())
                    if isinstance(v, torch.Tensor))
        if key not in self.seen:
            self.seen.add(key)
            self.then()
        return out
