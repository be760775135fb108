"""``diffusers.flash.attention.hooks``, the path patch 0004 imports: the same module object as
:mod:`diffusers.flash.attention.processor_primitives`."""
import sys

from diffusers.flash.attention import processor_primitives

sys.modules[__name__] = processor_primitives
