# diffusers-flash: the attention dispatcher. models/attention.py (patch 0004) sends every CrossAttention
# and AttentionBlock call here (cross_attention, attention_block); this module picks the kernel.
"""Attention backends and the dispatcher that picks one per call.

Each backend states its limits as data (devices, dtypes, largest head dim, smallest compute
capability, package) and turns them into plain sentences with :meth:`Backend.reasons`; PyTorch's own
per-kernel checks add theirs. ``auto`` walks a per-shape priority list (:func:`auto_order`, from the
measurements in BENCHMARKS.md) and takes the first backend with no reasons, logging once per shape
(debug level) what it chose and why faster ones were skipped. A backend chosen by name that cannot
serve a call raises :class:`AttentionBackendError` listing its reasons.

Choosing (:func:`backend_for`): ``DIFFUSERS_ATTENTION_BACKEND`` (process default) <
:func:`set_attention_backend` < ``model.set_attention_backend(name)`` / ``pipe.set_attention_backend(name)``
< ``with attention_backend(name):``.
"""
from __future__ import annotations

import contextlib
import math
import numbers
import os
import threading
import warnings
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from diffusers.flash.attention import fa4
from diffusers.flash.attention.flash_attn_package import FlashAttn
from diffusers.flash.attention.base import HALF, Backend, Call, Runner, _compiling  # noqa: F401  (re-exported)
from diffusers.utils import logging

logger = logging.get_logger(__name__)

ENV_VAR = "DIFFUSERS_ATTENTION_BACKEND"
AUTO = "auto"
MAX_BATCH_HEADS = 65535  # CUDA grid limit on the batch x heads axis of several kernels: larger calls go in chunks
MATH_SCORES_BUDGET = 2 << 30  # bytes of score matrices `auto` lets batched matmuls build (VAE, head dim 512)
CPU_FALLBACK_SCORES_BUDGET = 64 << 20  # bytes of scores and probabilities `auto`'s CPU fallback builds at once
# upstream's xformers switch (enable_xformers_memory_efficient_attention, 0.7 to 0.11) asks for memory-efficient
# attention: a module it switched on runs on this backend of ours (PyTorch's memory-efficient kernel, which is
# xformers' own), unless a backend is named for it; upstream's xformers call is never made
XFORMERS_BACKEND = "sdpa-efficient"


class AttentionBackendError(RuntimeError):
    """A named attention backend cannot serve a call, or the name is unknown."""


# ---------------------------------------------------------------------------------------------- backends
class Math(Backend):
    """Upstream 0.4.2's computation: scores = q k^T * scale, softmax, @ v (the reference)."""

    name = "math"
    devices = ("cpu", "cuda", "mps", "xpu")
    dtypes = None

    def run(self, c: Call) -> torch.Tensor:
        scores = torch.matmul(c.q, c.k.transpose(-1, -2)) * c.scale
        probs = scores.float().softmax(dim=-1).type(scores.dtype) if c.upcast else scores.softmax(dim=-1)
        return torch.matmul(probs, c.v)


class SDPA(Backend):
    """PyTorch's scaled_dot_product_attention; ``kernel`` forces one of its backends."""

    def __init__(self, name: str, kernel: str | None = None, check: str | None = None, dtypes: tuple = HALF,
                 max_head_dim: int | None = None) -> None:
        self.name, self.kernel, self.check = name, kernel, check
        self.devices = ("cuda",) if kernel else ("cpu", "cuda", "mps", "xpu")
        self.dtypes = dtypes if kernel else None
        self.max_head_dim = max_head_dim

    def unavailable(self) -> str | None:
        if self.kernel is None:
            return None
        if not torch.cuda.is_available():
            return "no CUDA device"
        if self.check is None or not hasattr(torch.backends.cuda, self.check):
            return f"torch {torch.__version__} has no {self.name} kernel"
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: F401  (torch 2.3+)
        except ImportError:
            return f"torch {torch.__version__} cannot force one SDPA kernel (torch.nn.attention: 2.3+)"
        return None

    def more_reasons(self, c: Call) -> list[str]:
        return _torch_says(getattr(torch.backends.cuda, self.check), c) if self.check else []

    def runner(self, c: Call) -> Runner:
        if self.kernel is None or _torch_would_pick(self.kernel, c):
            return _sdpa  # no forcing needed: PyTorch takes this kernel for this shape by itself
        return lambda q, k, v, scale: _forced_sdpa(self.kernel, q, k, v, scale)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


