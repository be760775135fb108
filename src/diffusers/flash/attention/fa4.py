# diffusers-flash: FlashAttention-4 (the `flash-attn-4` package, CuTe-DSL) as an attention backend.
"""The ``flash-attn-4`` attention backend: FlashAttention-4 from the ``flash-attn-4`` package
(``flash_attn.cute.flash_attn_func``, kernels written in CuTe-DSL and compiled at run time).

Limits, as data below, are read from ``flash_attn/cute/interface.py`` of flash-attn-4 4.0.0b36
(``_validate_head_dims`` and ``_flash_attn_fwd``): fp16 and bf16 (its fp8 path is forward-only and
Blackwell-only, and not ours to use); Hopper (sm90) takes head dims 8..256 in multiples of 8 (16 bytes
of a 2-byte dtype), Blackwell (sm100/sm110) 8..128 in multiples of 8 or exactly 256. The package also
has sm80/sm120 paths, which we do not offer: they are untested here and flash-attn's own README names
Hopper and Blackwell. The VAE's head dim 512 is refused everywhere (FA4 takes 512 only as the
MLA-absorbed shape, where k is v).

CUDA graphs and torch.compile: under torch.compile the call goes through the custom op
``diffusers_flash::fa4_attention`` (:data:`OP`), whose fake implementation gives dynamo and inductor
the output's shape without tracing into CuTe-DSL's Python; a CUDA graph then records only the kernel
launch (FA4 launches on PyTorch's current stream, through tvm-ffi's environment stream). FA4 compiles a
kernel the first time it sees a new configuration (dtype, head dim, tile sizes), which must not happen
during capture: the fast path (``pipe.enable_fast_path``, :mod:`diffusers.flash.fastpath`) runs the model
eagerly on a side stream before capturing it, and so does ``torch.compile(mode="reduce-overhead")``
(cudagraph trees warm up before recording); anyone capturing by hand must make one eager call per shape first.
Eager calls skip the custom op (its dispatch costs microseconds that FA4's own wrapper, about 0.1 ms a
call, does not need) and call ``flash_attn_func`` directly, with its own backward; so do compiled calls
whose inputs need gradients (outside the graph: the custom op is forward-only).
"""
from __future__ import annotations

import functools
from types import ModuleType

import torch

from diffusers.flash.attention.base import HALF, Backend, Call, Runner, _compiling

NAME = "flash-attn-4"
OP = "diffusers_flash::fa4_attention"
MODULE = "flash_attn.cute"  # from PyPI's flash-attn-4 (pip install flash-attn-4)

# compute capability major -> (smallest head dim, largest, multiple of, also allowed): FA4 4.0.0b36's
# _validate_head_dims for q, k and v of one head dim (alignment = 16 bytes / 2-byte element = 8)
HEAD_DIMS: dict[int, tuple[int, int, int, tuple[int, ...]]] = {
    9: (8, 256, 8, ()),  # Hopper: H100, H200
    10: (8, 128, 8, (256,)),  # Blackwell: B200, GB200
    11: (8, 128, 8, (256,)),  # Blackwell (Thor)
}

# Where `auto` tries FA4 before cuDNN: (compute capability major, head dim, shortest query length,
# shortest key length, fewest batch x heads rows). Source: BENCHMARKS.md, "Attention kernels" (H200, fp16,
# `python -m bench attention --sd2`, benchmarks/h200-2026-11-30b/attention.json), ms per eager call, FA4 vs
# cuDNN SDPA: self 4096 d40 at 16 x 8 rows 1.004 vs 1.131; self 4096 d64 at 16 x 5 rows 0.653 vs 0.714; self
# 4096 d128 at 16 x 8 rows 1.584 vs 1.677. FA4 lost at one image (self 4096 d40, 2 x 8 rows: 0.223 vs 0.158),
# self 1024 d80 (0.204 vs 0.110), self 256 d160 (0.125 vs 0.037) and cross 4096 x 77 (0.158 vs 0.073, d40;
# 0.151 vs 0.048, d64): those keep cuDNN first. Between 16 and 80 rows nothing was measured: cuDNN stays first.
AUTO_FIRST: tuple[tuple[int, int, int, int, int], ...] = (
    (9, 40, 4096, 4096, 80),
    (9, 64, 4096, 4096, 80),
    (9, 128, 4096, 4096, 80),
)


def head_dims_text(rule: tuple[int, int, int, tuple[int, ...]]) -> str:
    lo, hi, step, extra = rule
    text = f"multiples of {step} from {lo} to {hi}"
    return text + "".join(f" or {d}" for d in extra)


