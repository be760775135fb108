# diffusers-flash: Diffusers 0.4's Flax code needs jax.random.KeyArray, which jax removed in 0.4.24.
# With a newer jax installed, the Flax classes are unavailable and using one says why, while
# `import diffusers` works (patch 0007-flax-compat.patch).
from packaging import version

LAST_JAX_WITH_KEYARRAY = "0.4.23"
_reason = None


def usable(jax_version: str) -> bool:
    global _reason
    if version.parse(jax_version) > version.parse(LAST_JAX_WITH_KEYARRAY):
        _reason = (f"Diffusers 0.4's Flax code needs jax <= {LAST_JAX_WITH_KEYARRAY} (jax.random.KeyArray); "
                   f"jax {jax_version} is installed, so the Flax classes are unavailable")
        return False
    return True


def import_error(default: str) -> str:
    return default if _reason is None else "{0} cannot be used: " + _reason + "."
