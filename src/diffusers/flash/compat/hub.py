# diffusers-flash: the huggingface_hub functions Diffusers 0.4 calls, made to work on huggingface_hub
# 0.20 to 2.x. Upstream modules import these names from here instead of from huggingface_hub
# (patch 0001-hub-compat.patch); everything else about loading stays upstream's.
"""huggingface_hub compatibility for Diffusers 0.4.

- ``use_auth_token=`` is still accepted everywhere and passed on as ``token=``.
- ``resume_download=`` and ``proxies=``, which newer releases reject, are dropped where the
  installed huggingface_hub no longer takes them (a non-empty ``proxies`` is logged: set
  ``HTTP(S)_PROXY`` instead).
- ``HfFolder``, ``cached_download`` and ``Repository``, gone from newer releases, have stand-ins; so has
  ``huggingface_hub.constants.hf_cache_home`` (Diffusers 0.14's ``utils/constants.py``).
- A repository that is not in the local cache while the Hub cannot be reached (``HF_HUB_OFFLINE=1``
  or no network) raises :class:`HubOfflineError`, which names the repository.
"""
from __future__ import annotations

import hashlib
import inspect
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import huggingface_hub as _hub
from huggingface_hub import utils as _hub_utils

# the stdlib's logger of this name is the one diffusers.utils.logging.get_logger hands out; importing that
# module here would be circular from 0.12, where diffusers/utils/hub_utils.py imports this module
logger = logging.getLogger(__name__)

_LocalEntryNotFound = (getattr(_hub_utils, "LocalEntryNotFoundError", None)
                       or __import__("huggingface_hub.errors", fromlist=["x"]).LocalEntryNotFoundError)
try:
    from huggingface_hub.errors import OfflineModeIsEnabled as _OfflineMode
except ImportError:  # older huggingface_hub
    _OfflineMode = getattr(_hub_utils, "OfflineModeIsEnabled", _LocalEntryNotFound)


class HubOfflineError(OSError):
    """A repository is needed from the Hugging Face Hub, is not cached, and the Hub cannot be reached."""

    def __init__(self, repo_id: str, what: str = "", cause: Exception | None = None) -> None:
        self.repo_id = repo_id
        where = f" ({what})" if what else ""
        offline = " HF_HUB_OFFLINE is set;" if _offline() else ""
        super().__init__(
            f"{repo_id}{where} is not in the local cache and the Hugging Face Hub cannot be reached:{offline} "
            f"download it once with network access, or pass the path of a local folder instead of '{repo_id}'."
            + (f" [{type(cause).__name__}: {cause}]" if cause else "")
        )


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


@lru_cache(maxsize=None)
def _params(fn: Callable[..., Any]) -> frozenset:
    return frozenset(inspect.signature(fn).parameters)


def _normalize(fn: Callable[..., Any], kwargs: dict) -> dict:
    kwargs = dict(kwargs)
    legacy = kwargs.pop("use_auth_token", None)
    if legacy is not None and kwargs.get("token") is None:
        kwargs["token"] = legacy
    params = _params(fn)
    for key in ("resume_download", "proxies", "legacy_cache_layout"):
        if key in kwargs and key not in params:
            value = kwargs.pop(key)
            if key == "proxies" and value:
                logger.warning("huggingface_hub %s ignores proxies=%r: set HTTP_PROXY/HTTPS_PROXY instead.",
                               _hub.__version__, value)
    return kwargs


def _call(fn: Callable[..., Any], repo_id: str | os.PathLike, what: str, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(repo_id, *args, **_normalize(fn, kwargs))
    except (_LocalEntryNotFound, _OfflineMode) as e:
        if os.path.isdir(str(repo_id)):
            raise
        raise HubOfflineError(str(repo_id), what, e) from e


def hf_hub_download(repo_id: str | os.PathLike, filename: str | None = None, **kwargs: Any) -> str:
    return _call(_hub.hf_hub_download, repo_id, filename or "", filename=filename, **kwargs)


def snapshot_download(repo_id: str | os.PathLike, **kwargs: Any) -> str:
    return _call(_hub.snapshot_download, repo_id, "snapshot", **kwargs)


def model_info(repo_id: str, **kwargs: Any) -> Any:
    return _call(_hub.model_info, repo_id, "model info", **kwargs)


def whoami(token: str | None = None) -> dict:
    return _hub.whoami(token)


def _get_token() -> str | None:
    fn = getattr(_hub, "get_token", None)
    if fn is None:  # huggingface_hub < 0.20
        return _hub.HfFolder.get_token()
    return fn()


class HfFolder:
    """The part of huggingface_hub's removed ``HfFolder`` that Diffusers 0.4 uses."""

    @staticmethod
    def get_token() -> str | None:
        return _get_token()


def cached_download(url: str, cache_dir: str | os.PathLike | None = None, force_download: bool = False,
                    local_files_only: bool = False, **_ignored: Any) -> str:
    """Download ``url`` once into ``cache_dir`` (huggingface_hub's removed ``cached_download``, for plain
    URLs such as community pipelines on GitHub)."""
    cache_dir = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "huggingface", "diffusers")
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, hashlib.sha256(url.encode()).hexdigest() + "_" + os.path.basename(url))
    if os.path.exists(path) and not force_download:
        return path
    if local_files_only or _offline():
        raise HubOfflineError(url, "not downloaded yet")
    import requests

    resp = requests.get(url, timeout=60)
    resp.raise_for_status()
    fd, tmp = tempfile.mkstemp(dir=cache_dir)
    with os.fdopen(fd, "wb") as f:
        f.write(resp.content)
    shutil.move(tmp, path)
    return path


# huggingface_hub.constants names Diffusers 0.14 imports: hf_cache_home (the Hugging Face home folder) is gone
# from huggingface_hub 1.0, where HF_HOME is the same folder
_CONSTANTS = {"hf_cache_home": ("hf_cache_home", "HF_HOME"),
              "HUGGINGFACE_HUB_CACHE": ("HUGGINGFACE_HUB_CACHE", "HF_HUB_CACHE")}


def __getattr__(name: str) -> Any:
    if name in _CONSTANTS:
        for attr in _CONSTANTS[name]:
            if hasattr(_hub.constants, attr):
                return getattr(_hub.constants, attr)
    if name == "Repository":  # git-based Repository: gone from huggingface_hub 1.0
        repo = getattr(_hub, "Repository", None)
        if repo is not None:
            return repo

        class Repository:  # noqa: D401
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                raise ImportError(
                    f"huggingface_hub {_hub.__version__} no longer has the git-based Repository that "
                    "diffusers.hub_utils.init_git_repo uses; push with huggingface_hub.upload_folder instead."
                )

        return Repository
    raise AttributeError(name)
