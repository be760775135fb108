# diffusers-flash: what Diffusers 0.4 needs from transformers, on transformers 4.30 to 5.x
# (patch 0002-transformers-compat.patch). Nothing here imports transformers until it is used.
"""transformers compatibility for Diffusers 0.4.

- ``CLIPFeatureExtractor`` (gone in transformers 5) is ``CLIPImageProcessor`` where missing (its PIL
  backend without torchvision), for the pipelines' imports and for checkpoints whose
  ``model_index.json`` names it; so is ``DPTFeatureExtractor`` (Diffusers 0.10's depth-to-image) for
  ``DPTImageProcessor``.
- :func:`import_library` is what pipeline loading uses instead of ``importlib.import_module`` for the
  library a ``model_index.json`` entry names: only diffusers and transformers are imported (a module
  this process imported itself is taken where the release's loader can use it); in ``transformers``
  it resolves such old class names; a class the library lacks is a one-line error.
- ``FLAX_WEIGHTS_NAME`` (gone from ``transformers.utils`` in 5) for Diffusers 0.13+'s pipeline loading.
- :data:`LOADABLE_TRANSFORMERS` adds the base classes transformers moved tokenizers and image
  processors to (``PreTrainedTokenizerBase``, ``ImageProcessingMixin``).
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
import types
from typing import Any, Optional

LOADABLE_LIBRARIES = ("diffusers", "transformers")  # pipeline_utils.LOADABLE_CLASSES' libraries

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


def image_processor(model: str, module: types.ModuleType | None = None) -> type:
    """transformers' image processor class for ``model`` ("CLIP", "DPT"). Without torchvision,
    transformers 5 hands out its PIL backend from ``<model>ImageProcessor`` with a warning at every use;
    ask for that backend directly."""
    module = module or importlib.import_module("transformers")
    if importlib.util.find_spec("torchvision") is None and hasattr(module, f"{model}ImageProcessorPil"):
        return getattr(module, f"{model}ImageProcessorPil")
    return getattr(module, f"{model}ImageProcessor")


def clip_image_processor(module: types.ModuleType | None = None) -> type:
    """transformers' CLIP image processor class (see :func:`image_processor`)."""
    return image_processor("CLIP", module)


def paint_by_example_proj_size(config: Any, proj_size: int | None = None) -> int:
    """PaintByExampleImageEncoder's projection size, written into its CLIP config so that a saved encoder
    loads back with its own size. Upstream takes it as a constructor argument only; a reload builds the
    encoder from the config alone, so any size but 768 did not fit the saved weights, which transformers
    5 and accelerate 1.x refuse (older ones loaded the weights over the wrong shape). Given: that size;
    not given: the config's, else upstream's 768."""
    if proj_size is None:
        proj_size = getattr(config, "proj_size", 768)
    config.proj_size = proj_size
    return proj_size


def _resolve(module: types.ModuleType, name: str) -> Any:
    try:
        return getattr(module, name)
    except AttributeError:
        if name in RENAMED:
            return RENAMED[name](module)
        raise


class UntrustedLibraryError(ValueError):
    """A ``model_index.json`` entry names a library pipelines do not load from (importing it would run code)."""


class UnknownComponentClassError(AttributeError, ValueError):
    """A ``model_index.json`` entry names a class its library does not have."""


class _Library(types.ModuleType):
    """A view of a library for one ``model_index.json`` entry: old transformers class names still resolve,
    and a class the library lacks is an error naming the entry."""

    def __init__(self, real: types.ModuleType, entry: Optional[str] = None) -> None:
        super().__init__(real.__name__)
        self._real = real
        self._entry = entry

    def __getattr__(self, name: str) -> Any:
        try:
            return _resolve(self._real, name) if self._real.__name__ == "transformers" else getattr(self._real, name)
        except AttributeError:
            pass
        where = f"entry {self._entry!r} names" if self._entry else "names"
        raise UnknownComponentClassError(
            f"model_index.json: {where} class {name!r}, which {self._real.__name__} does not have (another "
            "release's class, or a misspelling?)"
        ) from None


def import_library(library: str, entry: Optional[str] = None) -> types.ModuleType:
    """The library a pipeline folder's ``model_index.json`` names for ``entry`` (``"unet": ["diffusers",
    "UNet2DConditionModel"]``). diffusers and transformers come as a view in which old transformers class
    names resolve and a missing class is a one-line :class:`UnknownComponentClassError`. Imported only if
    it is one pipelines load components from (diffusers, transformers): importing a module runs its code,
    and a folder could otherwise name a module of its own, found on ``sys.path`` (a folder's parent is
    there under ``python -c``, the REPL, notebooks). On releases whose loader takes components from other
    modules (0.27+), a module this process has already imported itself is returned as it is, as upstream
    does from 0.42.1: nothing of the folder's runs, and ``save_pretrained`` records a component of the
    caller's own module that way. Anything else raises :class:`UntrustedLibraryError` and nothing is
    imported. Custom pipeline code is taken only when the caller names it (``custom_pipeline=``,
    ``trust_remote_code=True``)."""
    if library in LOADABLE_LIBRARIES:
        return _Library(importlib.import_module(library), entry)
    takes_other_modules = loader_takes_other_modules()
    if takes_other_modules and library in sys.modules:
        return sys.modules[library]
    where = f"entry {entry!r} names" if entry else "names"
    raise UntrustedLibraryError(
        f"model_index.json: {where} library {library!r}; pipelines load components only from "
        f"{' and '.join(LOADABLE_LIBRARIES)}"
        + (" or from a module this process has imported itself" if takes_other_modules else "")
        + ", and importing another module would run its code: refused"
    )


@functools.cache
def loader_takes_other_modules() -> bool:
    """Whether this release loads pipeline components from modules beyond LOADABLE_CLASSES' libraries (its
    pipelines/pipeline_loading_utils.py, 0.27 on: ALL_IMPORTABLE_CLASSES for them); 0.4-0.14 look the library
    up in LOADABLE_CLASSES and could not use another module anyway."""
    return importlib.util.find_spec("diffusers.pipelines.pipeline_loading_utils") is not None


# transformers.utils constants that transformers 5 dropped (with Flax), as transformers 4 defines them; Diffusers
# 0.13+ imports FLAX_WEIGHTS_NAME from there to list a pipeline folder's files
UTILS_CONSTANTS = {"FLAX_WEIGHTS_NAME": "flax_model.msgpack"}


def __getattr__(name: str) -> Any:
    if name in RENAMED:
        return _resolve(importlib.import_module("transformers"), name)
    if name in UTILS_CONSTANTS:
        return getattr(importlib.import_module("transformers.utils"), name, UTILS_CONSTANTS[name])
    raise AttributeError(name)
