"""The fork's eager pipelines launch the same kernels as upstream's own attention path.

A pipeline call of today's models (SDXL, SD3, Flux: upstream 0.19, 0.29 and 0.30 on; in CI's run at 0.42.1)
is counted op by op (every aten op that is not a view: on a GPU, one or more kernel launches each) twice in
one process: through our dispatcher, and with upstream's own attention named (``attention_backend("native")``,
0.35 and later), which runs each call as upstream does. On a GPU ``auto`` serves these calls with the same
``F.scaled_dot_product_attention`` call as ``sdpa`` (cuDNN chosen by torch itself, or forced by a switch,
not by a tensor op); on the CPU ``auto`` checks its inputs for inf and NaN first (``dispatch.auto_order``),
so the CPU stands in for the GPU with ``sdpa`` named. Equal counts: the fork adds host time per attention
call (the dispatcher's Python), and no work on the GPU.
"""
from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import diffusers
from diffusers.flash import local_sdxl_sd3_flux as local
from diffusers.flash.attention import dispatch

PIPELINES = {"sdxl": "StableDiffusionXLPipeline", "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}


class Kernels(TorchDispatchMode):
    """Counts the aten ops that are not views (a view launches nothing)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: Counter = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if not any(a.alias_info is not None and not a.alias_info.is_write for a in func._schema.returns):
            self.seen[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def _upstream_context() -> Any:
    try:
        from diffusers.models.attention_dispatch import attention_backend
    except ImportError:
        pytest.skip(f"diffusers {diffusers.__version__} has no attention dispatcher of its own (0.35 and later)")
    return attention_backend("native")


def _count(pipe: Any, model: str, context: Any) -> Counter:
    size = local.image_size(model)
    with context, Kernels() as k:
        pipe(prompt="a cat", num_inference_steps=2, height=size, width=size, output_type="np",
             generator=torch.Generator().manual_seed(0))
    return k.seen


@pytest.mark.parametrize("model", sorted(PIPELINES))
def test_pipeline_launches_the_same_kernels_as_upstream_attention(model):
    if not hasattr(diffusers, PIPELINES[model]):
        pytest.skip(f"diffusers {diffusers.__version__} has no {PIPELINES[model]}")
    upstream = _upstream_context()
    pipe = local.pipeline(model, "tiny")
    pipe.set_progress_bar_config(disable=True)
    ours = _count(pipe, model, dispatch.attention_backend("sdpa"))
    theirs = _count(pipe, model, upstream)
    assert ours["aten._scaled_dot_product_flash_attention_for_cpu"] > 0  # the calls went through attention
    assert ours == theirs, {op: (ours[op], theirs[op]) for op in set(ours) | set(theirs) if ours[op] != theirs[op]}


def test_kernel_count_sees_an_extra_copy():
    """The counter counts what the parity test must catch: a copy (``contiguous``) counts, a view does not."""
    x = torch.randn(4, 6)
    with Kernels() as k:
        x.t().unsqueeze(0)
    assert sum(k.seen.values()) == 0
    with Kernels() as k:
        x.t().contiguous()
    assert k.seen == Counter({"aten.clone": 1})
