# diffusers-flash: save_pretrained's writes (patch 0005-safe-loading.patch calls them through safe_loading).
"""Saving that a kill cannot corrupt: every file is written under a temporary name in its folder, flushed and
renamed into place, so it is its old version or its new one; temporaries a killed save left are removed by
the next save."""
from __future__ import annotations

import inspect
import os
import re
import shutil
import stat
import tempfile
from typing import Any, Callable, Optional

import torch

from diffusers.flash.fsio import fsync_path, pid_alive
from diffusers.flash.loading.files import (
    SAFE_WEIGHTS_NAME,
    WEIGHTS_NAME,
    WEIGHTS_NAMES,
    CorruptCheckpointError,
    brief,
    variant_name,
)
from diffusers.utils import logging

logger = logging.get_logger(__name__)

# our temporary files and folders: .<name>.pid<pid>.<random>.tmp (and an earlier release's .<weights>.<pid>.tmp)
_TEMPORARY = re.compile(r"^\..+\.pid(\d+)\.[A-Za-z0-9_]+\.tmp$|^\.diffusion_pytorch_model[^/]*\.(\d+)\.tmp$")


def save_state_dict(state_dict: dict, directory: str | os.PathLike, save_function: Optional[Callable] = torch.save,
                    safe_serialization: bool = False, is_main_process: bool = True,
                    variant: Optional[str] = None) -> str:
    """Write ``state_dict`` into ``directory``; returns the file written. With ``safe_serialization`` it is
    ``diffusion_pytorch_model.safetensors`` (safetensors' writer, ``save_function`` unused), else
    ``save_function(state_dict, .../diffusion_pytorch_model.bin)`` as upstream.

    The file is written into a new private temporary folder inside ``directory`` (an unpredictable name,
    created exclusively with mode 0700: nothing planted can be there, and a ``.bin`` is created there with
    O_EXCL and O_NOFOLLOW), flushed to disk and renamed into place; only then are the folder's other weights
    files (a previous save's) removed, by the main process. A crash at any point leaves the old weights or the
    new ones, never neither, and the temporaries a killed save left are removed by the next one
    (:func:`clean_stale`). ``variant`` (0.13+) names the file as upstream does
    (``diffusion_pytorch_model.fp16.bin``), and only that variant's other file is removed."""
    directory = str(directory)
    name = variant_name(SAFE_WEIGHTS_NAME if safe_serialization else WEIGHTS_NAME, variant)
    path = os.path.join(directory, name)
    clean_stale(directory)
    staging = temporary_folder(directory, name)
    tmp = os.path.join(staging, name)
    try:
        if safe_serialization:
            from safetensors.torch import save_file

            if save_function not in (None, torch.save, save_file):  # 0.10+ passes safetensors' own writer
                logger.warning("safe_serialization=True writes %s with safetensors: save_function is not used",
                               SAFE_WEIGHTS_NAME)
            save_file({k: v.contiguous() for k, v in state_dict.items()}, tmp, metadata={"format": "pt"})
        elif save_function in (None, torch.save):
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
            with os.fdopen(fd, "wb") as f:
                torch.save(state_dict, f)
        else:
            save_function(state_dict, tmp)
        if os.path.lexists(tmp):  # not there: a save_function that writes elsewhere (e.g. a TPU's) or not here
            if not stat.S_ISREG(os.lstat(tmp).st_mode):
                raise CorruptCheckpointError(tmp, "not a plain file after the weights were written to it: not "
                                                  "installed as the weights file")
            os.chmod(tmp, 0o666 & ~_umask())  # as a plain write makes it (safetensors' own writer makes 0600)
            fsync_path(tmp)
            os.replace(tmp, path)
            fsync_path(directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if is_main_process:
        remove_previous(directory, [name], variant)
    return path


def temporary_folder(directory: str, name: str) -> str:
    """A new folder in ``directory`` for writing ``name``: ``.<name>.pid<pid>.<random>.tmp``, mode 0700,
    created exclusively (tempfile.mkdtemp), so nothing planted beforehand is in it or written through."""
    return tempfile.mkdtemp(dir=directory, prefix=f".{name}.pid{os.getpid()}.", suffix=".tmp")


def _umask() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as f:  # Linux: read without setting it
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def _weights_family(name: str) -> Optional[tuple]:
    """(stem, variant) of a weights file's name (``diffusion_pytorch_model``, ``model-00001-of-00002``,
    ``pytorch_model.fp16``...), None for any other file."""
    found = re.match(r"^(diffusion_pytorch_model|pytorch_model|model)(?:-\d+-of-\d+)?(?:\.([\w-]+))?"
                     r"\.(?:bin|safetensors)(?:\.index\.json)?$", name)
    return (found.group(1), found.group(2)) if found else None


def remove_previous(directory: str, written: list, variant: Optional[str] = None) -> None:
    """Remove a previous save's weights files that this save (``written``, names in ``directory``) replaces:
    upstream's clean-up, done after the new files are in place. A diffusers weights file (each file of
    ``variant`` only, when given) goes when another of its kind was written; a transformers one when one of
    its name and variant (``model``, ``pytorch_model``, shards) was."""
    families = {_weights_family(n) for n in written} - {None}
    for other in os.listdir(directory):
        full = os.path.join(directory, other)
        if other in written or not os.path.isfile(full) or os.path.islink(full):
            continue
        if other.startswith(WEIGHTS_NAME[:-4]) and any(n.startswith(WEIGHTS_NAME[:-4]) for n in written):
            ours = other in {variant_name(n, variant) for n in WEIGHTS_NAMES} if variant else True
        else:
            ours = _weights_family(other) in families
        if ours:
            os.remove(full)



def clean_stale(directory: str) -> None:
    """Remove the temporary files and folders a killed save left in ``directory`` (ours only: named as
    :func:`temporary_folder` names them, by a process of this machine that no longer runs; a save running now
    keeps its own)."""
    try:
        entries = os.listdir(directory)
    except OSError:
        return
    for entry in entries:
        found = _TEMPORARY.match(entry)
        if not found or pid_alive(int(found.group(1) or found.group(2))):
            continue
        full = os.path.join(directory, entry)
        try:
            if os.path.isdir(full) and not os.path.islink(full):
                shutil.rmtree(full)
            else:
                os.remove(full)
            logger.info("removed %s, left by a save that was killed", full)
        except OSError as e:
            logger.warning("could not remove %s, left by a save that was killed (%s)", full, brief(e))


def save_into(save: Callable, directory: str | os.PathLike, **kwargs: Any) -> None:
    """``save(directory, **kwargs)`` (a ``save_pretrained`` or ``save_config``, of any library) made safe
    against a kill: it writes into a new temporary folder inside ``directory``, each file there is flushed
    and renamed into ``directory`` (so every file is its old version or its new one, never empty or half
    written), then the previous save's weights files the new ones replace are removed
    (:func:`remove_previous`). Temporaries a killed save left are removed first (:func:`clean_stale`)."""
    directory = str(directory)
    if os.path.exists(directory) and not os.path.isdir(directory):
        return save(directory, **kwargs)  # the library's own error or message
    os.makedirs(directory, exist_ok=True)
    clean_stale(directory)
    staging = temporary_folder(directory, "save")
    try:
        result = save(staging, **kwargs)
        written = []
        for root, _, files in os.walk(staging):
            for name in files:
                src = os.path.join(root, name)
                rel = os.path.relpath(src, staging)
                if os.path.islink(src) or _TEMPORARY.match(name):
                    continue
                fsync_path(src)
                dst = os.path.join(directory, rel)
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                os.replace(src, dst)
                written.append(rel)
        fsync_path(directory)
        top = [w for w in written if os.sep not in w]
        variants = {f[1] for f in map(_weights_family, top) if f and f[0] == "diffusion_pytorch_model"} - {None}
        remove_previous(directory, top, variants.pop() if len(variants) == 1 else None)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result


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
