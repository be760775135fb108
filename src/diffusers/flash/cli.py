"""``diffusers.flash.cli``, the path patch 0004 imports: the same module object as
:mod:`diffusers.flash.cli_env`."""
import sys

from diffusers.flash import cli_env

sys.modules[__name__] = cli_env
