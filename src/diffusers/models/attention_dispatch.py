# diffusers-flash: the attention dispatcher's earlier import path, kept so that code written against it keeps
# working. The module is diffusers.flash.attention.dispatch; this name is the same module object.
import sys

from ..flash.attention import dispatch as _dispatch

sys.modules[__name__] = _dispatch