def head_dim_reasons(head_dim: int, capability: tuple[int, int]) -> list[str]:
    """Why FA4 cannot take this head dim on a device of this compute capability (empty: it can)."""
    rule = HEAD_DIMS.get(capability[0])
    if rule is None:
        archs = ", ".join(f"{m}.x" for m in HEAD_DIMS)
        return [f"compute capability {capability[0]}.{capability[1]} not in {{{archs}}} (FlashAttention-4 serves "
                "Hopper and Blackwell)"]
    lo, hi, step, extra = rule
    if head_dim in extra or (lo <= head_dim <= hi and head_dim % step == 0):
        return []
    return [f"head dim {head_dim} not served on compute capability {capability[0]}.x ({head_dims_text(rule)})"]


def auto_first(c: Call) -> bool:
    """Whether ``auto`` should try FA4 before cuDNN for this call (see :data:`AUTO_FIRST`)."""
    if c.q.device.type != "cuda" or c.q.dtype not in HALF:
        return False
    b, h, sq, d = c.q.shape
    sk = c.k.shape[2]
    majors = {m for m, hd, mq, mk, rows in AUTO_FIRST if d == hd and sq >= mq and sk >= mk and b * h >= rows}
    return bool(majors) and torch.cuda.get_device_capability(c.q.device)[0] in majors  # the device asked last


@functools.lru_cache(maxsize=None)
def _load() -> tuple[ModuleType | None, str | None]:
    """(flash_attn.cute, None), or (None, why it cannot be imported); cached: a failed import is slow."""
    try:
        import importlib

        mod = importlib.import_module(MODULE)
        mod.flash_attn_func  # noqa: B018  (the entry point we call)
    except Exception as e:  # ImportError, or a build that does not match this torch / CUDA
        return None, f"flash-attn-4 not importable ({MODULE}: {type(e).__name__}: {e})"
    return mod, None


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """FA4 on (B, S, H, D) tensors; returns (B, Sq, H, D)."""
    mod, why = _load()
    if mod is None:
        raise RuntimeError(why)
    out = mod.flash_attn_func(q, k, v, softmax_scale=scale)
    return out[0] if isinstance(out, tuple) else out  # (out, lse) when asked for the log-sum-exp


# ---------------------------------------------------------------------------------------------- the custom op
@torch.library.custom_op(OP, mutates_args=())
def fa4_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) v by FlashAttention-4, for q (B, Sq, H, D), k and v (B, Sk, H, D):
    (B, Sq, H, D), contiguous. Opaque to dynamo; FA4 allocates the output, so it aliases no input.
    Forward only (no autograd formula): the backend sends calls that need gradients elsewhere."""
    return _forward(q, k, v, scale)


@fa4_attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    return q.new_empty((*q.shape[:-1], v.shape[-1]))  # FA4 allocates the output contiguous, as this is


@torch.compiler.disable
def _forward_with_grad(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """A compiled call whose inputs need gradients: FA4 with its own backward, outside the graph (a graph
    break). The custom op is forward-only: its implementation runs below autograd, where FA4's
    autograd.Function cannot record, and a backward op would need FA4's private ``_flash_attn_bwd``."""
    return _forward(q, k, v, scale)


# ---------------------------------------------------------------------------------------------- the backend
class FlashAttention4(Backend):
    """FlashAttention-4 (``flash_attn.cute``), limits in :data:`HEAD_DIMS`; see the module's docstring."""

    name = NAME
    devices = ("cuda",)
    dtypes = HALF
    max_head_dim = 256  # the largest of HEAD_DIMS: the per-architecture rule is in more_reasons
    min_capability = (9, 0)

    def unavailable(self) -> str | None:
        if not torch.cuda.is_available():
            return "no CUDA device"
        return _load()[1]

    def more_reasons(self, c: Call) -> list[str]:
        return head_dim_reasons(c.head_dim, torch.cuda.get_device_capability(c.q.device))

    def runner(self, c: Call) -> Runner:
        def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
            # FA4 takes (B, S, H, D): our (B, H, S, D) tensors are views of that layout (the modules'
            # projections), so these transposes are free; the output goes back as a view too
            args = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), float(scale))
            if not _compiling():
                out = _forward(*args)  # eager (CUDA graph capture too): no op dispatch in the way
            elif torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
                out = _forward_with_grad(*args)  # training under torch.compile
            else:
                out = fa4_attention(*args)  # inference under torch.compile: one opaque node
            return out.transpose(1, 2)

        return run
