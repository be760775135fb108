# diffusers-flash: what `diffusers-cli env` adds (patch 0004): each attention backend, available or why not.
from diffusers.utils import is_torch_available


def attention_env_info() -> dict:
    if not is_torch_available():
        return {"Attention backends": "none (torch is not installed)"}
    from diffusers.flash.attention.dispatch import env_info

    return env_info()
