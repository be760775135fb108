"""The fork itself: materialize / refresh / verify on a scratch copy of this repository, and the
compatibility patches on today's huggingface_hub and transformers."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from forklib import release, tree

ROOT = Path(__file__).resolve().parent.parent


PIN = release.load_pin(ROOT)


@pytest.fixture(scope="session")
def release_file(tmp_path_factory):
    """The pinned release file, from this checkout's cache or fetched (checked against the pin)."""
    cache = tmp_path_factory.mktemp("cache")
    mine = release.cache_dir(ROOT) / PIN["file"]
    if mine.exists():
        shutil.copy(mine, cache / PIN["file"])
    os.environ["DIFFUSERS_FLASH_CACHE"] = str(cache)
    return release.fetch(ROOT, PIN["version"], PIN["file"], PIN["sha256"])


@pytest.fixture
def fork(tmp_path, release_file):
    """A scratch copy of the repository's own files (no laid-down upstream), git-tracked, materialized."""
    dst = tmp_path / "fork"
    for rel in ("upstream.json", "PATCHES.md", "patches", "scripts"):
        src = ROOT / rel
        shutil.copytree(src, dst / rel) if src.is_dir() else (dst.mkdir(exist_ok=True), shutil.copy(src, dst / rel))
    files = subprocess.run(["git", "-C", str(ROOT), "ls-files", "src/diffusers"], capture_output=True, text=True).stdout
    for rel in files.split():
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, dst / rel)
    subprocess.run(["git", "init", "-q", str(dst)], check=True)
    subprocess.run(["git", "-C", str(dst), "add", "-A"], check=True)
    tree.materialize(dst, log=lambda m: None)
    return dst


def fork_py(root, *args):
    return subprocess.run([sys.executable, str(root / "scripts" / "fork.py"), *args], capture_output=True, text=True,
                          env=dict(os.environ))


def test_materialize_then_verify_ok_and_idempotent(fork):
    res = fork_py(fork, "verify")
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"upstream diffusers {PIN['version']}" in res.stdout
    laid = [p for p in (fork / "src").rglob("*") if p.is_file()]
    for p in laid:
        os.utime(p, ns=(10**9, 10**9))  # long ago: any rewrite shows
    stats = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in laid}
    again = fork_py(fork, "materialize")
    assert again.returncode == 0 and "(0 file(s) written)" in again.stdout
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in laid} == stats  # nothing rewritten (a read-only src/)
    status = subprocess.run(["git", "-C", str(fork), "status", "--porcelain"], capture_output=True, text=True).stdout
    assert [ln for ln in status.splitlines() if not ln.startswith("A ")] == []  # laid-down files are all ignored


def test_hand_edit_is_caught_and_kept_from_materialize(fork):
    target = fork / "src/diffusers/schedulers/scheduling_ddim.py"
    target.write_text(target.read_text() + "# hand edit\n")
    res = fork_py(fork, "verify")
    assert res.returncode == 1 and "scheduling_ddim.py: differs from pristine + series" in res.stdout
    res = fork_py(fork, "materialize")
    assert res.returncode == 2 and "scheduling_ddim.py" in res.stderr and "--force" in res.stderr
    assert target.read_text().endswith("# hand edit\n")
    assert fork_py(fork, "materialize", "--force").returncode == 0
    assert fork_py(fork, "verify").returncode == 0


def active_patches(root):
    """(name, Patch) of the series applied on the pin (not those upstream has by then)."""
    from forklib import variants

    return variants.active(tree.load_patches(root), release.load_pin(root)["version"])


def added_line(patch, path=None):
    """(file, an added line of ``patch``, without its newline): where an edit belongs to that patch, whatever
    release the series is on."""
    for fp in patch.files:
        for h in fp.hunks:
            for tag, text in h.lines:
                if tag == "+" and text.strip() and fp.new_path and (path is None or fp.new_path == path):
                    return fp.new_path, text.rstrip("\n")
    raise AssertionError("the patch adds no line")


