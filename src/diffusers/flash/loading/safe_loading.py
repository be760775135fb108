# diffusers-flash: load and save model weights safely. ModelMixin.from_pretrained/save_pretrained
# call into this module (patch 0005-safe-loading.patch); everything else about loading stays upstream's.
"""Safe weight files for Diffusers 0.4.

- The weights file is ``diffusion_pytorch_model.safetensors`` when there is one, else
  ``diffusion_pytorch_model.bin``: in a local folder, and from the Hub (the safetensors name is
  asked for first; the ``.bin`` name is asked for only when the Hub, or the offline cache, has no
  safetensors file).
- ``.safetensors`` files are read with the safetensors package: no pickle at all.
- ``.bin`` files are read with ``torch.load(..., weights_only=True)`` on every torch (2.1+), so a
  pickle that would import or call anything but tensor-building code is refused
  (:class:`UnsafeCheckpointError`) instead of run.
- A truncated or corrupted file (:class:`CorruptCheckpointError`), a folder with no weights file
  (:class:`MissingWeightsError`) and weights whose shapes do not fit the model built from its
  config (:class:`ShapeMismatchError`) each raise an error that names the file and the problem.
- ``save_pretrained(..., safe_serialization=True)`` writes ``diffusion_pytorch_model.safetensors``.
"""
from __future__ import annotations

import functools
import importlib.util
import inspect
import os
import pickle
import re
import sys
from typing import Callable, Optional

import torch

from diffusers.flash.fsio import fsync_path
from diffusers.utils import WEIGHTS_NAME, logging

logger = logging.get_logger(__name__)

SAFE_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_NAMES = (SAFE_WEIGHTS_NAME, WEIGHTS_NAME)  # in order of preference
_GIT_LFS_POINTER = b"version https://git-lfs"
_TORCH_MAGIC = (b"PK\x03\x04", b"\x80")  # torch.save's zip format; its legacy format (a pickle, protocol 2+)
_MAX_LISTED = 5
LOADABLE_LIBRARIES = ("diffusers", "transformers")  # pipeline_utils.LOADABLE_CLASSES' libraries


class CheckpointError(OSError):
    """A weights file cannot be loaded; ``path`` names it (or the folder that lacks one)."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        super().__init__(f"{self.path}: {problem}")


class UnsafeCheckpointError(CheckpointError):
    """A pickle (``.bin``) that asks to import or call code: refused, never run."""


class CorruptCheckpointError(CheckpointError):
    """A weights file that is truncated, corrupted, a git-lfs pointer, or not a state dict."""


class MissingWeightsError(CheckpointError, FileNotFoundError):
    """A model folder with neither weights file. The message begins as upstream's did ("Error no file named
    <the .bin name> found in directory <folder>"), which code and upstream's tests match on."""

    def __init__(self, path, problem: str, upstream_name: Optional[str] = None):
        super().__init__(path, problem)
        if upstream_name:
            self.args = (f"Error no file named {upstream_name} found in directory {self.path} ({problem})",)


class ShapeMismatchError(CheckpointError, RuntimeError):
    """Weights whose shapes differ from the model's (a RuntimeError too, as upstream's was)."""


class IncompleteWeightsError(CheckpointError, RuntimeError):
    """A weights file that lacks some of the model's weights, or holds weights the model does not have."""


class UntrustedLibraryError(ValueError):
    """A ``model_index.json`` entry names a library pipelines do not load from (importing it would run code)."""


# ---------------------------------------------------------------- finding the file
def variant_name(name: str, variant: Optional[str] = None) -> str:
    """``diffusion_pytorch_model.fp16.safetensors`` for ``variant="fp16"`` (upstream's ``_add_variant``, 0.13+)."""
    if not variant:
        return name
    stem, ext = name.rsplit(".", 1)
    return f"{stem}.{variant}.{ext}"


