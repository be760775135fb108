# diffusers-flash: what Diffusers 0.4 needs from transformers, on transformers 4.30 to 5.x
# (patch 0002-transformers-compat.patch). Nothing here imports transformers until it is used.
"""transformers compatibility for Diffusers 0.4.

- ``CLIPFeatureExtractor`` (gone in transformers 5) is ``CLIPImageProcessor`` where missing, for the
  pipelines' imports and for checkpoints whose ``model_index.json`` names it.
- :func:`import_library` is what pipeline loading uses instead of ``importlib.import_module``: for
  ``transformers`` it resolves such old class names.
- :data:`LOADABLE_TRANSFORMERS` adds the base classes transformers moved tokenizers and image
  processors to (``PreTrainedTokenizerBase``, ``ImageProcessingMixin``).
"""
from __future__ import annotations

import importlib
import types

# base classes of transformers' loadable objects beyond those Diffusers 0.4 lists
LOADABLE_TRANSFORMERS = {
    "PreTrainedTokenizerBase": ["save_pretrained", "from_pretrained"],
    "ImageProcessingMixin": ["save_pretrained", "from_pretrained"],
}

# names old checkpoints and code use -> the name in today's transformers
RENAMED = {"CLIPFeatureExtractor": "CLIPImageProcessor"}


def _resolve(module, name):
    try:
        return getattr(module, name)
    except AttributeError:
        if name in RENAMED:
            return getattr(module, RENAMED[name])
        raise


class _Library(types.ModuleType):
    """A view of transformers in which old class names still resolve."""

    def __init__(self, real):
        super().__init__(real.__name__)
        self._real = real

    def __getattr__(self, name):
        return _resolve(self._real, name)


def import_library(name: str):
    module = importlib.import_module(name)
    return _Library(module) if name == "transformers" else module


def __getattr__(name):
    if name in RENAMED:
        return _resolve(importlib.import_module("transformers"), name)
    raise AttributeError(name)