def test_refresh_turns_an_edit_into_a_patch_and_is_stable(fork):
    active = active_patches(fork)
    assert "0004-attention-dispatch.patch" in dict(active), "0004 is applied on every release the series serves"
    rel, line = added_line(dict(active)["0004-attention-dispatch.patch"])  # one of 0004's own lines
    # refresh gives a file's edit to the last patch touching the file: 0004, or a later one (on 0.4.2 0006
    # touches commands/env.py after it)
    name = [n for n, p in active if rel in {fp.path for fp in p.files}][-1]
    target = fork / rel
    text = target.read_text()
    assert line + "\n" in text
    target.write_text(text.replace(line + "\n", line + "  # edited\n", 1))
    before = (fork / "patches" / name).read_text()
    assert fork_py(fork, "refresh").returncode == 0
    after = (fork / "patches" / name).read_text()
    assert after != before and f"+{line}  # edited" in after
    assert fork_py(fork, "verify").returncode == 0
    snapshot = {p.name: p.read_text() for p in (fork / "patches").rglob("*") if p.is_file()}
    res = fork_py(fork, "refresh")
    assert "nothing changed" in res.stdout
    assert snapshot == {p.name: p.read_text() for p in (fork / "patches").rglob("*") if p.is_file()}


def test_refresh_refuses_an_edit_no_patch_owns_without_a_name(fork):
    target = fork / "src/diffusers/training_utils.py"
    target.write_text(target.read_text() + "# new\n")
    res = fork_py(fork, "refresh")
    assert res.returncode == 2 and "training_utils.py" in res.stderr and "--patch" in res.stderr
    res = fork_py(fork, "refresh", "--patch", "0099-training-note.patch")
    assert res.returncode == 0
    assert (fork / "patches/series").read_text().splitlines()[-1] == "0099-training-note.patch"
    assert "0099-training-note.patch" in (fork / "PATCHES.md").read_text()
    assert fork_py(fork, "verify").returncode == 0


def test_refresh_can_put_an_edit_into_an_earlier_patch(fork):
    # a file two applied patches touch (on 0.4.2 modeling_utils.py: 0001 hub, 0004 attention, 0005 loading);
    # where none is (0.40+: 0003, 0004 and 0009 touch different files), a file of the first applied patch
    active = active_patches(fork)
    assert len(active) >= 2, "fewer than two patches applied: no earlier patch to choose"
    pairs = [(e, fp.new_path) for k, (e, ep) in enumerate(active) for _, lp in active[k + 1:]
             for fp in ep.files if fp.old_path and fp.new_path and fp.new_path in {f.new_path for f in lp.files}]
    earlier, rel = (pairs or [(active[0][0], next(f.new_path for f in active[0][1].files if f.old_path))])[0]
    target = fork / rel
    text = target.read_text()
    mark = f"# an edit that belongs to {earlier[:4]}\n"
    target.write_text(mark + text)  # the top of the file: away from the later patch's hunks
    res = fork_py(fork, "refresh", "--patch", earlier)
    assert res.returncode == 0, res.stderr
    assert "+" + mark in (fork / "patches" / earlier).read_text()
    for name, _ in active:
        if name != earlier:
            assert "an edit that belongs" not in (fork / "patches" / name).read_text(), name
    assert fork_py(fork, "verify").returncode == 0
    assert target.read_text().count(mark) == 1


@pytest.mark.parametrize("damage", ["corrupt", "missing", "unlisted", "offset"])
def test_verify_names_a_bad_patch(fork, damage):
    patch = fork / "patches/0003-fork-version.patch"
    if damage == "corrupt":  # its first context line, whichever release the series is on
        text = patch.read_text()
        m = re.search(r"^ (\S.*)$", text[text.index("\n@@ "):], re.M)
        assert m, "0003's first hunk has a context line"
        patch.write_text(text.replace(m.group(0), m.group(0) + "  # not upstream's", 1))
        expect = "0003-fork-version.patch: src/diffusers/__init__.py: hunk 1"
    elif damage == "missing":
        patch.unlink()
        expect = "patches/series lists 0003-fork-version.patch but"
    elif damage == "unlisted":
        shutil.copy(patch, fork / "patches/0042-stray.patch")
        expect = "patch file 0042-stray.patch is not listed in patches/series"
    else:
        # move its first hunk 4 lines up, whichever line the release has it at
        text = patch.read_text()
        m = re.search(r"^@@ -(\d+),(\d+) \+(\d+),(\d+) @@", text, re.M)
        a, b, c, d = (int(n) for n in m.groups())
        patch.write_text(text.replace(m.group(0), f"@@ -{a - 4},{b} +{c - 4},{d} @@", 1))
        expect = "applies at offset +4"
    res = fork_py(fork, "verify")
    assert res.returncode != 0
    assert expect in res.stdout + res.stderr


