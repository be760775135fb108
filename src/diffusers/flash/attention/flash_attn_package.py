# diffusers-flash: the flash-attn package (FlashAttention-2, and FlashAttention-3 on Hopper) as an attention
# backend of the dispatcher (dispatch.py).
"""The ``flash-attn`` attention backend: ``flash_attn.flash_attn_func`` (FlashAttention-2, flash-attn 2.x), or
``flash_attn_interface.flash_attn_func`` (FlashAttention-3) on sm90 for the head dims it serves. The
packages are looked for once per process."""
from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from diffusers.flash.attention.base import Backend, Call, Runner


@functools.lru_cache(maxsize=None)
def _flash_attn_2() -> tuple[Callable | None, str | None]:
    """(flash_attn.flash_attn_func, None), or (None, why not); cached: a failed import is slow."""
    try:
        import flash_attn
        from flash_attn import flash_attn_func
    except Exception as e:  # ImportError, or a build that does not match this torch
        return None, f"flash-attn not importable ({type(e).__name__}: {e})"
    major = int(str(getattr(flash_attn, "__version__", "0")).split(".")[0] or 0)
    if major < 2:
        return None, f"flash-attn {flash_attn.__version__} < 2.0"
    return flash_attn_func, None


@functools.lru_cache(maxsize=None)
def _flash_attn_3() -> Callable | None:
    """flash_attn_interface.flash_attn_func (FlashAttention-3), or None; cached."""
    try:
        from flash_attn_interface import flash_attn_func
    except Exception:
        return None
    return flash_attn_func


class FlashAttn(Backend):
    """The flash-attn package: FlashAttention-3 (``flash_attn_interface``) on sm90, else FlashAttention-2."""

    name = "flash-attn"
    max_head_dim = 256
    min_capability = (8, 0)
    FA3_HEAD_DIMS = (64, 96, 128, 256)

    def unavailable(self) -> str | None:
        if not torch.cuda.is_available():
            return "no CUDA device"
        return None if _flash_attn_3() or _flash_attn_2()[0] else _flash_attn_2()[1]

    def _impl(self, c: Call) -> Callable | None:
        fa3 = _flash_attn_3()
        if fa3 and c.head_dim in self.FA3_HEAD_DIMS and torch.cuda.get_device_capability(c.q.device)[0] == 9:
            return fa3
        return _flash_attn_2()[0]

    def more_reasons(self, c: Call) -> list[str]:
        if self._impl(c) is None:
            return [f"{_flash_attn_2()[1]}; FlashAttention-3 serves only head dims {self.FA3_HEAD_DIMS} on sm90"]
        if c.q.stride(-1) != 1 or c.k.stride(-1) != 1 or c.v.stride(-1) != 1:
            return ["last dimension not contiguous"]
        return []

    def runner(self, c: Call) -> Runner:
        fn = self._impl(c)

        def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
            # flash-attn takes (B, S, H, D): our (B, H, S, D) tensors are views of exactly that layout
            out = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale)
            out = out[0] if isinstance(out, tuple) else out  # FlashAttention-3 may also return the log-sum-exp
            return out.transpose(1, 2)

        return run
