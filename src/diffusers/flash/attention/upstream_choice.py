# diffusers-flash: whether the user named an attention backend through upstream's own API (0.35 and later),
# which then wins over ours; read by the processors' drop-ins and by the adapter in upstream_dispatch.py.
"""A backend named upstream's way: whether there is one (:func:`upstream_backend`), and an SDPA call run by
upstream's ``dispatch_attention_fn`` on it (:func:`upstream_sdpa`).

From 0.35 upstream has its own attention backends, named by its ``attention_backend()`` context, by a
model's upstream ``set_attention_backend`` (both recorded here by :func:`upstream_dispatch.track`) or by
``$DIFFUSERS_ATTN_BACKEND``. Where one is named, it wins over ours. Where it wins only because of
``$DIFFUSERS_ATTN_BACKEND`` while ours names a backend too (``$DIFFUSERS_ATTENTION_BACKEND``,
``set_attention_backend`` or ``with attention_backend(...)``: :func:`dispatch.named_setting`), a warning
says so, once per pair of settings.
"""
from __future__ import annotations

import os
import sys
import threading

import torch

from diffusers.flash.attention import dispatch
from diffusers.flash.attention.base import _compiling
from diffusers.utils import logging

__all__ = ["UPSTREAM_ENV", "UPSTREAM_MODULE", "upstream_backend", "upstream_sdpa"]

logger = logging.get_logger(__name__)

UPSTREAM_MODULE = "diffusers.models.attention_dispatch"
UPSTREAM_ENV = "DIFFUSERS_ATTN_BACKEND"


class _Named(threading.local):
    explicit = False  # set_active_backend was called (upstream's set_attention_backend, or by hand)
    depth = 0  # inside upstream's attention_backend() context


named = _Named()
_warned: set = set()


def registry() -> type | None:
    """Upstream's ``_AttentionBackendRegistry`` (0.35 and later, once its module is imported), else None."""
    return getattr(sys.modules.get(UPSTREAM_MODULE), "_AttentionBackendRegistry", None)


def upstream_backend() -> str | None:
    """The upstream backend the user named (its ``attention_backend()`` context, a model's upstream
    ``set_attention_backend``, ``$DIFFUSERS_ATTN_BACKEND``), as upstream's registry holds it; None where
    none is named or the release has no upstream dispatcher (before 0.35)."""
    reg = registry()
    if reg is None:
        return None
    if named.depth or named.explicit:
        return reg._active_backend
    if os.environ.get(UPSTREAM_ENV):
        if not _compiling():  # a logger call would break torch.compile's graph
            _say_upstream_env_wins(reg._active_backend)
        return reg._active_backend
    return None


def _say_upstream_env_wins(theirs: object) -> None:
    """Warn, once per pair of settings, that ``$DIFFUSERS_ATTN_BACKEND`` overrides a backend named ours."""
    ours = dispatch.named_setting()
    if ours is None:
        return
    theirs = str(getattr(theirs, "value", theirs))
    key = (ours, os.environ.get(UPSTREAM_ENV), theirs)
    if key in _warned:
        return
    _warned.add(key)
    logger.warning(f"${UPSTREAM_ENV}={os.environ.get(UPSTREAM_ENV)} (upstream's attention backend setting) overrides "
                   f"{ours} (diffusers-flash's): attention runs on upstream's {theirs!r} backend; unset "
                   f"${UPSTREAM_ENV} to use diffusers-flash's")


def upstream_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None,
                  dropout_p: float, is_causal: bool, scale: float | None, enable_gqa: bool) -> torch.Tensor:
    """``F.scaled_dot_product_attention``'s call (tensors (batch, heads, seq, head dim)) run by upstream's
    ``dispatch_attention_fn`` with the backend named upstream's way (for the UNet's and VAE's processors)."""
    fn = sys.modules[UPSTREAM_MODULE].dispatch_attention_fn
    out = fn(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=attn_mask,
             dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    return out.transpose(1, 2)