def test_release_file_hash_mismatch_is_refused(fork, tmp_path, release_file):
    bad = tmp_path / "badcache"
    bad.mkdir()
    data = bytearray(Path(release_file).read_bytes())
    data[-100] ^= 0xFF
    (bad / PIN["file"]).write_bytes(bytes(data))
    env = dict(os.environ, DIFFUSERS_FLASH_CACHE=str(bad))
    res = subprocess.run([sys.executable, str(fork / "scripts/fork.py"), "verify"], capture_output=True, text=True,
                         env=env)
    assert res.returncode == 2
    assert PIN["file"] in res.stderr and f"expected sha256 {PIN['sha256']}" in res.stderr and "got " in res.stderr


def test_verify_checks_the_generated_version_module(fork):
    version = fork / "src/diffusers/_fork_version.py"  # imported by diffusers/__init__.py (0003)
    version.write_text(version.read_text() + "import os\nos.environ['FORK_PWNED'] = '1'  # runs on import diffusers\n")
    res = fork_py(fork, "verify")
    assert res.returncode == 1 and "src/diffusers/_fork_version.py: not what materialize generates" in res.stdout
    assert fork_py(fork, "materialize", "--force").returncode == 0
    assert fork_py(fork, "verify").returncode == 0 and "FORK_PWNED" not in version.read_text()


def test_no_file_of_ours_may_shadow_upstream(fork):
    ours = fork / "src/diffusers/schedulers/scheduling_pndm.py"  # an upstream path, now tracked as ours
    subprocess.run(["git", "-C", str(fork), "add", "-f", str(ours)], check=True)
    res = fork_py(fork, "verify")
    assert res.returncode == 1 and "scheduling_pndm.py: a file of ours shadows" in res.stdout


# ------------------------------------------------------------------------------ the installed package
def test_version_and_public_api():
    import diffusers
    from diffusers import (AutoencoderKL, DDIMScheduler, LMSDiscreteScheduler, PNDMScheduler,  # noqa: F401
                           StableDiffusionPipeline, UNet2DConditionModel)

    at = PIN
    if "site-packages" in Path(diffusers.__file__).resolve().parts:  # a built package: `pip install .` or releases/X
        import importlib.metadata

        at = {**PIN, "version": importlib.metadata.version("diffusers").split("+")[0]}
        assert at["version"] == PIN["version"] or (ROOT / "releases" / at["version"] / "release.json").is_file()
        assert diffusers.__version__ == importlib.metadata.version("diffusers")
    assert diffusers.__version__ == release.fork_version(at)
    assert diffusers.__version__.startswith(at["version"] + "+flash")  # whichever release the fork is on


def test_hub_keywords_are_mapped_for_todays_huggingface_hub():
    from diffusers.flash.compat import hub as hub_compat

    def today(repo_id, filename=None, *, token=None, cache_dir=None):
        return token

    kwargs = hub_compat._normalize(today, dict(use_auth_token="hf_x", resume_download=True, proxies=None,
                                                cache_dir="c"))
    assert kwargs == {"token": "hf_x", "cache_dir": "c"}
    assert hub_compat._normalize(today, dict(use_auth_token="old", token="new"))["token"] == "new"
    assert hub_compat.HfFolder.get_token() == hub_compat._get_token()


@pytest.mark.slow  # a real subprocess: seconds
def test_uncached_repo_offline_names_the_repo(tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.flash.compat.hub import HubOfflineError

    # 0001 (hub compat) raises our HubOfflineError; from its Applied-Upstream on, upstream's own OSError names the repo
    ours = "0001-hub-compat.patch" in dict(active_patches(ROOT))
    with pytest.raises(HubOfflineError if ours else OSError, match="someone/not-cached-anywhere"):
        UNet2DConditionModel.from_pretrained("someone/not-cached-anywhere", cache_dir=tmp_path, local_files_only=True,
                                             **({"use_auth_token": "x", "resume_download": True} if ours else {}))
    code = ("from diffusers import StableDiffusionPipeline as P\n"
            "P.from_pretrained('CompVis/stable-diffusion-v1-4', cache_dir=%r)" % str(tmp_path))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert res.returncode != 0
    if ours:
        assert "HubOfflineError: CompVis/stable-diffusion-v1-4" in res.stderr and "HF_HUB_OFFLINE" in res.stderr
    else:
        assert "OSError: " in res.stderr and "CompVis/stable-diffusion-v1-4" in res.stderr.splitlines()[-1]
    assert StableDiffusionPipeline  # imported for the subprocess's sake too


def test_pipeline_round_trip_with_clip_feature_extractor_name(tmp_path):
    import numpy as np
    import torch

    from diffusers import StableDiffusionPipeline
    from diffusers.flash import local_pipelines

    pipe = local_pipelines.stable_diffusion("tiny", seed=3)
    pipe.save_pretrained(tmp_path)
    index_path = tmp_path / "model_index.json"
    index = json.loads(index_path.read_text())
    index["feature_extractor"] = ["transformers", "CLIPFeatureExtractor"]  # as real SD 1.x checkpoints say
    index_path.write_text(json.dumps(index))
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path)
    outs = []
    for p in (pipe, loaded):
        g = torch.Generator().manual_seed(0)
        outs.append(p("a cat", num_inference_steps=3, height=128, width=128, generator=g, output_type="np").images)
    # latents are height / 8 up to 0.8, height / the VAE's scale factor from 0.9; the tiny VAE decodes them x2
    side = 128 // getattr(pipe, "vae_scale_factor", 8) * 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    assert outs[0].shape == (1, side, side, 3)
    np.testing.assert_array_equal(outs[0], outs[1])
    loaded.save_pretrained(tmp_path / "again")  # image processor and tokenizer find their save methods
    assert (tmp_path / "again/feature_extractor/preprocessor_config.json").exists()
    assert (tmp_path / "again/tokenizer/tokenizer_config.json").exists()