def local_weights_file(folder, subfolder: Optional[str] = None, variant: Optional[str] = None) -> str:
    """The weights file of a local model folder (upstream's order: ``folder``, then ``folder/subfolder``;
    in each, safetensors before ``.bin``); ``variant`` (0.13+): that variant's files."""
    folders = [str(folder)] + ([os.path.join(str(folder), subfolder)] if subfolder else [])
    names = [variant_name(n, variant) for n in WEIGHTS_NAMES]
    for directory in folders:
        for name in names:
            path = os.path.join(directory, name)
            if os.path.isfile(path):
                return path
    raise MissingWeightsError(
        folders[-1], f"no weights file: looked for {' and '.join(names)} in {' and '.join(folders)}", names[-1]
    )


def hub_weights_file(repo_id: str, **kwargs) -> str:
    """Download (or find in the cache) a Hub model's weights file: the safetensors file if the repo has one,
    else the ``.bin``. ``kwargs`` are hf_hub_download's (cache_dir, subfolder, revision, local_files_only...)."""
    from huggingface_hub.utils import EntryNotFoundError

    from diffusers.flash.compat.hub import HubOfflineError, hf_hub_download

    try:
        return hf_hub_download(repo_id, filename=SAFE_WEIGHTS_NAME, **kwargs)
    except (EntryNotFoundError, HubOfflineError) as e:  # not in the repo, or not cached while offline
        logger.debug("%s has no %s (%s): trying %s", repo_id, SAFE_WEIGHTS_NAME, type(e).__name__, WEIGHTS_NAME)
    return hf_hub_download(repo_id, filename=WEIGHTS_NAME, **kwargs)


# ---------------------------------------------------------------- loading
def load_state_dict(path) -> dict:
    """The state dict in ``path``: safetensors by name, anything else as a weights-only PyTorch pickle."""
    path = str(path)
    head = _head(path)
    if path.endswith(".safetensors"):
        state_dict = _load_safetensors(path)
    else:
        state_dict = _load_pickle(path, head)
    return _check_state_dict(state_dict, path)


def _head(path: str) -> bytes:
    """The file's first bytes, after refusing a missing or empty file and a git-lfs pointer."""
    if not os.path.isfile(path):
        raise MissingWeightsError(path, "no such weights file")
    with open(path, "rb") as f:
        head = f.read(len(_GIT_LFS_POINTER))
    if not head:
        raise CorruptCheckpointError(path, "the file is empty (an interrupted download or save?)")
    if head == _GIT_LFS_POINTER:
        raise CorruptCheckpointError(
            path, "this is a git-lfs pointer, not the weights: the repository was cloned without git-lfs; "
                  "run `git lfs install` and `git lfs pull` in it"
        )
    return head


def _load_safetensors(path: str) -> dict:
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except Exception as e:  # SafetensorError (its import path varies by release) and OSError
        problem = f"not a readable safetensors file: truncated or corrupted ({_brief(e)})"
        raise CorruptCheckpointError(path, problem) from None


