# diffusers-flash: the lines `diffusers-cli env` adds (patch 0004): each attention backend, available or why not.
"""What ``diffusers-cli env`` reports of this fork: one line per attention backend."""
from __future__ import annotations

from diffusers.utils import is_torch_available


def attention_env_info() -> dict[str, str]:
    """``{"Attention backend <name>": "available" or "unavailable: <why>"}``, for every backend."""
    if not is_torch_available():
        return {"Attention backends": "none (torch is not installed)"}
    from diffusers.flash.attention.dispatch import backend_status

    return {f"Attention backend {n}": ("available" if ok else f"unavailable: {why}") for n, ok, why in backend_status()}