def test_clip_feature_extractor_name_resolves():
    import transformers

    from diffusers.flash.compat.transformers import CLIPFeatureExtractor, import_library

    assert issubclass(CLIPFeatureExtractor, transformers.ImageProcessingMixin)
    assert import_library("transformers").CLIPFeatureExtractor is CLIPFeatureExtractor
    with pytest.raises(AttributeError):
        import_library("transformers").NoSuchClassAnywhere  # noqa: B018


def test_paint_by_example_projection_size_is_kept_in_the_config():
    import transformers

    from diffusers.flash.compat.transformers import paint_by_example_proj_size

    config = transformers.CLIPVisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4)
    assert paint_by_example_proj_size(config) == 768  # upstream's default when neither says
    assert paint_by_example_proj_size(config, 32) == 32 and config.to_dict()["proj_size"] == 32
    assert paint_by_example_proj_size(config) == 32  # a reload builds from the config alone


def test_a_saved_paint_by_example_encoder_loads_back_with_its_size(tmp_path):
    try:
        from diffusers.pipelines.paint_by_example import PaintByExampleImageEncoder
    except ImportError:
        pytest.skip("this release has no paint-by-example pipeline (0.10+)")
    import torch
    import transformers

    config = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=32, patch_size=4, projection_dim=32)
    encoder = PaintByExampleImageEncoder(config, proj_size=32).eval()
    encoder.save_pretrained(tmp_path)
    again = PaintByExampleImageEncoder.from_pretrained(tmp_path).eval()
    assert again.proj_size == 32
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again(pixels)[0], encoder(pixels)[0])


def test_too_new_jax_makes_flax_unavailable_with_a_reason():
    from diffusers.flash.compat import flax as flax_compat

    assert flax_compat.usable("0.3.6")
    assert not flax_compat.usable("0.11.2")
    msg = flax_compat.import_error("default {0}").format("FlaxStableDiffusionPipeline")
    assert "jax 0.11.2 is installed" in msg and msg.startswith("FlaxStableDiffusionPipeline cannot be used")
    flax_compat._reason = None


def test_our_files_live_in_our_namespace_and_upstream_has_none_there():
    from forklib import tree

    base = {"src/diffusers/pipeline_utils.py": "", "src/diffusers/models/attention.py": ""}
    ok = {"src/diffusers/flash/attention/dispatch.py", "src/diffusers/models/attention_dispatch.py"}
    assert tree.namespace_problems(ok, base) == []
    stray = tree.namespace_problems(ok | {"src/diffusers/fast_path.py"}, base)
    assert len(stray) == 1 and "src/diffusers/fast_path.py: a file of ours outside src/diffusers/flash/" in stray[0]
    clash = tree.namespace_problems(ok, {**base, "src/diffusers/flash/x.py": ""})
    assert len(clash) == 1 and "the pinned release has a file in our namespace" in clash[0]


def test_this_checkout_keeps_the_namespace_rule():
    from forklib import tree

    mine = tree.tracked(ROOT)
    if not mine:
        pytest.skip("not a git checkout: nothing is tracked")
    assert tree.namespace_problems(mine, {}) == []
    assert any(p.startswith(tree.NAMESPACE) for p in mine)


