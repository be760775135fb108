"""Safe weight loading (diffusers.flash.loading.safe_loading, patch 0005): safetensors first, no pickle code execution,
clear errors naming the file for unsafe, truncated, missing and mis-shaped weights. Tiny models built here."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import diffusers  # noqa: F401  (the version in the skip reason)
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DModel

try:  # 0.12 moved modeling_utils.py under models/
    from diffusers.models import modeling_utils
except ImportError:
    from diffusers import modeling_utils
if not hasattr(modeling_utils, "safe_loading"):
    pytest.skip(f"diffusers {diffusers.__version__} reads safetensors first and .bin weights-only itself: patch "
                "0005 hooks only its model_index.json libraries there (tests/test_model_index_libraries.py), not "
                "the model loading these tests exercise", allow_module_level=True)
from diffusers.flash import local_pipelines
from diffusers.flash.loading import safe_loading as sl
from diffusers import DiffusionPipeline

RELEASE = tuple(int(n) for n in diffusers.__version__.split("+")[0].split(".")[:3])


def _hook(function, name: str, through: tuple = (0, 7, 2)):
    """Skip a test on a release after ``through`` whose variant of patch 0005 does not call safe_loading.<name>
    in ``function`` (the hooks for issue 32's components and saves are in the texts for 0.4.0 to 0.7.2; there,
    a missing hook fails the test)."""
    import inspect

    return pytest.mark.skipif(RELEASE > through and f"safe_loading.{name}" not in inspect.getsource(function),
                              reason=f"patch 0005's variant for diffusers {diffusers.__version__} does not call "
                                     f"safe_loading.{name} in {function.__qualname__}")


checks_components = _hook(DiffusionPipeline.from_pretrained, "load_component")
checks_classes = _hook(DiffusionPipeline.from_pretrained, "load_method", through=(0, 4, 2))  # 0.5 checks itself
saves_into = _hook(DiffusionPipeline.save_pretrained, "save_into")
shapes_from_header = _hook(modeling_utils.ModelMixin.from_pretrained, "weight_shapes")

BIN, SAFE = sl.WEIGHTS_NAME, sl.SAFE_WEIGHTS_NAME
UNET = dict(block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=3, out_channels=3,
            norm_num_groups=4, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=4)


def _unet(seed):
    torch.manual_seed(seed)
    return UNet2DModel(**UNET).eval()


def _out(model):
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(x, 10).sample


def _files(folder):
    return sorted(f for f in os.listdir(folder) if f.startswith("diffusion_pytorch_model"))


def _bin_to_safetensors(src, dst):
    """Convert a .bin model folder to a safetensors-only one (config copied)."""
    os.makedirs(dst)
    shutil.copy(os.path.join(src, "config.json"), dst)
    save_file(torch.load(os.path.join(src, BIN), weights_only=True), os.path.join(dst, SAFE))


class _Payload:
    """Unpickling this creates the file ``path``: what a malicious .bin could do."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _evil_bin(folder, target):
    """A model folder whose .bin, if unpickled, creates ``target``."""
    _unet(0).save_pretrained(folder)
    state = torch.load(os.path.join(folder, BIN), weights_only=True)
    state["payload"] = _Payload(target)
    torch.save(state, os.path.join(folder, BIN))


# ---------------------------------------------------------------- preference and equality
def test_safetensors_only_folder_loads_with_the_outputs_of_the_bin_it_came_from(tmp_path):
    model = _unet(0)
    model.save_pretrained(tmp_path / "bin")
    _bin_to_safetensors(tmp_path / "bin", tmp_path / "safe")
    assert _files(tmp_path / "safe") == [SAFE]
    from_bin = UNet2DModel.from_pretrained(tmp_path / "bin")
    from_safe = UNet2DModel.from_pretrained(tmp_path / "safe")
    expected = _out(model)
    assert torch.equal(_out(from_bin), expected)
    assert torch.equal(_out(from_safe), expected)
    assert not torch.equal(_out(_unet(1)), expected)  # another seed differs: the comparison can fail


