"""``diffusers.flash.mixins``, the path patch 0004 imports: the same module object as
:mod:`diffusers.flash.base_classes`."""
import sys

from diffusers.flash import base_classes

sys.modules[__name__] = base_classes