def test_the_attention_dispatch_alias_is_laid_down_below_0_35_only():
    rel = "src/diffusers/models/attention_dispatch.py"
    assert rel in tree.aliases("0.4.2", {}) and rel in tree.aliases("0.34.0", {})
    assert tree.aliases("0.35.0", {}) == {} and tree.aliases("0.40.0", {}) == {}
    assert tree.aliases("0.4.2", {rel: "upstream's own"}) == {}  # a release (or patch) with the file keeps its own
    assert "sys.modules[__name__] = _dispatch" in tree.aliases("0.4.2", {})[rel]


def test_materialize_lays_the_alias_down_git_ignored_and_verify_keeps_the_namespace_rule(fork):
    rel = "src/diffusers/models/attention_dispatch.py"
    below = tree.ALIASES[rel]["below"]
    from forklib import variants

    on_pin = variants.vkey(PIN["version"]) < variants.vkey(below)
    alias = fork / rel
    if on_pin:
        assert alias.read_text() == tree.ALIASES[rel]["text"]
        assert "/models/attention_dispatch.py" in (fork / tree.GITIGNORE).read_text().splitlines()
    else:
        assert tree.ALIASES[rel]["text"] != (alias.read_text() if alias.exists() else None)
    stray = fork / "src/diffusers/fast_path.py"  # ours, outside src/diffusers/flash/
    stray.write_text("x = 1\n")
    subprocess.run(["git", "-C", str(fork), "add", str(stray)], check=True)
    res = fork_py(fork, "verify")
    assert res.returncode != 0
    assert "src/diffusers/fast_path.py: a file of ours outside src/diffusers/flash/" in res.stdout + res.stderr


READ_ONLY = '''"""Run a script as on a read-only file system under READ_ONLY_ROOT: every write there fails with EROFS
(the tests run as root here, where permission bits bind nothing)."""
import builtins, errno, io, os, runpy, sys

RO = os.path.realpath(os.environ["READ_ONLY_ROOT"])


def inside(path):
    try:
        p = os.path.realpath(os.fsdecode(path))
    except (TypeError, ValueError):
        return False
    return p == RO or p.startswith(RO + os.sep)


def refuse(path):
    raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))


def guard(real, writes=lambda *a, **k: True):
    def wrapped(path, *args, **kwargs):
        if isinstance(path, (str, bytes, os.PathLike)) and inside(path) and writes(*args, **kwargs):
            refuse(path)
        return real(path, *args, **kwargs)
    return wrapped


WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
os.open = guard(os.open, lambda flags, *a, **k: bool(flags & WRITE_FLAGS))
io.open = builtins.open = guard(io.open, lambda mode="r", *a, **k: any(c in mode for c in "wax+"))
for name in ("mkdir", "unlink", "remove", "rmdir", "chmod", "utime"):
    setattr(os, name, guard(getattr(os, name)))
for name in ("replace", "rename"):
    real = getattr(os, name)
    setattr(os, name, lambda src, dst, *a, _real=real, **k: refuse(dst) if inside(dst) or inside(src)
            else _real(src, dst, *a, **k))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


def test_setup_py_on_a_read_only_checkout_gives_one_line(fork, tmp_path):
    shutil.copy(ROOT / "setup.py", fork / "setup.py")
    (tmp_path / "read_only.py").write_text(READ_ONLY)

    def setup_py(*args):
        return subprocess.run([sys.executable, str(tmp_path / "read_only.py"), str(fork / "setup.py"), *args],
                              capture_output=True, text=True, cwd=fork, env=dict(os.environ, READ_ONLY_ROOT=str(fork)))

    res = setup_py("--version")  # everything laid down: nothing to write, so nothing fails
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    assert res.stdout.strip().splitlines()[-1] == release.fork_version(PIN)
    for rel in [*tree.manifest(fork)["files"], *tree.GENERATED]:  # a fresh checkout: all must be written
        (fork / rel).unlink()
    res = setup_py("--version")
    assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("diffusers-flash: cannot lay down") and "Read-only" in lines[0], \
        res.stderr


def test_a_sha256_with_a_trailing_newline_is_not_a_sha256():
    from forklib import fsutil

    digest = "a" * 64
    assert fsutil.is_sha256(digest)
    # `$` matches before a final newline: such a value passed the format check and then failed to compare
    for bad in (digest + "\n", digest + " ", "\n" + digest, digest.upper(), digest[:-1]):
        assert not fsutil.is_sha256(bad), repr(bad)