def test_folder_with_both_files_loads_the_safetensors_one(tmp_path):
    _unet(0).save_pretrained(tmp_path)  # .bin from seed 0
    other = _unet(1)
    save_file(other.state_dict(), str(tmp_path / SAFE))  # .safetensors from seed 1
    assert _files(tmp_path) == [BIN, SAFE]
    loaded = UNet2DModel.from_pretrained(tmp_path)
    assert torch.equal(_out(loaded), _out(other))
    assert not torch.equal(_out(loaded), _out(_unet(0)))


def test_safetensors_is_preferred_in_a_subfolder_and_an_evil_bin_beside_it_is_never_read(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    target = tmp_path / "pwned"
    _evil_bin(tmp_path / "unet", target)
    other = _unet(1)
    save_file(other.state_dict(), str(tmp_path / "unet" / SAFE))
    loaded = UNet2DModel.from_pretrained(tmp_path, subfolder="unet")
    assert torch.equal(_out(loaded), _out(other))
    assert not target.exists()


def test_local_weights_file_lookup_order(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / BIN).write_bytes(b"x")
    assert sl.local_weights_file(tmp_path, "sub") == str(tmp_path / "sub" / BIN)
    (tmp_path / "sub" / SAFE).write_bytes(b"x")
    assert sl.local_weights_file(tmp_path, "sub") == str(tmp_path / "sub" / SAFE)
    (tmp_path / BIN).write_bytes(b"x")  # upstream's order: the folder itself before its subfolder
    assert sl.local_weights_file(tmp_path, "sub") == str(tmp_path / BIN)


# ---------------------------------------------------------------- no code execution
def test_pickle_that_would_run_code_is_refused_and_never_runs(tmp_path, monkeypatch):
    proof = tmp_path / "proof"
    torch.save({"x": _Payload(proof)}, tmp_path / "proof.bin")
    torch.load(tmp_path / "proof.bin", weights_only=False)
    assert proof.exists()  # the payload is real: a plain torch.load runs it

    # torch >= 2.6 would default to weights_only=False under this variable if we did not pass it ourselves
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    target = tmp_path / "pwned"
    _evil_bin(tmp_path / "model", target)
    with pytest.raises(sl.UnsafeCheckpointError) as err:
        UNet2DModel.from_pretrained(tmp_path / "model")
    message = str(err.value)
    assert str(tmp_path / "model" / BIN) in message
    assert "refused to unpickle" in message and "open" in message and "arbitrary code" in message
    assert not target.exists()
    with pytest.raises(sl.UnsafeCheckpointError):  # the module-level upstream function is safe too
        modeling_utils.load_state_dict(tmp_path / "model" / BIN)
    assert not target.exists()


# ---------------------------------------------------------------- clear errors
@pytest.mark.parametrize("safe", [False, True], ids=["bin", "safetensors"])
def test_truncated_file_names_the_file(tmp_path, safe):
    _unet(0).save_pretrained(tmp_path, safe_serialization=safe)
    path = tmp_path / (SAFE if safe else BIN)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(sl.CorruptCheckpointError) as err:
        UNet2DModel.from_pretrained(tmp_path)
    assert str(path) in str(err.value) and "truncated or corrupted" in str(err.value)
    assert err.value.__cause__ is None and err.value.__suppress_context__  # no deep torch trace attached


@pytest.mark.parametrize("content,words", [(b"", "empty"),
                                           (b"version https://git-lfs.github.com/spec/v1\noid sha256:0\n", "git-lfs"),
                                           (b"plain text, not a checkpoint", "truncated or corrupted")])
def test_empty_pointer_and_garbage_files_name_the_file(tmp_path, content, words):
    (tmp_path / BIN).write_bytes(content)
    with pytest.raises(sl.CorruptCheckpointError) as err:
        sl.load_state_dict(tmp_path / BIN)
    assert str(tmp_path / BIN) in str(err.value) and words in str(err.value)


def test_non_state_dict_pickle_names_the_file(tmp_path):
    torch.save({"state_dict": {"w": torch.ones(2)}, "epoch": 3}, tmp_path / BIN)
    with pytest.raises(sl.CorruptCheckpointError) as err:
        sl.load_state_dict(tmp_path / BIN)
    assert str(tmp_path / BIN) in str(err.value) and "'state_dict'" in str(err.value)


def test_missing_weights_file_names_the_folder_and_both_names(tmp_path):
    _unet(0).save_config(tmp_path)
    with pytest.raises(sl.MissingWeightsError) as err:
        UNet2DModel.from_pretrained(tmp_path)
    message = str(err.value)
    assert str(tmp_path) in message and SAFE in message and BIN in message
    assert message.startswith(f"Error no file named {BIN} found in directory {tmp_path}")  # upstream's wording
    assert isinstance(err.value, FileNotFoundError)


@pytest.mark.parametrize("safe", [False, True], ids=["bin", "safetensors"])
def test_weights_that_do_not_fit_the_config_name_the_file_and_the_weight(tmp_path, safe):
    _unet(0).save_pretrained(tmp_path, safe_serialization=safe)
    config = json.loads((tmp_path / "config.json").read_text())
    config["block_out_channels"] = [8, 24]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(sl.ShapeMismatchError) as err:
        UNet2DModel.from_pretrained(tmp_path)
    message = str(err.value)
    assert str(tmp_path / (SAFE if safe else BIN)) in message
    assert "in the file" in message and "in the model" in message and "ignore_mismatched_sizes" in message
    assert "(16,)" in message and "(24,)" in message  # a bias of 16 in the file against 24 in the config
    # upstream's escape hatch, which it serves on the plain load only (from 0.7 the default load is
    # low_cpu_mem_usage, through accelerate, which refuses any weight of another shape)
    plain = {"low_cpu_mem_usage": False} if hasattr(modeling_utils, "_LOW_CPU_MEM_USAGE_DEFAULT") else {}
    model = UNet2DModel.from_pretrained(tmp_path, ignore_mismatched_sizes=True, **plain)
    assert model.config.block_out_channels == [8, 24]


def test_device_map_auto_path_is_checked_the_same_way(tmp_path, monkeypatch):
    pytest.importorskip("accelerate")
    model = _unet(0)
    model.save_pretrained(tmp_path / "ok", safe_serialization=True)
    assert torch.equal(_out(UNet2DModel.from_pretrained(tmp_path / "ok", device_map="auto")), _out(model))

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    target = tmp_path / "pwned"
    _evil_bin(tmp_path / "evil", target)
    with pytest.raises(sl.UnsafeCheckpointError, match="refused to unpickle"):  # before accelerate reads it
        UNet2DModel.from_pretrained(tmp_path / "evil", device_map="auto")
    assert not target.exists()

    config = json.loads((tmp_path / "ok" / "config.json").read_text())
    (tmp_path / "ok" / "config.json").write_text(json.dumps({**config, "block_out_channels": [8, 24]}))
    with pytest.raises(sl.ShapeMismatchError, match=str(tmp_path / "ok" / SAFE)):
        UNet2DModel.from_pretrained(tmp_path / "ok", device_map="auto")


# ---------------------------------------------------------------- saving
def test_safe_serialization_round_trips_and_replaces_the_bin(tmp_path):
    model = _unet(0)
    model.save_pretrained(tmp_path)
    assert _files(tmp_path) == [BIN]
    model.save_pretrained(tmp_path, safe_serialization=True)
    assert _files(tmp_path) == [SAFE]  # the old .bin is gone: it cannot shadow or go stale
    assert load_file(str(tmp_path / SAFE)).keys() == model.state_dict().keys()
    assert torch.equal(_out(UNet2DModel.from_pretrained(tmp_path)), _out(model))

    vae = AutoencoderKL(block_out_channels=[8], norm_num_groups=4, latent_channels=2).eval()
    vae.save_pretrained(tmp_path / "vae", safe_serialization=True)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        expected = vae(x, sample_posterior=False).sample
        got = AutoencoderKL.from_pretrained(tmp_path / "vae")(x, sample_posterior=False).sample
    assert _files(tmp_path / "vae") == [SAFE] and torch.equal(got, expected)


def test_tiny_pipeline_saved_with_safetensors_loads_through_from_pretrained(tmp_path):
    pipe = local_pipelines.stable_diffusion("tiny", seed=3)
    pipe.save_pretrained(tmp_path, safe_serialization=True)
    for part in ("unet", "vae"):
        assert _files(tmp_path / part) == [SAFE]
    assert not list(tmp_path.rglob("*.bin"))  # the transformers models wrote safetensors as well
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path)
    for part in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(pipe, part).state_dict(), getattr(loaded, part).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)

    def run(p):
        p.set_progress_bar_config(disable=True)
        g = torch.Generator().manual_seed(0)
        return p("a red bicycle", num_inference_steps=2, height=64, width=64, generator=g, output_type="np").images

    expected = run(pipe)
    assert np.isfinite(expected).all() and expected.std() > 0
    np.testing.assert_array_equal(run(loaded), expected)


