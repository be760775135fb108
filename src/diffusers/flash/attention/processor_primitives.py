# diffusers-flash: what upstream's attention processors (0.12 and later) call instead of their attention
# primitive. Patch 0004 replaces one call in each processor with one of these (importing this module as
# diffusers.flash.attention.hooks); the rest of the processor (projections, norms, masks, residuals) stays
# upstream's.
"""Drop-ins for the attention primitives upstream's processors use, routed through our dispatcher.

From 0.12 upstream computes attention in processor classes (``cross_attention.py``, from 0.15
``attention_processor.py``). Each does its projections and reshapes, then calls one primitive:

- :func:`sdpa` for ``torch.nn.functional.scaled_dot_product_attention`` (``AttnProcessor2_0`` and
  its relatives, from 0.13), tensors (batch, heads, seq, head dim);
- :func:`bmm_attention` for ``attn.get_attention_scores`` followed by ``torch.bmm`` (the plain and
  sliced processors), tensors (batch x heads, seq, head dim);
- :func:`xformers_attention` for ``xformers.ops.memory_efficient_attention`` (the xformers
  processors), tensors (batch x heads, seq, head dim). Upstream's xformers switch asks for
  memory-efficient attention: it runs on our ``sdpa-efficient`` (PyTorch's memory-efficient kernel),
  unless a backend is named for the module; xformers itself is never called.

A call with nothing but q, k, v and a scale goes to :func:`dispatch.attention`, which picks the
kernel (``auto``) or runs the one named for the module, explaining every refusal. A call with an
attention mask, dropout, a causal mask or grouped query heads runs as upstream runs it (torch's SDPA,
or upstream's matmuls), under ``auto`` and ``math``; a module set to any other backend refuses it
with the reason rather than silently using another kernel.

Where the user has named a backend upstream's way (0.35 and later: upstream's ``attention_backend``
context, a model's upstream ``set_attention_backend``, ``$DIFFUSERS_ATTN_BACKEND``), that wins: the call
runs as upstream runs it (:mod:`upstream_choice`).
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from diffusers.flash.attention import dispatch, upstream_choice
from diffusers.flash.attention.dispatch import AUTO, AttentionBackendError
from diffusers.utils import logging

__all__ = ["bmm_attention", "note_processor", "routed", "sdpa", "sdpa_on", "xformers_attention"]

logger = logging.get_logger(__name__)

# where upstream's processor classes live: their primitive calls are the lines patch 0004 changes
UPSTREAM_PROCESSOR_MODULES = ("diffusers.models.cross_attention", "diffusers.models.attention_processor")
_noted: set = set()

_SERVES_EXTRAS = (AUTO, "math")  # backends that take a mask, dropout, causal or GQA call (upstream's own ops)


def _refuse_extras(name: str, what: str) -> None:
    if name not in _SERVES_EXTRAS:
        raise AttentionBackendError(
            f"attention backend {name!r} cannot serve this call: it has {what}, which only 'auto' and 'math' "
            "take here (as upstream computes it); name 'auto' or 'math' for this model")


def _extras(attn_mask: torch.Tensor | None, dropout_p: float, is_causal: bool, enable_gqa: bool) -> str:
    parts = []
    if attn_mask is not None:
        parts.append("an attention mask")
    if dropout_p:
        parts.append(f"dropout {dropout_p}")
    if is_causal:
        parts.append("a causal mask")
    if enable_gqa:
        parts.append("grouped query heads")
    return ", ".join(parts)


def sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
         dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False, *,
         module: torch.nn.Module | None = None, upcast: bool = False) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` through our dispatcher, for ``module``'s backend.

    ``module`` is the attention module the call is made for (its ``set_attention_backend`` choice
    applies); ``upcast`` asks the ``math`` backend for a float32 softmax (fused kernels always
    accumulate in float32). A backend named upstream's way runs the call through upstream's dispatcher."""
    if upstream_choice.upstream_backend() is not None:
        return upstream_choice.upstream_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    return sdpa_on(dispatch.backend_for(module), query, key, value, attn_mask, dropout_p, is_causal, scale,
                   enable_gqa, upcast)


_FUNCTIONAL: types.ModuleType | None = None


def functional(torch_functional: types.ModuleType = F) -> types.ModuleType:
    """``torch.nn.functional`` whose ``scaled_dot_product_attention`` is :func:`sdpa`, for a module of upstream
    that calls ``F.scaled_dot_product_attention`` in many places (0.39+'s attention_processor.py: SD3's
    JointAttnProcessor2_0 and 30-odd others): one line there (``F = functional(F)``) sends every such call
    through our dispatcher. A module object (every other name is torch's own function), made once, so that
    torch.compile reads it as it reads ``torch.nn.functional``."""
    global _FUNCTIONAL
    if _FUNCTIONAL is None:
        proxy = types.ModuleType("diffusers.flash.attention.functional",
                                 "torch.nn.functional, with scaled_dot_product_attention through our dispatcher")
        proxy.__dict__.update({k: v for k, v in vars(torch_functional).items() if not k.startswith("__")})
        proxy.scaled_dot_product_attention = sdpa
        _FUNCTIONAL = proxy
    return _FUNCTIONAL


