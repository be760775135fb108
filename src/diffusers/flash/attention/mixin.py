"""``diffusers.flash.attention.mixin``, the path patch 0004 imports: the same module object as
:mod:`diffusers.flash.attention.pinning`."""
import sys

from diffusers.flash.attention import pinning

sys.modules[__name__] = pinning