def _load_pickle(path: str, head: bytes) -> dict:
    if not head.startswith(_TORCH_MAGIC):
        raise CorruptCheckpointError(
            path, "not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle): truncated or corrupted"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only load failed" in str(e).lower():
            raise UnsafeCheckpointError(path, _unsafe_reason(str(e))) from None
        raise _unreadable(path, e) from None
    except Exception as e:  # zip reader RuntimeError, EOFError, KeyError... from a damaged file
        raise _unreadable(path, e) from None


def _unreadable(path: str, e: Exception) -> CorruptCheckpointError:
    return CorruptCheckpointError(path, f"not a readable PyTorch checkpoint: truncated or corrupted ({_brief(e)})")


def _unsafe_reason(message: str) -> str:
    detail = message.split("WeightsUnpickler error:", 1)[-1].strip()
    found = re.search(r"\b(?:GLOBAL|class)\s+([\w.]+)", detail)
    if found:
        what = f"it asks to import {found.group(1)}"
    else:
        what = "it holds pickle instructions outside tensor data" + (f" ({detail.splitlines()[0]})" if detail else "")
    return (
        f"refused to unpickle: {what}, which could run arbitrary code, and a weights file holds only tensors. "
        f"Nothing in it was run. If you trust the file, convert it to {SAFE_WEIGHTS_NAME} where it is safe to do so"
    )


def _check_state_dict(state_dict, path: str) -> dict:
    if not isinstance(state_dict, dict):
        raise CorruptCheckpointError(path, f"holds a {type(state_dict).__name__}, not a state dict of named tensors")
    odd = [k for k, v in state_dict.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if odd:
        raise CorruptCheckpointError(
            path, f"not a plain state dict: {len(odd)} entr{'y is' if len(odd) == 1 else 'ies are'} not named tensors "
                  f"({', '.join(repr(k) for k in odd[:_MAX_LISTED])})"
        )
    return state_dict


def check_weights(model: torch.nn.Module, state_dict: dict, path, ignore_mismatched_sizes: bool = False) -> None:
    """Refuse weights that do not fit the model built from its config: :class:`IncompleteWeightsError` when
    the file lacks some of the model's weights or holds weights the model does not have (upstream 0.4 would
    leave the missing ones randomly initialized behind a warning), :class:`ShapeMismatchError` when a weight
    has another shape. ``ignore_mismatched_sizes=True`` (upstream's option) loads anyway, as upstream does:
    missing weights newly initialized, unexpected ones and mismatched shapes dropped, each logged."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    bad = [(k, tuple(v.shape), tuple(expected[k].shape))
           for k, v in state_dict.items() if k in expected and v.shape != expected[k].shape]
    if ignore_mismatched_sizes:
        if missing or unexpected:
            logger.warning("%s: %d of %s's weights missing (newly initialized: %s), %d unexpected (ignored: %s); "
                           "loading anyway because ignore_mismatched_sizes=True", path, len(missing),
                           type(model).__name__, _listed(missing), len(unexpected), _listed(unexpected))
        return
    model_name = type(model).__name__
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} of the {len(expected)} weights of the {model_name} built from its config "
                         f"are missing ({_listed(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} weight(s) the model does not have are in the file ({_listed(unexpected)})")
        raise IncompleteWeightsError(
            path, "; ".join(parts) + ". The file is incomplete or belongs to another model; pass "
                  "ignore_mismatched_sizes=True to load it anyway with the missing weights newly initialized"
        )
    if not bad:
        return
    listed = "; ".join(f"{k}: {got} in the file, {want} in the model" for k, got, want in bad[:_MAX_LISTED])
    more = f" (and {len(bad) - _MAX_LISTED} more)" if len(bad) > _MAX_LISTED else ""
    raise ShapeMismatchError(
        path, f"{len(bad)} weight(s) do not fit the {model_name} built from its config: {listed}{more}. "
              "The config and the weights come from different models; pass ignore_mismatched_sizes=True to "
              "leave those weights newly initialized"
    )


def _listed(keys: list) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f" and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else "") if keys else "none"


# ---------------------------------------------------------------- which libraries a model folder may name
def import_library(library: str, entry: str):
    """The library a pipeline folder's ``model_index.json`` names for ``entry`` (``"unet": ["diffusers",
    "UNet2DConditionModel"]``): imported only if it is one pipelines load components from (diffusers,
    transformers). Importing a module runs its code, and a folder could otherwise name a module of its own,
    found on ``sys.path`` (a folder's parent is there under ``python -c``, the REPL, notebooks). On releases
    whose loader takes components from other modules (0.27+), a module this process has already imported
    itself is returned as it is, as upstream does from 0.42.1: nothing of the folder's runs, and
    ``save_pretrained`` records a component of the caller's own module that way. Custom pipeline code is
    taken only when the caller names it (``custom_pipeline=``, ``trust_remote_code=True``)."""
    from diffusers.flash.compat.transformers import import_library as _import

    if library in LOADABLE_LIBRARIES:
        return _import(library)
    takes_other_modules = _loader_takes_other_modules()
    if takes_other_modules and library in sys.modules:
        return sys.modules[library]
    raise UntrustedLibraryError(
        f"model_index.json: entry {entry!r} names library {library!r}; pipelines load components only from "
        f"{' and '.join(LOADABLE_LIBRARIES)}"
        + (" or from a module this process has imported itself" if takes_other_modules else "")
        + ", and importing another module would run its code: refused"
    )


@functools.cache
def _loader_takes_other_modules() -> bool:
    """Whether this release loads pipeline components from modules beyond LOADABLE_CLASSES' libraries (its
    pipelines/pipeline_loading_utils.py, 0.27 on: ALL_IMPORTABLE_CLASSES for them); 0.4-0.14 look the library
    up in LOADABLE_CLASSES and could not use another module anyway."""
    return importlib.util.find_spec("diffusers.pipelines.pipeline_loading_utils") is not None


# ---------------------------------------------------------------- saving
def save_state_dict(state_dict: dict, directory, save_function: Optional[Callable] = torch.save,
                    safe_serialization: bool = False, is_main_process: bool = True,
                    variant: Optional[str] = None) -> str:
    """Write ``state_dict`` into ``directory``; returns the file written. With ``safe_serialization`` it is
    ``diffusion_pytorch_model.safetensors`` (safetensors' writer, ``save_function`` unused), else
    ``save_function(state_dict, .../diffusion_pytorch_model.bin)`` as upstream.

    The file is written under a temporary name in the same folder, flushed to disk and renamed into place;
    only then are the folder's other weights files (a previous save's) removed, by the main process. A crash
    at any point leaves the old weights or the new ones, never neither. ``variant`` (0.13+) names the file
    as upstream does (``diffusion_pytorch_model.fp16.bin``), and only that variant's other file is removed."""
    directory = str(directory)
    name = variant_name(SAFE_WEIGHTS_NAME if safe_serialization else WEIGHTS_NAME, variant)
    path = os.path.join(directory, name)
    tmp = os.path.join(directory, f".{name}.{os.getpid()}.tmp")
    try:
        if safe_serialization:
            from safetensors.torch import save_file

            if save_function not in (None, torch.save, save_file):  # 0.10+ passes safetensors' own writer
                logger.warning("safe_serialization=True writes %s with safetensors: save_function is not used",
                               SAFE_WEIGHTS_NAME)
            save_file({k: v.contiguous() for k, v in state_dict.items()}, tmp, metadata={"format": "pt"})
        else:
            (save_function or torch.save)(state_dict, tmp)
        if os.path.isfile(tmp):  # a save_function that writes elsewhere (e.g. a TPU's) is left to itself
            fsync_path(tmp)
            os.replace(tmp, path)
            fsync_path(directory)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    if is_main_process:
        for other in os.listdir(directory):  # upstream's clean-up of a previous save, now after the write
            full = os.path.join(directory, other)
            ours = other.startswith(WEIGHTS_NAME[:-4]) if not variant else other in {
                variant_name(n, variant) for n in WEIGHTS_NAMES}
            if other != name and ours and os.path.isfile(full):
                os.remove(full)
    return path


def save_kwargs(save_method: Callable, safe_serialization: bool) -> dict:
    """``{"safe_serialization": True}`` for a pipeline component whose save method takes it (diffusers and
    transformers models), else nothing: each library's own default stays."""
    if not safe_serialization:
        return {}
    try:
        params = inspect.signature(save_method).parameters
    except (TypeError, ValueError):
        return {}
    return {"safe_serialization": True} if "safe_serialization" in params else {}


def _brief(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__
