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
- A pipeline's transformers components (text encoder, safety checker) are checked the same way
  (:func:`load_component`), and a ``model_index.json`` class a pipeline cannot load is a one-line
  :class:`UnloadableComponentError` (:func:`load_method`); libraries: :func:`import_library`.
- On the ``device_map`` path the names and shapes come from the safetensors header
  (:func:`weight_shapes`): the tensors are read once, by accelerate.
- ``save_pretrained(..., safe_serialization=True)`` writes ``diffusion_pytorch_model.safetensors``;
  every write goes through a temporary name and a rename (``saving.py``).
"""
from __future__ import annotations

import json
import os
import pickle
import re
import sys
from typing import Any, Callable, Iterable, Mapping, Optional

import torch

from diffusers.flash.compat.transformers import (  # noqa: F401  (part of this module's API)
    LOADABLE_LIBRARIES,
    UnknownComponentClassError,
    UntrustedLibraryError,
    import_library,
    loader_takes_other_modules,
)
from diffusers.flash.loading.files import (  # noqa: F401  (part of this module's API)
    SAFE_WEIGHTS_NAME,
    WEIGHTS_NAME,
    WEIGHTS_NAMES,
    CheckpointError,
    CorruptCheckpointError,
    IncompleteWeightsError,
    MissingWeightsError,
    ShapeMismatchError,
    UnloadableComponentError,
    UnsafeCheckpointError,
    brief,
    variant_name,
)
from diffusers.flash.loading.saving import (  # noqa: F401  (the hooks of patch 0005 call them from here)
    clean_stale,
    remove_previous,
    save_into,
    save_kwargs,
    save_state_dict,
    temporary_folder,
)
from diffusers.utils import logging

logger = logging.get_logger(__name__)

_GIT_LFS_POINTER = b"version https://git-lfs"
_TORCH_MAGIC = (b"PK\x03\x04", b"\x80")  # torch.save's zip format; its legacy format (a pickle, protocol 2+)
_MAX_LISTED = 5
# transformers' weights files, in the order its from_pretrained prefers them (safetensors first, shards last)
TRANSFORMERS_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                        "pytorch_model.bin.index.json")


# ---------------------------------------------------------------- finding the file
def local_weights_file(folder: str | os.PathLike, subfolder: Optional[str] = None,
                       variant: Optional[str] = None) -> str:
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


def hub_weights_file(repo_id: str, **kwargs: Any) -> str:
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
def load_state_dict(path: str | os.PathLike) -> dict:
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
        problem = f"not a readable safetensors file: truncated or corrupted ({brief(e)})"
        raise CorruptCheckpointError(path, problem) from None


def _load_pickle(path: str, head: bytes, mmap: bool = False) -> dict:
    """``mmap=True`` (zip archives only): the tensors are mapped, not read, for a check of names and shapes."""
    if not head.startswith(_TORCH_MAGIC):
        raise CorruptCheckpointError(
            path, "not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle): truncated or corrupted"
        )
    try:
        if mmap and head.startswith(_TORCH_MAGIC[0]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only load failed" in str(e).lower():
            raise UnsafeCheckpointError(path, _unsafe_reason(str(e))) from None
        raise _unreadable(path, e) from None
    except Exception as e:  # zip reader RuntimeError, EOFError, KeyError... from a damaged file
        raise _unreadable(path, e) from None


def _unreadable(path: str, e: Exception) -> CorruptCheckpointError:
    return CorruptCheckpointError(path, f"not a readable PyTorch checkpoint: truncated or corrupted ({brief(e)})")


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


def weight_shapes(path: str | os.PathLike) -> dict:
    """``{name: shape}`` of the weights in ``path`` without reading them: a safetensors file's header (which
    safetensors checks against the file's size, so a truncated file is refused here), a ``.bin`` mapped
    (``torch.load(mmap=True, weights_only=True)``: an unsafe pickle is refused as by :func:`load_state_dict`;
    a ``.bin`` in torch's legacy format, which cannot be mapped, is read)."""
    path = str(path)
    head = _head(path)
    if not path.endswith(".safetensors"):
        return {k: tuple(v.shape) for k, v in _check_state_dict(_load_pickle(path, head, mmap=True), path).items()}
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # SafetensorError (its import path varies by release) and OSError
        problem = f"not a readable safetensors file: truncated or corrupted ({brief(e)})"
        raise CorruptCheckpointError(path, problem) from None


def _check_state_dict(state_dict: object, path: str) -> dict:
    if not isinstance(state_dict, dict):
        raise CorruptCheckpointError(path, f"holds a {type(state_dict).__name__}, not a state dict of named tensors")
    odd = [k for k, v in state_dict.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if odd:
        raise CorruptCheckpointError(
            path, f"not a plain state dict: {len(odd)} entr{'y is' if len(odd) == 1 else 'ies are'} not named tensors "
                  f"({', '.join(repr(k) for k in odd[:_MAX_LISTED])})"
        )
    return state_dict


def check_weights(model: torch.nn.Module, state_dict: Mapping, path: str | os.PathLike,
                  ignore_mismatched_sizes: bool = False) -> None:
    """``state_dict``: the file's tensors, or their shapes (:func:`weight_shapes`). Refuse weights that do not
    fit the model built from its config: :class:`IncompleteWeightsError` when the file lacks some of the
    model's weights or holds weights the model does not have (upstream 0.4 would leave the missing ones
    randomly initialized behind a warning), :class:`ShapeMismatchError` when a weight has another shape.
    ``ignore_mismatched_sizes=True`` (upstream's option) loads anyway, as upstream does: missing weights
    newly initialized, unexpected ones and mismatched shapes dropped, each logged."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else tuple(v) for k, v in state_dict.items()}
    bad = [(k, got, tuple(expected[k].shape)) for k, got in shapes.items()
           if k in expected and got != tuple(expected[k].shape)]
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


def _listed(keys: Iterable) -> str:
    keys = [str(k) for k in keys]
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f" and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else "") if keys else "none"


# ---------------------------------------------------------------- a pipeline's components
def load_method(class_obj: type, method_name: Optional[str], entry: str) -> Callable:
    """``class_obj``'s load method for the pipeline component ``entry``, or a one-line
    :class:`UnloadableComponentError` where the class is none the pipeline loads (``["transformers",
    "AutoModel"]``: not a model, tokenizer or processor class) or needs a backend that is not installed
    (``OnnxRuntimeModel`` without onnxruntime)."""
    name = getattr(class_obj, "__name__", repr(class_obj))
    if method_name is None:
        raise UnloadableComponentError(
            f"model_index.json: entry {entry!r} names {name}, which is not a class a pipeline loads (a model, "
            "scheduler, tokenizer or processor of diffusers or transformers): name the component's own class")
    if name == "OnnxRuntimeModel":
        from diffusers.utils import is_onnx_available

        if not is_onnx_available():
            raise UnloadableComponentError(
                f"model_index.json: entry {entry!r} is an {name}, which needs the onnxruntime package: "
                "`pip install onnxruntime`, or load a PyTorch version of this model")
    return getattr(class_obj, method_name)


def _is_transformers_model(cls: object) -> bool:
    transformers = sys.modules.get("transformers")  # never imported here: a class of it means it is loaded
    return (isinstance(cls, type) and transformers is not None
            and issubclass(cls, transformers.PreTrainedModel))


def transformers_weights_files(folder: str | os.PathLike) -> tuple:
    """``(the file transformers will read, [every weights file it names])`` for a transformers model folder:
    ``model.safetensors``, else its shard index and shards, else ``pytorch_model.bin`` (and shards); ``(None,
    [])`` where there is none (transformers then says what is missing)."""
    folder = str(folder)
    for name in TRANSFORMERS_WEIGHTS:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        if not name.endswith(".index.json"):
            return path, [path]
        try:
            with open(path, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CorruptCheckpointError(path, f"not a readable shard index ({brief(e)})") from None
        return path, [os.path.join(folder, shard) for shard in shards]
    return None, []


def load_component(load: Callable, folder: str | os.PathLike, entry: str, **kwargs: Any) -> Any:
    """``load(folder, **kwargs)``, a pipeline component's load method, with the component's weights checked
    as a diffusers model's are (which ``ModelMixin.from_pretrained`` does itself). For a transformers model
    (the text encoder, the safety checker): each weights file is refused if empty, a git-lfs pointer,
    truncated or an unsafe pickle (:func:`weight_shapes`); then transformers loads it, and weights it
    reports missing, unexpected or of another shape are refused (:class:`IncompleteWeightsError`,
    :class:`ShapeMismatchError`) where transformers would leave them newly initialized with a note. To load
    such a model anyway, load it yourself and pass it to the pipeline (``text_encoder=...``)."""
    if not _is_transformers_model(getattr(load, "__self__", None)):
        return load(folder, **kwargs)
    index, files = transformers_weights_files(folder)
    if index is None:
        return load(folder, **kwargs)
    for path in files:
        weight_shapes(path)
    model, info = load(folder, **{**kwargs, "output_loading_info": True, "ignore_mismatched_sizes": True})
    missing, unexpected = sorted(info.get("missing_keys") or []), sorted(info.get("unexpected_keys") or [])
    bad = sorted(info.get("mismatched_keys") or [])
    name = type(model).__name__
    escape = (f"; to load it anyway (newly initialized where missing), load it yourself with {name}."
              f"from_pretrained({str(folder)!r}) and pass it as {entry}=")
    if bad:
        listed = "; ".join(f"{k}: {tuple(got)} in the file, {tuple(want)} in the model"
                           for k, got, want, *_ in bad[:_MAX_LISTED])
        raise ShapeMismatchError(index, f"pipeline component {entry!r}: {len(bad)} weight(s) do not fit the {name} "
                                        f"built from its config ({listed}){escape}")
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} of the {name}'s weights are missing ({_listed(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} weight(s) the model does not have are in the file "
                         f"({_listed(unexpected)})")
        raise IncompleteWeightsError(index, f"pipeline component {entry!r}: {'; '.join(parts)}. The file is "
                                            f"incomplete or belongs to another model{escape}")
    return model