_SWITCHES = {  # SDPBackend name -> the torch.backends.cuda switch that enables it
    "FLASH_ATTENTION": "flash_sdp", "EFFICIENT_ATTENTION": "mem_efficient_sdp", "MATH": "math_sdp",
    "CUDNN_ATTENTION": "cudnn_sdp",
}


def _forced_sdpa(kernel: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """SDPA with one kernel forced. torch's sdpa_kernel() context costs tens of microseconds a call,
    a real share of a launch-bound UNet step, so eager calls flip torch's switches directly."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if _compiling():
        with sdpa_kernel(getattr(SDPBackend, kernel)):
            return _sdpa(q, k, v, scale)
    cuda = torch.backends.cuda
    saved = {name: getattr(cuda, name + "_enabled")() for name in _SWITCHES.values()}
    try:
        for backend, name in _SWITCHES.items():
            getattr(cuda, "enable_" + name)(backend == kernel)
        return _sdpa(q, k, v, scale)
    finally:
        for name, on in saved.items():
            getattr(cuda, "enable_" + name)(on)


def _torch_would_pick(kernel: str, c: Call) -> bool:
    """Whether PyTorch's own SDPA choice for this call is ``kernel`` (then it need not be forced)."""
    from diffusers.flash.torch_private import sdpa_would_pick

    return sdpa_would_pick(kernel, c.q, c.k, c.v, c.scale)


def _torch_says(check: Callable, c: Call) -> list[str]:
    """PyTorch's own verdict on a forced SDPA kernel, with the reasons it warns in debug mode."""
    params = torch.backends.cuda.SDPAParams
    try:
        p = params(c.q, c.k, c.v, None, 0.0, False, False)
    except TypeError:  # torch < 2.5: no enable_gqa
        p = params(c.q, c.k, c.v, None, 0.0, False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ok = check(p, True)
    if ok:
        return []
    said = [str(w.message).strip().splitlines()[0] for w in caught if str(w.message).strip()]
    return ["torch: " + s for s in said] or ["refused by torch's own check"]


BACKENDS = {b.name: b for b in (
    fa4.FlashAttention4(),
    FlashAttn(),
    SDPA("sdpa-cudnn", "CUDNN_ATTENTION", "can_use_cudnn_attention", max_head_dim=256),
    SDPA("sdpa-flash", "FLASH_ATTENTION", "can_use_flash_attention", max_head_dim=256),
    SDPA("sdpa-efficient", "EFFICIENT_ATTENTION", "can_use_efficient_attention", dtypes=HALF + (torch.float32,)),
    SDPA("sdpa"),
    Math(),
)}
NAMES = (AUTO,) + tuple(BACKENDS)


def auto_order(c: Call) -> list[str]:
    """Fastest first, per shape, from the measurements in BENCHMARKS.md ("Attention kernels"): cuDNN beats
    PyTorch's flash kernel on every Stable Diffusion shape there, FlashAttention-4 goes first only where
    :data:`fa4.AUTO_FIRST` says it measured faster, and the flash-attn package (not installed in that run)
    comes after cuDNN; for head dim > 256 (the VAE's 512) no flash kernel runs and batched matmuls beat the
    memory-efficient kernel, as long as the scores fit a budget. The order never depends on grad mode:
    gradient checkpointing re-runs forwards under no_grad, and must get the same kernel, hence the same numbers.

    Non-finite inputs: on the CPU, PyTorch's fused SDPA kernel returns finite numbers (a row of zeros, or
    a finite row in bfloat16) for some rows whose scores hold an infinity or a NaN, where ``math`` and a
    float64 reference give NaN. ``auto`` therefore checks a CPU call's inputs and scale (a host-side check,
    free there) and sends a call with any inf or NaN to ``math``, computed a slice of query rows at a time
    (:data:`CPU_FALLBACK_SCORES_BUDGET`) so that one inf in a long call costs no full score matrix. So on the
    CPU ``auto`` and ``math`` give NaN in the same places for every input holding inf or NaN (under
    torch.compile, CPU calls take ``math``, which compiles without a data-dependent branch).

    Finite inputs whose scores overflow: ``math`` is upstream's computation, scores in the input dtype, so in
    float16 a q.k beyond 65504 becomes inf and its row NaN; the fused kernels accumulate in float32 and give
    the float64 reference's finite answer. ``auto`` keeps the fused kernel there: it differs from ``math``
    exactly where ``math`` overflows. ``sdpa`` named explicitly is PyTorch's behaviour as it is. On CUDA no
    input check runs (it would make the host wait for the GPU at every call): the fused kernels' own
    handling of non-finite inputs holds."""
    if c.q.device.type != "cuda":
        return ["sdpa", "math"]  # on the CPU, `auto`'s sdpa goes to math where an input is not finite: _finite_or_math
    if c.q.dtype not in HALF:
        return ["sdpa-efficient", "sdpa", "math"]
    if c.head_dim <= 256:  # FlashAttention-4 first only where it was measured faster (fa4.AUTO_FIRST)
        first = ["flash-attn-4"] if fa4.auto_first(c) else []
        return first + ["sdpa-cudnn", "flash-attn", "sdpa-flash"] + ([] if first else ["flash-attn-4"]) + [
            "sdpa-efficient", "sdpa", "math"]
    b, h, sq, _ = c.q.shape
    scores = b * h * sq * c.k.shape[2] * (c.q.element_size() * 2 + (4 if c.upcast else 0))
    return ["math", "sdpa-efficient", "sdpa"] if scores <= MATH_SCORES_BUDGET else ["sdpa-efficient", "sdpa", "math"]


# ---------------------------------------------------------------------------------------------- choosing
_default = None
_local = threading.local()
_cache: dict = {}  # (backend name, call key) -> reasons; ("plan", ...) -> runner; ("logged", call key) -> True
CACHE_LIMIT = 4096  # entries; past it the oldest quarter is dropped (re-planned if seen again)


def _remember(key: tuple, value: object) -> object:
    """``value`` kept under ``key``; not from a call torch.compile is tracing: dynamo guards on the key's
    absence, and a write replayed by the compiled call would fail that guard at the next call, compiling the
    whole model again. A compiled call plans at trace time, once per compile."""
    if _compiling():
        return value
    if len(_cache) >= CACHE_LIMIT:
        for old in list(_cache)[: CACHE_LIMIT // 4]:  # list(dict) copies the keys in one step (threads)
            _cache.pop(old, None)
    _cache[key] = value
    return value


def check_name(name: str) -> str:
    """``name`` if it is ``auto`` or a backend's name, else :class:`AttentionBackendError` naming them all."""
    if name not in NAMES:
        raise AttentionBackendError(f"unknown attention backend {name!r}; choose one of: {', '.join(NAMES)}")
    return name


def set_attention_backend(name: str | None) -> None:
    """The process-wide default (None: back to ``$DIFFUSERS_ATTENTION_BACKEND`` or ``auto``)."""
    global _default
    _default = None if name is None else check_name(name)


@contextlib.contextmanager
def attention_backend(name: str) -> Iterator[None]:
    """Use ``name`` for every attention call inside the block (this thread), over any other setting."""
    stack = _local.__dict__.setdefault("stack", [])
    stack.append(check_name(name))
    try:
        yield
    finally:
        stack.pop()


def backend_for(module: object = None, *, pin: str | None = None, xformers: bool = False) -> str:
    """The backend name that serves a call for ``module`` now: the innermost ``with attention_backend()``
    block, else ``pin`` or the backend pinned on ``module`` (``set_attention_backend``), else
    :data:`XFORMERS_BACKEND` where upstream's xformers switch is on for ``module`` (or ``xformers``: the call
    comes from one of upstream's xformers processors), else :func:`set_attention_backend`'s, else
    ``$DIFFUSERS_ATTENTION_BACKEND``, else ``auto``."""
    stack = getattr(_local, "stack", None)
    if stack:
        return stack[-1]
    name = pin or getattr(module, "_attention_backend", None)
    if not name and (xformers or getattr(module, "_use_memory_efficient_attention_xformers", False)):
        name = XFORMERS_BACKEND
    name = name or _default
    if name:
        return name
    env = os.environ.get(ENV_VAR)
    if env:
        try:
            return check_name(env.strip())
        except AttentionBackendError as e:
            raise AttentionBackendError(f"${ENV_VAR}: {e}") from None
    return AUTO


current = backend_for  # the same function, under the name fastpath/compile_ahead.py calls


def named_setting() -> str | None:
    """Where this thread names a backend of ours other than ``auto``, apart from a module's pin: the innermost
    ``with attention_backend(...)``, else ``set_attention_backend(...)``, else ``$DIFFUSERS_ATTENTION_BACKEND``,
    as words; None where nothing is named (``auto``)."""
    stack = getattr(_local, "stack", None)
    env = os.environ.get(ENV_VAR, "").strip()
    if stack:
        name, where = stack[-1], f"with attention_backend({stack[-1]!r})"
    elif _default is not None:
        name, where = _default, f"set_attention_backend({_default!r})"
    else:
        name, where = env, f"${ENV_VAR}={env}"
    return where if name and name != AUTO else None


def _verdict(name: str, c: Call) -> list[str]:
    key = (name, c.key())
    hit = _cache.get(key)
    if hit is None:
        hit = _remember(key, BACKENDS[name].reasons(c))
    return hit


def choose(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str | None = None, upcast: bool = False,
           scale: float | None = None) -> str:
    """The backend that serves this call (by name), as the dispatcher would pick it."""
    c = Call(q, k, v, scale, upcast)
    name = backend or backend_for()
    if name != AUTO:
        why = _verdict(check_name(name), c)
        if why:
            raise AttentionBackendError(f"attention backend {name!r} cannot serve this call ({c.describe()}): "
                                        + "; ".join(why))
        return name
    skipped = []
    for cand in auto_order(c):
        why = _verdict(cand, c)
        if not why:
            logged = ("logged", c.key())
            if not _compiling() and logged not in _cache:  # a logger call would break torch.compile's graph
                _remember(logged, True)
                logger.debug(f"attention auto ({c.describe()}): {cand}"
                             + ("; skipped " + "; ".join(skipped) if skipped else ""))
            return cand
        skipped.append(f"{cand} ({', '.join(why)})")
    reasons = "\n  ".join(f"{n}: {', '.join(_verdict(n, c))}" for n in BACKENDS)
    raise AttentionBackendError(f"no attention backend can serve this call ({c.describe()}):\n  {reasons}")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
              backend: str | None = None, slice_size: int | None = None, upcast: bool = False) -> torch.Tensor:
    """softmax(q k^T * scale) v for q (B, H, Sq, D), k and v (B, H, Sk, D), on the chosen backend.

    ``slice_size`` (upstream's attention slicing) computes at most that many of the B x H rows at a time.
    The plan for a call (checks, backend, slicing) is made once per signature and cached."""
    name = backend or backend_for()
    key = ("plan", name, q.shape, k.shape, v.shape, q.stride(), k.stride(), v.stride(), q.dtype, q.device, upcast,
           slice_size)
    plan = _cache.get(key)
    if plan is None:
        plan = _remember(key, _plan(q, k, v, name, slice_size, upcast))
    return plan(q, k, v, default_scale(q.shape[-1]) if scale is None else scale)


def default_scale(head_dim: int) -> float:
    """1 / sqrt(head dim), upstream's softmax scale; 1.0 for head dim 0, whose output is empty at any scale."""
    return 1.0 / math.sqrt(head_dim) if head_dim else 1.0


def check_slice_size(size: object) -> None:
    """Refuse, in one line, a slice size that is not a positive whole number (None: no slicing)."""
    if size is not None and (isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1):
        raise ValueError(f"attention slice size must be a positive whole number or None, got {size!r} "
                         "(from set_attention_slice / enable_attention_slicing)")


def _plan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, name: str, slice_size: int | None,
          upcast: bool) -> Runner:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("attention expects 4-d (batch, heads, seq, head dim) tensors, "
                         f"got {q.dim()}, {k.dim()}, {v.dim()}")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"attention: incompatible shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    check_slice_size(slice_size)
    b, h = q.shape[:2]
    limit = slice_size if slice_size and slice_size < b * h else None
    if b * h > MAX_BATCH_HEADS:
        limit = min(limit or MAX_BATCH_HEADS, MAX_BATCH_HEADS)
    if limit is None:
        c = Call(q, k, v, default_scale(q.shape[-1]), upcast)
        chosen = choose(q, k, v, name, upcast, c.scale)
        runner = BACKENDS[chosen].runner(c)
        if name == AUTO and chosen == "sdpa" and q.device.type == "cpu":
            per_row = b * h * k.shape[2] * (q.element_size() * 2 + (4 if upcast else 0))  # scores, probabilities
            query_rows = max(1, CPU_FALLBACK_SCORES_BUDGET // max(1, per_row))
            return _finite_or_math(runner, BACKENDS["math"].runner(c), query_rows)
        return runner
    if limit % h == 0:  # whole batch entries per slice: views, no copies
        step = limit // h
        return lambda q, k, v, scale: torch.cat([attention(q[i:i + step], k[i:i + step], v[i:i + step], scale, name,
                                                           None, upcast) for i in range(0, b, step)])

    def rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """Rows of (batch x heads), as upstream slices."""
        flat = [t.reshape(b * h, 1, *t.shape[2:]) for t in (q, k, v)]
        out = torch.cat([attention(flat[0][i:i + limit], flat[1][i:i + limit], flat[2][i:i + limit], scale, name,
                                   None, upcast) for i in range(0, b * h, limit)])
        return out.reshape(b, h, *out.shape[2:])

    return rows


def _finite_or_math(fused: Runner, reference: Runner, rows: int) -> Runner:
    """``fused`` where every input and the scale are finite, else ``reference`` (``math``) on ``rows`` query
    rows at a time: see :func:`auto_order`."""

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        if _compiling() or not (math.isfinite(scale) and all(bool(torch.isfinite(t).all()) for t in (q, k, v))):
            if q.shape[2] <= rows:
                return reference(q, k, v, scale)
            return torch.cat([reference(q[:, :, i:i + rows], k, v, scale) for i in range(0, q.shape[2], rows)], 2)
        return fused(q, k, v, scale)

    return run


# ---------------------------------------------------------------------------------------------- the hooks
def multihead(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int,
              scale: float | None, slice_size: int | None = None, upcast: bool = False) -> torch.Tensor:
    """Attention over projections (B, S, heads x D) -> (B, Sq, heads x D), for ``module``'s backend."""
    q, k, v = (t.unflatten(-1, (heads, t.shape[-1] // heads)).transpose(1, 2) for t in (query, key, value))
    out = attention(q, k, v, scale, backend_for(module), slice_size, upcast)
    return out.transpose(1, 2).flatten(2)


def cross_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """CrossAttention (UNet, self and cross): softmax in the input dtype, as upstream; in float32 where the
    module asks for it (``upcast_attention``/``upcast_softmax``, from 0.10: SD 2.x's fp16 UNet).
    ``attention_mask`` (from 0.11: an additive mask of shape (B x heads, Sq or 1, Sk), as upstream builds it)
    is served by the math backend only; a module set to another backend refuses it with the reason."""
    upcast = bool(getattr(module, "upcast_attention", False) or getattr(module, "upcast_softmax", False))
    if attention_mask is not None:
        return _masked_attention(module, query, key, value, attention_mask, upcast)
    return multihead(module, query, key, value, module.heads, module.scale, module._slice_size, upcast=upcast)


def _masked_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      mask: torch.Tensor, upcast: bool) -> torch.Tensor:
    """Upstream 0.11's computation with its additive mask, (B x heads)-batched as upstream's ``_attention``."""
    name = backend_for(module)
    if name not in ("auto", "math"):
        raise AttentionBackendError(
            f"backend {name!r} cannot serve this call: it has an attention_mask (UnCLIP's text states, 0.11+), which "
            "only the 'math' backend takes here; set_attention_backend('math') or 'auto' for this model"
        )
    heads = module.heads
    b = query.shape[0]
    q, k, v = (t.unflatten(-1, (heads, t.shape[-1] // heads)).transpose(1, 2).flatten(0, 1)
               for t in (query, key, value))
    scores = torch.matmul(q, k.transpose(-1, -2)) * module.scale + mask
    probs = scores.float().softmax(dim=-1).to(v.dtype) if upcast else scores.softmax(dim=-1)
    out = torch.matmul(probs, v)
    return out.unflatten(0, (b, heads)).transpose(1, 2).flatten(2)


def attention_block(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                    value: torch.Tensor) -> torch.Tensor:
    """AttentionBlock (the VAE's): softmax in float32, as upstream."""
    return multihead(module, query, key, value, module.num_heads, 1.0 / math.sqrt(module.channels / module.num_heads),
                     upcast=True)


def backend_status() -> list[tuple[str, bool, str]]:
    """(name, available, reason) for each backend in this process, for ``diffusers-cli env``."""
    out = []
    for name, b in BACKENDS.items():
        why = b.unavailable()
        out.append((name, why is None, why or "available"))
    return out