def sdpa_on(name: str, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
            attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0, is_causal: bool = False,
            scale: float | None = None, enable_gqa: bool = False, upcast: bool = False) -> torch.Tensor:
    """``F.scaled_dot_product_attention``'s call on our backend ``name``: q, k, v and a scale go to
    :func:`dispatch.attention`; a call with extras (mask, dropout, causal, GQA, not 4-d) runs as torch runs
    it, under ``auto`` and ``math`` only (any other backend refuses it, naming what it has)."""
    extras = _extras(attn_mask, dropout_p, is_causal, enable_gqa)
    if extras or query.dim() != 4 or key.shape[:2] != query.shape[:2]:
        _refuse_extras(name, extras or f"{query.dim()}-d or head-broadcast tensors")
        kwargs = {"enable_gqa": True} if enable_gqa else {}
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal, scale=scale, **kwargs)
    return dispatch.attention(query, key, value, scale, name, None, upcast)


def _heads_view(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int) -> tuple:
    """(batch x heads, seq, d) -> (batch, heads, seq, d) as views; rows not a multiple of ``heads`` (a slice
    of upstream's sliced processor), or q and k that would not split alike, become (rows, 1, seq, d)."""
    n = query.shape[0]
    if heads and n % heads == 0 and key.shape[0] == n:
        return tuple(t.unflatten(0, (n // heads, heads)) for t in (query, key, value))
    return tuple(t.unsqueeze(1) for t in (query, key, value))


def bmm_attention(attn: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``torch.bmm(attn.get_attention_scores(query, key, attention_mask), value)`` through our dispatcher.

    Tensors are (batch x heads, seq, head dim) as upstream's ``head_to_batch_dim`` lays them out; the
    softmax is float32 where the module asks for it (``upcast_attention``/``upcast_softmax``), as
    upstream's. With a mask, or a backend named upstream's way, upstream's own computation runs (with a
    mask: ``auto``/``math`` only)."""
    if upstream_choice.upstream_backend() is not None:
        return torch.bmm(attn.get_attention_scores(query, key, attention_mask), value)
    name = dispatch.backend_for(attn)
    if attention_mask is not None:
        _refuse_extras(name, "an attention mask")
        probs = attn.get_attention_scores(query, key, attention_mask)
        return torch.bmm(probs, value)
    upcast = bool(getattr(attn, "upcast_attention", False) or getattr(attn, "upcast_softmax", False))
    heads = getattr(attn, "heads", 1)
    q, k, v = _heads_view(query, key, value, heads)
    out = dispatch.attention(q, k, v, getattr(attn, "scale", None), name, None, upcast)
    return out.flatten(0, 1)


def xformers_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attn_bias: torch.Tensor | None = None, op: object = None, scale: float | None = None, *,
                       module: torch.nn.Module | None = None) -> torch.Tensor:
    """``xformers.ops.memory_efficient_attention`` (tensors (batch x heads, seq, d)) through our dispatcher:
    our ``sdpa-efficient`` unless a backend is named for ``module`` (or by ``attention_backend``). ``op``
    (xformers' kernel choice) has no counterpart here and is ignored."""
    name = dispatch.backend_for(module, xformers=True)
    heads = getattr(module, "heads", 1)
    if attn_bias is not None:
        _refuse_extras(name, "an attention mask")
        scores = torch.baddbmm(attn_bias.to(query.dtype).expand(query.shape[0], query.shape[1], key.shape[1]),
                               query, key.transpose(-1, -2), alpha=scale or query.shape[-1] ** -0.5)
        return torch.bmm(scores.float().softmax(-1).to(value.dtype), value)
    q, k, v = _heads_view(query, key, value, heads)
    return dispatch.attention(q, k, v, scale, name).flatten(0, 1)


def routed(processor: object) -> bool:
    """Whether ``processor``'s attention reaches our dispatcher: its ``__call__`` is one of upstream's
    processors' (whose primitive call patch 0004 replaces with one of the drop-ins above)."""
    call = next((vars(c)["__call__"] for c in type(processor).__mro__ if "__call__" in vars(c)), None)
    return getattr(call, "__module__", None) in UPSTREAM_PROCESSOR_MODULES


def note_processor(processor: object) -> None:
    """``set_processor``'s hook (0.12+, one line in upstream's ``CrossAttention.set_processor``).

    Upstream's processor classes reach our dispatcher through the drop-ins; a processor of the user's own
    (or one of the few pipelines that define their own to record attention maps, 0.13+) computes attention
    itself, so this says so, once per class (a warning naming it), and it is used as given. A sliced
    processor's slice size must be a positive whole number: upstream's own check lets a negative one
    through (``8 % -8 == 0``), after which its loop computes nothing and returns zeros."""
    cls = type(processor)
    if routed(processor):
        dispatch.check_slice_size(getattr(processor, "slice_size", None))
        return
    if cls in _noted:
        return
    _noted.add(cls)
    whose = ("upstream's own, which computes attention itself (it keeps the attention probabilities)"
             if cls.__module__.startswith("diffusers.") else "not one of diffusers' own")
    logger.warning(f"attention processor {cls.__module__}.{cls.__qualname__} is {whose}: its attention does not "
                   "go through the diffusers-flash dispatcher, so set_attention_backend(), attention_backend() and "
                   "$DIFFUSERS_ATTENTION_BACKEND do not apply to it")
