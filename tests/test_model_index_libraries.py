"""Which libraries a model folder's model_index.json may name (patch 0005, safe_loading.import_library):
diffusers and transformers are imported; no other module is, so a folder cannot run code of its own through
it; from 0.27 a module this process imported itself is taken as it is (upstream's rule from 0.42.1)."""
import importlib
import importlib.util
import json
import sys

import pytest

import diffusers
from diffusers import DDIMScheduler, StableDiffusionPipeline
# 0.27+'s loader finds the base classes (SchedulerMixin, ...) in the component's own module: as in upstream's test
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: F401

from diffusers.flash import local_pipelines
from diffusers.flash.loading import safe_loading as sl


def _pipeline_folder(path):
    pipe = local_pipelines.stable_diffusion("tiny", seed=3)
    pipe.save_pretrained(path, safe_serialization=True)
    return pipe


@pytest.mark.parametrize("library", ["onnxruntime.training", "onnxruntime"])
def test_a_package_beside_the_model_folder_named_by_model_index_is_never_imported(tmp_path, monkeypatch, request,
                                                                                 library):
    """Issue 32 (5): upstream 0.42.1 imports ``onnxruntime.training`` itself (it is in its LOADABLE_CLASSES),
    so an ``onnxruntime/`` package placed beside the model folder ran when ``"unet": ["onnxruntime.training",
    "ORTModule"]``. Refused, and never imported, at every release the series reaches (no skip: this is the
    attack, whatever the patches)."""
    if importlib.util.find_spec("onnxruntime") is not None:
        pytest.skip("a real onnxruntime is installed: the planted package would not be the one found")
    folder = tmp_path / "model"
    _pipeline_folder(folder)
    marker = tmp_path / "pwned"
    package = tmp_path / "onnxruntime"
    (package / "training").mkdir(parents=True)
    for init in (package / "__init__.py", package / "training" / "__init__.py"):
        init.write_text(f"open({str(marker)!r}, 'w').close()\nclass ORTModule:\n    pass\n")
    index = json.loads((folder / "model_index.json").read_text())
    index["unet"] = [library, "ORTModule"]
    (folder / "model_index.json").write_text(json.dumps(index))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    def forget():  # the planted package, once imported (below, or by a loader that does), is not kept
        for name in [m for m in sys.modules if m == "onnxruntime" or m.startswith("onnxruntime.")]:
            del sys.modules[name]

    request.addfinalizer(forget)
    with pytest.raises(ValueError) as err:
        StableDiffusionPipeline.from_pretrained(folder)
    assert library in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert not marker.exists(), f"model_index.json made the pipeline import the planted {library} package"
    assert "onnxruntime" not in sys.modules
    __import__(library)  # the attack is real: importing that package does run its code
    assert marker.exists()


def _hooked(module: str) -> bool:
    try:
        loader = importlib.import_module(module)
    except ImportError:
        return False
    return hasattr(loader, "safe_loading") or hasattr(loader, "_flash_safe_loading")


# the hook: in pipeline_utils.py (0.4-0.11), pipelines/pipeline_utils.py (0.12-0.14), pipeline_loading_utils.py
# (0.40, 0.42.1)
needs_hook = pytest.mark.skipif(
    not any(map(_hooked, ("diffusers.pipeline_utils", "diffusers.pipelines.pipeline_utils",
                          "diffusers.pipelines.pipeline_loading_utils"))),
    reason=f"patch 0005 is not applied on diffusers {diffusers.__version__}: no variant serves this release")


@needs_hook
def test_model_index_naming_a_module_of_its_own_is_refused_and_never_imported(tmp_path, monkeypatch):
    """A folder whose model_index.json names a module it ships, importable because the folder's parent is
    on sys.path (python -c, the REPL, notebooks): refused with the entry and library named; nothing runs."""
    folder = tmp_path / "mymodel"
    _pipeline_folder(folder)
    marker = tmp_path / "pwned"
    hook = folder / "unet" / "hook.py"
    hook.write_text(f"open({str(marker)!r}, 'w').close()\nfrom diffusers import UNet2DConditionModel\n")
    for init in (folder / "__init__.py", folder / "unet" / "__init__.py"):
        init.write_text("")
    index = json.loads((folder / "model_index.json").read_text())
    index["unet"] = ["mymodel.unet.hook", "UNet2DConditionModel"]
    (folder / "model_index.json").write_text(json.dumps(index))
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError) as err:  # ours (UntrustedLibraryError), or 0.42.1's own for a name off its list
        StableDiffusionPipeline.from_pretrained(folder)
    message = str(err.value)
    assert "mymodel.unet.hook" in message, message
    if isinstance(err.value, sl.UntrustedLibraryError):
        assert "'unet'" in message and "refused" in message
    assert not marker.exists()
    __import__("mymodel.unet.hook")  # the attack is real: importing that module does run its code
    assert marker.exists()


@needs_hook
def test_import_library_allows_the_pipeline_libraries_and_imports_nothing_else():
    """Other names: refused on releases that load components only from LOADABLE_CLASSES' libraries (0.4-0.14);
    from 0.27 a module this process imported itself is taken as it is (upstream's rule from 0.42.1), and a
    module not imported yet is refused, never imported."""
    assert sl.import_library("diffusers", "unet").UNet2DConditionModel.__name__ == "UNet2DConditionModel"
    assert sl.import_library("transformers", "tokenizer").CLIPTokenizer.__name__ == "CLIPTokenizer"
    imported = ("os", "subprocess", "diffusers.utils")
    assert all(name in sys.modules for name in imported)
    never = "never_imported_mod_f7"
    for name in ("transformers.x", "", never):
        with pytest.raises(sl.UntrustedLibraryError, match="entry 'text_encoder'"):
            sl.import_library(name, "text_encoder")
    assert never not in sys.modules
    for name in imported:
        if sl.loader_takes_other_modules():
            assert sl.import_library(name, "text_encoder") is sys.modules[name]
        else:
            with pytest.raises(sl.UntrustedLibraryError, match="entry 'text_encoder'"):
                sl.import_library(name, "text_encoder")


class _OwnScheduler(DDIMScheduler):
    """A component class of the caller's own module (this test file), as upstream's CustomPipelineTests."""


@needs_hook
def test_a_component_of_the_callers_own_module_loads_back_where_the_release_can(tmp_path):
    """A folder whose model_index.json names a module this process imported itself (what save_pretrained
    records for a component of the caller's own module, 0.27+): loaded from that module on releases that can
    (0.27+), refused in one line on those that cannot."""
    folder = tmp_path / "own"
    local_pipelines.stable_diffusion("tiny", seed=3, scheduler="ddim").save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["scheduler"] = [__name__, "_OwnScheduler"]
    (folder / "model_index.json").write_text(json.dumps(index))
    assert sys.modules[__name__]._OwnScheduler is _OwnScheduler
    if not sl.loader_takes_other_modules():
        with pytest.raises(sl.UntrustedLibraryError, match=f"entry 'scheduler' names library '{__name__}'"):
            StableDiffusionPipeline.from_pretrained(folder)
        return
    loaded = StableDiffusionPipeline.from_pretrained(folder)
    assert type(loaded.scheduler) is _OwnScheduler