# ---------------------------------------------------------------- the Hub download path (offline cache)
def _hub_cache(cache, repo, files):
    """A huggingface_hub cache holding ``files`` ({relative path: source file}) for ``repo`` at main."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    for rel, src in files.items():
        dst = root / "snapshots" / commit / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dst)


def test_hub_path_prefers_safetensors_and_falls_back_to_bin(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    a, b = _unet(0), _unet(1)
    a.save_pretrained(tmp_path / "a")
    b.save_pretrained(tmp_path / "b", safe_serialization=True)
    cache = tmp_path / "cache"
    config = tmp_path / "a" / "config.json"
    _hub_cache(cache, "org/both", {"unet/config.json": config, f"unet/{BIN}": tmp_path / "a" / BIN,
                                   f"unet/{SAFE}": tmp_path / "b" / SAFE})
    _hub_cache(cache, "org/old", {"unet/config.json": config, f"unet/{BIN}": tmp_path / "a" / BIN})
    kw = dict(subfolder="unet", cache_dir=str(cache), local_files_only=True)
    assert torch.equal(_out(UNet2DModel.from_pretrained("org/both", **kw)), _out(b))
    assert torch.equal(_out(UNet2DModel.from_pretrained("org/old", **kw)), _out(a))


def test_hub_path_asks_for_safetensors_first_and_for_bin_only_on_entry_not_found(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.utils import EntryNotFoundError

    _unet(0).save_pretrained(tmp_path)
    asked = []

    def fake_download(repo_id, filename=None, **kwargs):
        asked.append(filename)
        if filename == SAFE:
            raise EntryNotFoundError(f"{repo_id} has no {filename}")
        return str(tmp_path / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    assert sl.hub_weights_file("org/old", subfolder="unet") == str(tmp_path / BIN)
    assert asked == [SAFE, BIN]

    def no_connection(repo_id, filename=None, **kwargs):
        asked.append(filename)
        raise ValueError("cannot reach the Hub")  # what upstream's except clause reads as "couldn't connect"

    asked.clear()
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_connection)
    with pytest.raises(ValueError):  # any other error is not a reason to try the .bin
        sl.hub_weights_file("org/none")
    assert asked == [SAFE]


@pytest.mark.parametrize("keep", [0.0, 0.5], ids=["none", "half"])
@pytest.mark.parametrize("safe", [False, True], ids=["bin", "safetensors"])
def test_weights_file_missing_some_of_the_models_weights_is_an_error(tmp_path, keep, safe):
    model = _unet(0)
    state = model.state_dict()
    kept = dict(list(state.items())[: int(len(state) * keep)])
    model.save_config(tmp_path)
    if safe:
        save_file({k: v.contiguous() for k, v in kept.items()} or {"unrelated": torch.zeros(1)}, str(tmp_path / SAFE))
    else:
        torch.save(kept, tmp_path / BIN)
    with pytest.raises(sl.IncompleteWeightsError) as err:
        UNet2DModel.from_pretrained(tmp_path)
    message = str(err.value)
    missing = [k for k in state if k not in kept]
    assert str(tmp_path / (SAFE if safe else BIN)) in message
    assert f"{len(missing)} of the {len(state)} weights" in message and missing[0] in message
    assert "ignore_mismatched_sizes=True" in message
    # asked for explicitly: loads, with the weights the file has (on the plain load, as above: from 0.7 the
    # default load is accelerate's low_cpu_mem_usage one, which leaves missing weights on the meta device)
    plain = {"low_cpu_mem_usage": False} if hasattr(modeling_utils, "_LOW_CPU_MEM_USAGE_DEFAULT") else {}
    if not kept and hasattr(modeling_utils, "SAFETENSORS_WEIGHTS_NAME"):
        return  # from 0.10 upstream's plain load takes the model's dtype from the file's weights: none here
    loaded = UNet2DModel.from_pretrained(tmp_path, ignore_mismatched_sizes=True, **plain)
    for k, v in kept.items():
        assert torch.equal(loaded.state_dict()[k], v)


def test_weights_file_with_unexpected_weights_is_an_error(tmp_path):
    model = _unet(0)
    model.save_pretrained(tmp_path, safe_serialization=True)
    state = load_file(str(tmp_path / SAFE))
    state["extra.weight"] = torch.zeros(3)
    save_file(state, str(tmp_path / SAFE))
    with pytest.raises(sl.IncompleteWeightsError, match=r"1 weight\(s\) the model does not have.*extra\.weight"):
        UNet2DModel.from_pretrained(tmp_path)


@pytest.mark.parametrize("safe", [False, True], ids=["bin", "safetensors"])
def test_a_crash_while_saving_keeps_the_old_weights(tmp_path, monkeypatch, safe):
    old = _unet(0)
    old.save_pretrained(tmp_path, safe_serialization=safe)
    before = sorted(os.listdir(tmp_path))

    def crash(*args, **kwargs):
        path = args[1] if len(args) > 1 else kwargs.get("filename", args[-1])
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt("killed mid-write")

    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        _unet(1).save_pretrained(tmp_path, save_function=crash, safe_serialization=safe)
    assert sorted(os.listdir(tmp_path)) == before  # no temporary file left, the old one untouched
    assert torch.equal(_out(UNet2DModel.from_pretrained(tmp_path)), _out(old))


def test_saving_replaces_the_file_by_rename_and_then_removes_the_other_format(tmp_path, monkeypatch):
    model = _unet(0)
    model.save_pretrained(tmp_path)  # .bin
    seen = []
    real_replace = os.replace

    def replace(src, dst):
        seen.append((os.path.relpath(src, tmp_path), os.path.basename(dst), sorted(os.listdir(tmp_path))))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    model.save_pretrained(tmp_path, safe_serialization=True)
    (src, dst, listing), = [s for s in seen if s[1] == SAFE]  # config.json is renamed into place as well
    assert dst == SAFE and src.startswith(".") and BIN in listing  # from a temporary; the .bin still there
    assert _files(tmp_path) == [SAFE]


def test_bfloat16_pipeline_returns_images():
    """numpy has no bfloat16: the pipeline's output step goes through float32 (patch 0010)."""
    pipe = local_pipelines.stable_diffusion("tiny", seed=3)
    for part in ("unet", "vae", "text_encoder", "safety_checker"):
        if getattr(pipe, part, None) is not None:
            getattr(pipe, part).to(torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    images = pipe("a red bicycle", num_inference_steps=2, height=64, width=64,
                  generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.dtype == np.float32 and images.shape[0] == 1 and images.shape[-1] == 3
    assert np.isfinite(images).all() and images.std() > 0


# ---------------------------------------------------------------- every component's weights (transformers too)
@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved") / "pipe"
    local_pipelines.stable_diffusion("tiny", seed=3).save_pretrained(folder, safe_serialization=True)
    return folder


def _damage(path, fault):
    """Damage a transformers weights file as issue 32 did: a 0-byte file, one with no tensors, cut in half,
    half of its weights, an extra weight; the same as a ``.bin`` (``bin-*``)."""
    state = load_file(str(path))
    if fault.startswith("bin-"):
        os.remove(path)
        path = path.with_name("pytorch_model.bin")
        fault = fault[4:]
        write = torch.save
    else:
        def write(tensors, target):
            save_file(tensors, str(target), metadata={"format": "pt"})
    if fault == "zero-bytes":
        path.write_bytes(b"")
    elif fault == "no-tensors":
        write({}, path)
    elif fault == "truncated":
        write(state, path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif fault == "half":
        write(dict(list(state.items())[: len(state) // 2]), path)
    elif fault == "extra":
        write({**state, "extra.weight": torch.zeros(3)}, path)
    elif fault == "shape":
        key = next(k for k in state if k.endswith("fc1.weight"))
        write({**state, key: torch.zeros(3, 3)}, path)
    return path


@checks_components
@pytest.mark.parametrize("fault", ["zero-bytes", "no-tensors", "truncated", "half", "extra", "shape", "bin-half",
                                   "bin-truncated", "bin-extra"])
@pytest.mark.parametrize("part", ["text_encoder", "safety_checker"])
def test_a_transformers_component_whose_weights_do_not_fit_is_refused_naming_the_file(saved_pipeline, tmp_path,
                                                                                     part, fault):
    """Issue 32 (2): transformers would load these with random weights and a note (or a deep traceback): the
    pipeline refuses each in one line naming the file, as it does for the UNet and the VAE."""
    folder = tmp_path / "pipe"
    shutil.copytree(saved_pipeline, folder)
    path = _damage(folder / part / "model.safetensors", fault)
    with pytest.raises(sl.CheckpointError) as err:
        StableDiffusionPipeline.from_pretrained(folder)
    message = str(err.value)
    assert str(path) in message and "\n" not in message, message
    expected = {"zero-bytes": "empty", "truncated": "truncated or corrupted", "shape": "do not fit"}.get(
        fault.replace("bin-", ""), "are missing" if fault.endswith(("no-tensors", "half")) else "does not have")
    assert expected in message, message
    if fault.endswith(("half", "extra", "shape", "no-tensors")):
        assert f"pass it as {part}=" in message  # the way to load it anyway


def test_a_damaged_transformers_component_loads_when_the_caller_passes_it(saved_pipeline, tmp_path):
    """The escape: load the component yourself (transformers leaves missing weights newly initialized) and
    pass it; and an undamaged pipeline loads each component's weights as saved."""
    from transformers import CLIPTextModel

    folder = tmp_path / "pipe"
    shutil.copytree(saved_pipeline, folder)
    intact = StableDiffusionPipeline.from_pretrained(folder)
    saved = load_file(str(folder / "text_encoder" / "model.safetensors"))
    assert all(torch.equal(intact.text_encoder.state_dict()[k], v) for k, v in saved.items())
    _damage(folder / "text_encoder" / "model.safetensors", "half")
    encoder = CLIPTextModel.from_pretrained(folder / "text_encoder")
    pipe = StableDiffusionPipeline.from_pretrained(folder, text_encoder=encoder)
    assert pipe.text_encoder is encoder


@checks_components
def test_an_unsafe_pickle_in_a_transformers_component_is_refused_and_never_runs(saved_pipeline, tmp_path,
                                                                                monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    folder = tmp_path / "pipe"
    shutil.copytree(saved_pipeline, folder)
    st = folder / "text_encoder" / "model.safetensors"
    target = tmp_path / "pwned"
    torch.save({**load_file(str(st)), "payload": _Payload(target)}, st.with_name("pytorch_model.bin"))
    os.remove(st)
    with pytest.raises(sl.UnsafeCheckpointError, match="refused to unpickle"):
        StableDiffusionPipeline.from_pretrained(folder)
    assert not target.exists()


# ---------------------------------------------------------------- model_index.json entries that cannot load
@checks_classes
@pytest.mark.parametrize("entry,words", [(["transformers", "AutoModel"], "not a class a pipeline loads"),
                                         (["diffusers", "OnnxRuntimeModel"], "onnxruntime"),
                                         (["transformers", "NoSuchClass"], "does not have")])
def test_a_model_index_entry_that_cannot_load_is_one_line(saved_pipeline, tmp_path, entry, words):
    """Issue 32 (12): these gave a TypeError, NameError or AttributeError from deep inside loading."""
    if entry[1] == "OnnxRuntimeModel" and diffusers.utils.is_onnx_available():
        pytest.skip("onnxruntime is installed: OnnxRuntimeModel is a class a pipeline loads")
    folder = tmp_path / "pipe"
    shutil.copytree(saved_pipeline, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["unet"] = entry
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError) as err:
        StableDiffusionPipeline.from_pretrained(folder)
    message = str(err.value)
    assert "'unet'" in message and entry[1] in message and words in message and "\n" not in message, message


# ---------------------------------------------------------------- the device_map path reads each tensor once
@shapes_from_header
@pytest.mark.parametrize("safe", [False, True], ids=["bin", "safetensors"])
def test_device_map_path_checks_shapes_without_reading_the_tensors(tmp_path, monkeypatch, safe):
    """Issue 34: the check before accelerate's load takes names and shapes from the safetensors header (a
    ``.bin`` is mapped, not read); the tensors are read once, by accelerate."""
    pytest.importorskip("accelerate")
    import accelerate.utils.modeling as acc
    import safetensors.torch

    model = _unet(0)
    model.save_pretrained(tmp_path, safe_serialization=safe)
    reads = []

    def counted(real, label):
        def read(*args, **kwargs):
            if not kwargs.get("mmap"):
                reads.append(label)
            return real(*args, **kwargs)
        return read

    monkeypatch.setattr(safetensors.torch, "load_file", counted(safetensors.torch.load_file, "load_file"))
    monkeypatch.setattr(acc, "safe_load_file", counted(acc.safe_load_file, "load_file"))
    monkeypatch.setattr(torch, "load", counted(torch.load, "torch.load"))
    loaded = UNet2DModel.from_pretrained(tmp_path, device_map="auto")
    assert reads == ["load_file" if safe else "torch.load"], reads
    assert torch.equal(_out(loaded), _out(model))


# ---------------------------------------------------------------- temporary names
def test_a_link_planted_at_a_temporary_name_is_never_written(tmp_path):
    """Issue 32 (7): the temporary name was ``.diffusion_pytorch_model.bin.<pid>.tmp``: a link planted there
    made the save overwrite its target, and the link became the weights file."""
    folder = tmp_path / "model"
    folder.mkdir()
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    for name in (BIN, SAFE):
        os.symlink(victim, folder / f".{name}.{os.getpid()}.tmp")
    _unet(0).save_pretrained(folder)
    _unet(1).save_pretrained(folder, safe_serialization=True)
    assert victim.read_bytes() == b"precious"
    assert not os.path.islink(folder / SAFE) and torch.equal(_out(UNet2DModel.from_pretrained(folder)),
                                                               _out(_unet(1)))


def test_temporary_names_are_unpredictable_exclusive_and_cleaned(tmp_path, monkeypatch):
    """The weights are written in a new private folder (an unpredictable name, mode 0700) and renamed from
    there; nothing is left behind, and the file has the mode a plain write gives it."""
    folders, real = [], os.replace

    def replace(src, dst):
        if os.path.basename(dst) == SAFE:
            folders.append((os.path.basename(os.path.dirname(src)), os.stat(os.path.dirname(src)).st_mode & 0o777))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    for _ in range(2):
        _unet(0).save_pretrained(tmp_path, safe_serialization=True)
    (first, mode), (second, _) = folders
    assert first != second and first.startswith(f".{SAFE}.pid{os.getpid()}.") and mode == 0o700
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    assert (os.stat(tmp_path / SAFE).st_mode & 0o777) == 0o666 & ~_umask()  # as a plain write makes it


def _umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------- kills during save_pretrained
def _snapshot(folder):
    """{relative path: bytes} of every file but temporaries (dot-names ending in .tmp, and inside them)."""
    out = {}
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not (d.startswith(".") and d.endswith(".tmp"))]
        for name in files:
            if not (name.startswith(".") and name.endswith(".tmp")):
                path = os.path.join(root, name)
                with open(path, "rb") as f:
                    out[os.path.relpath(path, folder)] = f.read()
    return out


def _temporaries(folder):
    return [os.path.join(r, n) for r, ds, fs in os.walk(folder) for n in ds + fs if n.endswith(".tmp")]


def _save_in_child(pipe, folder, kill_at_open=None, kill_after=None):
    """Fork a child that saves ``pipe`` into ``folder``; it is killed (SIGKILL) ``kill_after`` seconds in, or
    kills itself inside its ``kill_at_open``-th open() for writing, just after the file is opened (a plain
    open truncates it there). Returns the child's number of opens for writing when it ran to the end."""
    import builtins
    import signal
    import time

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.close(read_end)
            import threading

            from tqdm.std import tqdm

            # tqdm's lock is shared with the parent across fork (a multiprocessing semaphore): a child killed
            # while it holds it would block the parent's next progress bar for ever; the child takes its own
            lock, classes = threading.RLock(), [tqdm]
            while classes:
                cls = classes.pop()
                cls.set_lock(lock)
                classes += cls.__subclasses__()
            opened = [0]
            real_open = builtins.open

            def open_(file, mode="r", *args, **kwargs):
                f = real_open(file, mode, *args, **kwargs)
                if any(c in mode for c in "wax"):
                    opened[0] += 1
                    if opened[0] == kill_at_open:
                        os.kill(os.getpid(), signal.SIGKILL)
                return f

            builtins.open = open_
            pipe.save_pretrained(folder, safe_serialization=True)
            os.write(write_end, str(opened[0]).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    if kill_after is not None:
        time.sleep(kill_after)
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(read_end, "rb") as f:
        told = f.read()
    return int(told) if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 and told else None


@pytest.fixture(scope="module")
def two_saves(tmp_path_factory):
    """The old and the new pipeline, and each one's saved files."""
    root = tmp_path_factory.mktemp("kills")
    old, new = (local_pipelines.stable_diffusion("tiny", seed=s) for s in (1, 2))
    old.save_pretrained(root / "old", safe_serialization=True)
    new.save_pretrained(root / "new", safe_serialization=True)
    return root, new, _snapshot(root / "old"), _snapshot(root / "new")


def _check_old_or_new(folder, old, new):
    now = _snapshot(folder)
    for rel, data in now.items():
        assert data in (old.get(rel), new.get(rel)), f"{rel}: {len(data)} bytes, neither the old file nor the new"
    assert set(old) <= set(now), f"files lost: {sorted(set(old) - set(now))}"


@saves_into
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork to kill a save midway")
def test_a_kill_at_every_file_opened_during_save_pretrained_leaves_each_file_old_or_new(two_saves):
    """Issue 32 (10): a kill during save_pretrained left scheduler_config.json, tokenizer.json and config.json
    at 0 bytes. Killed inside each open() for writing of a save over an older one (where a plain write has
    just truncated the file), every file is its old version or its new one; the next save removes what the
    killed one left and writes the new files."""
    root, new_pipe, old, new = two_saves
    assert old != new and all(old.values())
    folder = root / "work"
    shutil.copytree(root / "old", folder)
    opens = _save_in_child(new_pipe, folder)
    assert opens and _snapshot(folder) == new  # a full save in a child writes the new files
    for k in range(1, opens + 1):
        shutil.rmtree(folder)
        shutil.copytree(root / "old", folder)
        assert _save_in_child(new_pipe, folder, kill_at_open=k) is None
        _check_old_or_new(folder, old, new)
    assert _temporaries(folder)  # the last kill left its temporaries...
    new_pipe.save_pretrained(folder, safe_serialization=True)
    assert not _temporaries(folder) and _snapshot(folder) == new  # ...which the next save removes


@saves_into
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork to kill a save midway")
def test_random_kills_during_save_pretrained_leave_each_file_old_or_new(two_saves):
    """Issue 32 (10), as the issue ran it: SIGKILL at random moments of a save over an older one."""
    import random
    import time

    root, new_pipe, old, new = two_saves
    folder = root / "random"
    shutil.copytree(root / "old", folder)
    start = time.perf_counter()
    assert _save_in_child(new_pipe, folder) is not None
    duration = time.perf_counter() - start
    rng = random.Random(32)
    for _ in range(40):
        shutil.rmtree(folder)
        shutil.copytree(root / "old", folder)
        _save_in_child(new_pipe, folder, kill_after=rng.uniform(0, duration))
        _check_old_or_new(folder, old, new)
    new_pipe.save_pretrained(folder, safe_serialization=True)
    assert not _temporaries(folder) and _snapshot(folder) == new
