# diffusers-flash: what Diffusers 0.4 needs from transformers, on transformers 4.30 to 5.x
# (patch 0002-transformers-compat.patch). Nothing here imports transformers until it is used.
"""transformers compatibility for Diffusers 0.4.

- ``CLIPFeatureExtractor`` (gone in transformers 5) is ``CLIPImageProcessor`` where missing (its PIL
  backend without torchvision), for the pipelines' imports and for checkpoints whose
  ``model_index.json`` names it; so is ``DPTFeatureExtractor`` (Diffusers 0.10's depth-to-image) for
  ``DPTImageProcessor``.
- :func:`import_library` is what pipeline loading uses instead of ``importlib.import_module``: for
  ``transformers`` it resolves such old class names.
- ``FLAX_WEIGHTS_NAME`` (gone from ``transformers.utils`` in 5) for Diffusers 0.13+'s pipeline loading.
- :data:`LOADABLE_TRANSFORMERS` adds the base classes transformers moved tokenizers and image
  processors to (``PreTrainedTokenizerBase``, ``ImageProcessingMixin``).
"""
from __future__ import annotations

import importlib
import importlib.util
import types

# base classes of transformers' loadable objects beyond those Diffusers 0.4 lists
LOADABLE_TRANSFORMERS = {
    "PreTrainedTokenizerBase": ["save_pretrained", "from_pretrained"],
    "ImageProcessingMixin": ["save_pretrained", "from_pretrained"],
}

# names old checkpoints and code use -> the class in today's transformers
# (and, for folders saved with transformers 5 and loaded with 4.x, its per-backend class names)
RENAMED = {name: lambda module: clip_image_processor(module)
           for name in ("CLIPFeatureExtractor", "CLIPImageProcessorPil", "CLIPImageProcessorFast")}
# Diffusers 0.10's depth-to-image pipeline (DPT)
RENAMED.update({name: lambda module: image_processor("DPT", module)
                for name in ("DPTFeatureExtractor", "DPTImageProcessorPil", "DPTImageProcessorFast")})


def image_processor(model: str, module=None):
    """transformers' image processor class for ``model`` ("CLIP", "DPT"). Without torchvision,
    transformers 5 hands out its PIL backend from ``<model>ImageProcessor`` with a warning at every use;
    ask for that backend directly."""
    module = module or importlib.import_module("transformers")
    if importlib.util.find_spec("torchvision") is None and hasattr(module, f"{model}ImageProcessorPil"):
        return getattr(module, f"{model}ImageProcessorPil")
    return getattr(module, f"{model}ImageProcessor")


def clip_image_processor(module=None):
    """transformers' CLIP image processor class (see :func:`image_processor`)."""
    return image_processor("CLIP", module)


def paint_by_example_proj_size(config, proj_size=None) -> int:
    """PaintByExampleImageEncoder's projection size, written into its CLIP config so that a saved encoder
    loads back with its own size. Upstream takes it as a constructor argument only; a reload builds the
    encoder from the config alone, so any size but 768 did not fit the saved weights, which transformers
    5 and accelerate 1.x refuse (older ones loaded the weights over the wrong shape). Given: that size;
    not given: the config's, else upstream's 768."""
    if proj_size is None:
        proj_size = getattr(config, "proj_size", 768)
    config.proj_size = proj_size
    return proj_size


def _resolve(module, name):
    try:
        return getattr(module, name)
    except AttributeError:
        if name in RENAMED:
            return RENAMED[name](module)
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


# transformers.utils constants that transformers 5 dropped (with Flax), as transformers 4 defines them; Diffusers
# 0.13+ imports FLAX_WEIGHTS_NAME from there to list a pipeline folder's files
UTILS_CONSTANTS = {"FLAX_WEIGHTS_NAME": "flax_model.msgpack"}


def __getattr__(name):
    if name in RENAMED:
        return _resolve(importlib.import_module("transformers"), name)
    if name in UTILS_CONSTANTS:
        return getattr(importlib.import_module("transformers.utils"), name, UTILS_CONSTANTS[name])
    raise AttributeError(name)
