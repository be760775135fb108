# diffusers-flash: the names and errors of weights files, shared by loading (safe_loading.py) and saving
# (saving.py).
"""Weights files: their names and the errors that name them."""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from diffusers.utils import WEIGHTS_NAME

if TYPE_CHECKING:
    import os

SAFE_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_NAMES = (SAFE_WEIGHTS_NAME, WEIGHTS_NAME)  # in order of preference


class CheckpointError(OSError):
    """A weights file cannot be loaded; ``path`` names it (or the folder that lacks one)."""

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        self.path = str(path)
        super().__init__(f"{self.path}: {problem}")


class UnsafeCheckpointError(CheckpointError):
    """A pickle (``.bin``) that asks to import or call code: refused, never run."""


class CorruptCheckpointError(CheckpointError):
    """A weights file that is truncated, corrupted, a git-lfs pointer, or not a state dict."""


class MissingWeightsError(CheckpointError, FileNotFoundError):
    """A model folder with neither weights file. The message begins as upstream's did ("Error no file named
    <the .bin name> found in directory <folder>"), which code and upstream's tests match on."""

    def __init__(self, path: str | os.PathLike, problem: str, upstream_name: Optional[str] = None) -> None:
        super().__init__(path, problem)
        if upstream_name:
            self.args = (f"Error no file named {upstream_name} found in directory {self.path} ({problem})",)


class ShapeMismatchError(CheckpointError, RuntimeError):
    """Weights whose shapes differ from the model's (a RuntimeError too, as upstream's was)."""


class IncompleteWeightsError(CheckpointError, RuntimeError):
    """A weights file that lacks some of the model's weights, or holds weights the model does not have."""


class UnloadableComponentError(ValueError):
    """A ``model_index.json`` entry names a class a pipeline cannot load (not a model, scheduler, tokenizer...
    of its library, or one whose backend is not installed)."""


def variant_name(name: str, variant: Optional[str] = None) -> str:
    """``diffusion_pytorch_model.fp16.safetensors`` for ``variant="fp16"`` (upstream's ``_add_variant``, 0.13+)."""
    if not variant:
        return name
    stem, ext = name.rsplit(".", 1)
    return f"{stem}.{variant}.{ext}"


def brief(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__
