# diffusers-flash: upstream's attention backend registry on 0.35-0.36 (patch 0004-attention-dispatch.patch's
# variants for those releases).
"""Upstream's ``_AttentionBackendRegistry`` before 0.37 has no ``set_active_backend``: its
``attention_backend()`` context sets ``_active_backend`` directly. :func:`track` gives the registry that
setter (doing what the context does) so that :func:`diffusers.flash.attention.upstream_dispatch.track`
serves these releases as it serves 0.37 and later."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..attention import upstream_dispatch


def track(context: Callable, registry: type) -> Callable:
    """:func:`upstream_dispatch.track` for a registry with or without ``set_active_backend``."""
    if "set_active_backend" not in registry.__dict__:
        def set_active_backend(cls: type, backend: Any) -> None:
            cls._active_backend = backend

        registry.set_active_backend = classmethod(set_active_backend)
    return upstream_dispatch.track(context, registry)
