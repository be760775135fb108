"""fork.py test-upstream: the plugin's Hub classification on synthetic errors, and the whole harness
run on a tiny synthetic 'upstream' git repository (offline, CPU)."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from forklib import upstream_plugin as plugin
from forklib import upstream_tests
from forklib.release import ForkError
from diffusers.flash.compat.hub import HubOfflineError
from huggingface_hub.errors import LocalEntryNotFoundError

ROOT = Path(__file__).resolve().parent.parent




def raised(fn, *args):
    try:
        fn(*args)
    except BaseException as e:  # noqa: B036
        return e
    raise AssertionError(f"{fn.__name__} raised nothing")


# ---------------------------------------------------------------- classification
@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_hub_offline_error_is_hub_with_its_repo_id():
    assert plugin.hub_repo(HubOfflineError("some-org/some-model", "config.json")) == "some-org/some-model"


def test_hub_offline_error_under_another_error_is_hub():
    def load():
        try:
            raise HubOfflineError("some-org/unet")
        except OSError as e:
            raise RuntimeError("could not build the pipeline") from e

    assert plugin.hub_repo(raised(load)) == "some-org/unet"


def test_unrelated_oserror_stays_a_failure(offline):
    def load(pretrained_model_name_or_path):
        raise OSError(f"[Errno 28] No space left on device while loading '{pretrained_model_name_or_path}/x.bin'")

    assert plugin.hub_repo(OSError("[Errno 2] No such file or directory: 'weights.bin'")) is None
    assert plugin.hub_repo(raised(load, "some-org/some-model")) is None
    assert plugin.hub_repo(AssertionError("max diff 0.03 > 0.01")) is None


def test_transformers_offline_oserror_takes_repo_from_the_call(offline):
    def cached_files(path_or_repo_id):
        raise LocalEntryNotFoundError("Cannot find the requested files in the disk cache")

    def from_pretrained(pretrained_model_name_or_path):
        try:
            cached_files(pretrained_model_name_or_path)
        except LocalEntryNotFoundError as e:
            raise OSError("We couldn't connect to 'https://huggingface.co' to load the files") from e

    assert plugin.hub_repo(raised(from_pretrained, "hf-internal-testing/tiny-random-clip")) == \
        "hf-internal-testing/tiny-random-clip"


def test_a_repo_id_quoted_in_a_message_is_not_a_hub_error(offline):
    def from_pretrained(pretrained_model_name_or_path):
        raise OSError(f"Can't load image processor for '{pretrained_model_name_or_path}'. Make sure ...")

    assert plugin.hub_repo(raised(from_pretrained, "openai/clip-vit-base-patch32")) is None


def test_a_hub_error_in_the_chain_makes_it_the_hub(offline):
    import requests
    from huggingface_hub.errors import HfHubHTTPError

    def fail(repo):
        raise OSError(f"Can't load image processor for '{repo}'")

    def from_pretrained(pretrained_model_name_or_path, cause):
        try:
            raise cause
        except Exception:  # implicit chaining: the cause is the OSError's __context__
            fail(pretrained_model_name_or_path)

    for cause in (requests.ConnectionError("connection refused"), LocalEntryNotFoundError("not in the cache"),
                  HfHubHTTPError.__new__(HfHubHTTPError)):  # made without an HTTP response
        assert plugin.hub_repo(raised(from_pretrained, "openai/clip-vit-base-patch32", cause)) == \
            "openai/clip-vit-base-patch32", type(cause)
    assert plugin.hub_repo(raised(from_pretrained, "openai/clip", ValueError("bad config"))) is None


def test_image_processor_of_an_uncached_repo_raises_hub_offline_error(offline, tmp_path, monkeypatch):
    from transformers.image_processing_base import ImageProcessingMixin

    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setattr(ImageProcessingMixin, "from_pretrained", ImageProcessingMixin.from_pretrained)
    plugin.guard(ImageProcessingMixin, "image processor")  # what guard_tokenizers does for it (GUARDED)
    assert ("image_processing_base", "ImageProcessingMixin", "image processor") in plugin.GUARDED
    err = raised(ImageProcessingMixin.from_pretrained, "some-org/uncached-processor")
    assert isinstance(err, HubOfflineError) and plugin.hub_repo(err) == "some-org/uncached-processor"


def test_offline_error_without_a_repo_id_stays_a_failure(offline):
    assert plugin.hub_repo(LocalEntryNotFoundError("Cannot find the requested files in the disk cache")) is None


def test_local_directory_is_not_a_repo_id(offline, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "model").mkdir(parents=True)

    def from_pretrained(pretrained_model_name_or_path):
        raise OSError(f"Can't load tokenizer for '{pretrained_model_name_or_path}'")

    assert plugin.hub_repo(raised(from_pretrained, "org/model")) is None


def test_require_cached_raises_for_an_uncached_repo_only_when_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    err = raised(plugin.require_cached, "some-org/not-cached", str(tmp_path), None, "tokenizer")
    assert isinstance(err, HubOfflineError) and err.repo_id == "some-org/not-cached"
    assert plugin.hub_repo(err) == "some-org/not-cached"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "local" / "tok").mkdir(parents=True)
    plugin.require_cached("local/tok", str(tmp_path))  # a local folder: nothing to fetch
    monkeypatch.delenv("HF_HUB_OFFLINE")
    plugin.require_cached("some-org/not-cached", str(tmp_path))  # online: transformers downloads it


# ---------------------------------------------------------------- the harness, end to end
FAKE_TESTS = '''
import os
import unittest

import pytest


def test_passes():
    with open("hf-internal-testing/dummy/data.txt") as f:  # a repo-root fixture, by relative path
        assert f.read() == "{marker}"


def test_fails():
    assert 1 + 1 == 3


def test_unrelated_oserror_fails():
    raise OSError("[Errno 28] No space left on device")


def test_needs_the_hub():
    from diffusers import UNet2DModel

    UNet2DModel.from_pretrained("fake-org/fake-unet")


def test_tokenizer_needs_the_hub():
    from transformers import CLIPFeatureExtractor, CLIPTokenizer  # old name: the plugin provides it

    assert CLIPFeatureExtractor is not None
    CLIPTokenizer.from_pretrained("fake-org/fake-clip")


def test_image_processor_needs_the_hub():
    from transformers import CLIPImageProcessor

    CLIPImageProcessor.from_pretrained("fake-org/fake-processor")


def test_caught_error_needs_the_hub():
    from diffusers import UNet2DModel

    with pytest.raises(OSError) as caught:  # upstream's download tests assert the Hub's wording
        UNet2DModel.from_pretrained("fake-org/fake-wording")
    assert "Error no file named" in str(caught.value)


class CaughtTests(unittest.TestCase):
    def test_caught_unrelated_error_fails(self):
        with self.assertRaises(OSError) as caught:
            raise OSError("[Errno 28] No space left on device")
        assert "Error no file named" in str(caught.exception)


def test_hub_file_url_needs_the_hub():
    import requests  # upstream's load_pt/load_image of a dataset file, offline

    raise requests.exceptions.ConnectionError("HTTPSConnectionPool(host='huggingface.co', port=443): Max retries "
                                              "exceeded with url: /datasets/fake-org/fake-images/resolve/main/x.pt")


def test_url_quoted_is_a_failure():
    raise ValueError("cannot read https://huggingface.co/fake-org/quoted-url/resolve/main/x.pt")


def test_repo_id_quoted_is_a_failure():
    def from_pretrained(pretrained_model_name_or_path):
        raise OSError(f"Can't load config for '{pretrained_model_name_or_path}': it is broken")

    from_pretrained("fake-org/quoted")


@pytest.mark.skip(reason="test is slow")
def test_slow():
    raise AssertionError("never runs")


class GPUTests(unittest.TestCase):
    @unittest.skipIf(True, "This test requires a GPU")
    def test_gpu(self):
        raise AssertionError("never runs")
'''


SETUP_PY = '''
import re
from setuptools import setup

_deps = [
    "pytest",
    "definitely-not-installed-dist-f7>=1.0",
    "scipy",
]
deps = {b: a for a, b in (re.findall(r"^(([^!=<>~]+)(?:[!=<>~].*)?$)", x)[0] for x in _deps)}


def deps_list(*pkgs):
    return [deps[pkg] for pkg in pkgs]


extras = {}
extras["quality"] = ["black==22.8"]
extras["test"] = deps_list({test})
setup(name="diffusers", extras_require=extras)
'''


def git(repo, *args):
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                   env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                        "GIT_COMMITTER_EMAIL": "t@t"})


def commit_tree(repo, marker):
    (repo / "tests").mkdir(parents=True, exist_ok=True)
    (repo / "tests" / "__init__.py").write_text("")
    (repo / "tests" / "test_fake.py").write_text(FAKE_TESTS.replace("{marker}", marker))
    (repo / "hf-internal-testing" / "dummy").mkdir(parents=True, exist_ok=True)
    (repo / "hf-internal-testing" / "dummy" / "data.txt").write_text(marker)
    (repo / "tests" / "repo_utils").mkdir(exist_ok=True)
    (repo / "tests" / "repo_utils" / "test_check_copies.py").write_text(
        "import black  # noqa: F401\n\n\ndef test_copies():\n    assert False, 'needs utils/'\n")
    (repo / "src").mkdir(exist_ok=True)
    (repo / "src" / "not_a_test.py").write_text("raise SystemExit('upstream code must not be laid out')\n")
    (repo / "setup.py").write_text(SETUP_PY.replace("{test}", '"pytest"'))
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", marker)


@pytest.fixture
def fake_upstream(tmp_path):
    """A git repo with tag v9.9.9 (the fake tests above) and a later commit whose fixture differs."""
    repo = tmp_path / "upstream"
    repo.mkdir()
    git(repo, "init", "-q")
    commit_tree(repo, "tagged")
    git(repo, "tag", "v9.9.9")
    commit_tree(repo, "later")  # HEAD: test_passes would fail on the tag's test file with this fixture
    return repo


@pytest.fixture
def fork_root(tmp_path, monkeypatch):
    root = tmp_path / "fork"
    root.mkdir()
    (root / "upstream.json").write_text((ROOT / "upstream.json").read_text())
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # an empty Hub cache
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return root


@pytest.mark.slow
def test_harness_runs_a_tagged_upstream_suite_and_counts(fake_upstream, fork_root, capfd):
    rc = upstream_tests.run(fork_root, str(fake_upstream), "v9.9.9", [])
    out = capfd.readouterr().out
    assert rc == 1, out  # there are real failures
    line = next(ln for ln in out.splitlines() if ln.startswith("test-upstream: ") and " passed" in ln)
    assert re.match(r"test-upstream: 1 passed, 5 failed, 5 skipped for the Hub, 2 skipped by upstream .*"
                    r", 1 folder\(s\) excluded in \d+\.\ds$", line), line
    assert "needs the Hugging Face Hub: fake-org/fake-unet" in out
    assert "needs the Hugging Face Hub: fake-org/fake-wording" in out  # caught by the test, then asserted on
    assert "needs the Hugging Face Hub: fake-org/fake-images" in out  # a file URL on the Hub, offline
    assert "FAILED tests/test_fake.py::test_url_quoted_is_a_failure" in out
    assert "FAILED tests/test_fake.py::CaughtTests::test_caught_unrelated_error_fails" in out
    assert "needs the Hugging Face Hub: fake-org/fake-clip" in out
    assert "needs the Hugging Face Hub: fake-org/fake-processor" in out
    assert "FAILED tests/test_fake.py::test_unrelated_oserror_fails" in out
    assert "FAILED tests/test_fake.py::test_repo_id_quoted_is_a_failure" in out
    assert "EXCLUDED tests/repo_utils/ (1 test file(s)): upstream's repository-maintenance tests" in out
    assert "installing" not in out  # the test extra (pytest) is installed already
    laid = fork_root / "upstream-tests" / "v9.9.9" / "diffusers"  # named as upstream's checkout (a test asserts it)
    assert (laid / "hf-internal-testing" / "dummy" / "data.txt").read_text() == "tagged"
    assert not (laid / "src").exists()
    outcomes = json.loads((laid / "outcomes.json").read_text())["outcomes"]
    assert outcomes["tests/test_fake.py::test_needs_the_hub"] == ["hub", "fake-org/fake-unet"]
    assert outcomes["tests/test_fake.py::test_fails"][0] == "failed"
    assert not [n for n in outcomes if "repo_utils" in n]
    assert json.loads((laid / "outcomes.json").read_text())["excluded"]["tests/repo_utils"]["files"] == 1


@pytest.mark.slow
def test_harness_exit_zero_when_nothing_fails_and_pytest_args_pass_through(fake_upstream, fork_root, capfd):
    rc = upstream_tests.run(fork_root, str(fake_upstream), "v9.9.9", ["-k", "passes or hub or slow"])
    out = capfd.readouterr().out
    assert rc == 0, out
    assert "test-upstream: 1 passed, 0 failed, 5 skipped for the Hub, 1 skipped by upstream" in out


# ---------------------------------------------------------------- the tag's test extra
def test_test_requirements_read_deps_list_and_literal_lists():
    assert upstream_tests.test_requirements(SETUP_PY.replace("{test}", '"scipy", "definitely-not-installed-dist-f7"')) \
        == ["scipy", "definitely-not-installed-dist-f7>=1.0"]
    literal = 'extras = {}\nextras["testing"] = ["pytest", "parameterized>=0.8"]\n'
    assert upstream_tests.test_requirements(literal) == ["pytest", "parameterized>=0.8"]
    assert upstream_tests.test_requirements("from setuptools import setup\nsetup()\n") == []
    with pytest.raises(ForkError, match="_deps lacks"):
        upstream_tests.test_requirements(SETUP_PY.replace("{test}", '"nope"'))


def test_missing_requirements_are_the_uninstalled_ones():
    assert upstream_tests.missing_requirements(
        ["pytest>=999", "definitely-not-installed-dist-f7>=1.0", "other-missing-f7; python_version < '3'"]) == \
        ["definitely-not-installed-dist-f7>=1.0"]  # installed pytest of another version is left as it is


@pytest.fixture
def needs_a_missing_dist(fake_upstream):
    """Tag v9.9.10: its test extra lists a distribution that is not installed."""
    (fake_upstream / "setup.py").write_text(SETUP_PY.replace("{test}", '"pytest", "definitely-not-installed-dist-f7"'))
    git(fake_upstream, "add", "-A")
    git(fake_upstream, "commit", "-q", "-m", "needs more")
    git(fake_upstream, "tag", "v9.9.10")
    return fake_upstream


def test_no_install_refuses_naming_the_pip_command(needs_a_missing_dist):
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "fork.py"), "test-upstream", "--upstream-repo",
                          str(needs_a_missing_dist), "--tag", "v9.9.10", "--no-install"],
                         capture_output=True, text=True)
    assert res.returncode == 2, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "definitely-not-installed-dist-f7>=1.0, not installed" in res.stderr
    assert "-m pip install 'definitely-not-installed-dist-f7>=1.0'" in res.stderr


def test_missing_test_extra_is_installed_then_checked(needs_a_missing_dist, tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    calls, checked = [], []

    def installs(cmd):
        calls.append(cmd)
        info = site / "definitely_not_installed_dist_f7-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: definitely-not-installed-dist-f7\nVersion: 1.0\n")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    def check(dists):
        checked.append(set(dists))
        return {}

    repo = str(needs_a_missing_dist)
    assert upstream_tests.ensure_test_requirements(repo, "v9.9.10", True, installs, check) == \
        {"installed": ["definitely-not-installed-dist-f7>=1.0"], "removed": {}}
    assert calls == [[sys.executable, "-m", "pip", "install", "definitely-not-installed-dist-f7>=1.0"]]
    assert checked == [{"definitely-not-installed-dist-f7"}]  # what this run brought in must import
    assert upstream_tests.ensure_test_requirements(repo, "v9.9.10", True, installs, check) == \
        {"installed": [], "removed": {}}  # now there
    assert len(calls) == 1


@pytest.fixture
def needs_two_missing_dists(fake_upstream):
    """Tag v9.9.11: its test extra lists two distributions that are not installed."""
    setup_py = SETUP_PY.replace('    "scipy",\n', '    "scipy",\n    "other-missing-dist-f8>=2",\n')
    (fake_upstream / "setup.py").write_text(
        setup_py.replace("{test}", '"definitely-not-installed-dist-f7", "pytest", "other-missing-dist-f8"'))
    git(fake_upstream, "add", "-A")
    git(fake_upstream, "commit", "-q", "-m", "needs two")
    git(fake_upstream, "tag", "v9.9.11")
    return fake_upstream


def _fake_dist(site, name, version="1.0", module=None, source=""):
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    if module:
        (site / f"{module}.py").write_text(source)
        (info / "RECORD").write_text(f"{module}.py,,\n{info.name}/METADATA,,\n")


def test_test_extra_is_installed_one_requirement_a_pip_run(needs_two_missing_dists, tmp_path, monkeypatch):
    """pip given the whole extra at once backtracked for 10 minutes (v0.11.1) where each alone resolves."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    calls = []

    def installs(cmd):
        calls.append(cmd[4:])
        for req in cmd[4:]:
            _fake_dist(site, req.split(">")[0], "2.0")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    got = upstream_tests.ensure_test_requirements(str(needs_two_missing_dists), "v9.9.11", True, installs,
                                                  lambda dists: {})
    assert calls == [["definitely-not-installed-dist-f7>=1.0"], ["other-missing-dist-f8>=2"]]
    assert got["installed"] == ["definitely-not-installed-dist-f7>=1.0", "other-missing-dist-f8>=2"]


def test_what_installs_but_does_not_import_is_removed_again(needs_two_missing_dists, tmp_path, monkeypatch, capsys):
    """A torchvision built for CUDA torch beside the CPU torch installs, then breaks importing transformers
    (``operator torchvision::nms does not exist``) and every upstream test with it: it is taken out again."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
    removed = []

    def installs(cmd):
        if "definitely-not-installed-dist-f7>=1.0" in cmd:
            _fake_dist(site, "definitely-not-installed-dist-f7", module="fine_module_f7", source="X = 1\n")
        else:
            _fake_dist(site, "other-missing-dist-f8", "2.0", module="broken_module_f8",
                       source="raise RuntimeError('operator fake::nms does not exist')\n")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    got = upstream_tests.ensure_test_requirements(str(needs_two_missing_dists), "v9.9.11", True, installs,
                                                  uninstaller=removed.append)
    why = "import broken_module_f8: RuntimeError: operator fake::nms does not exist"
    assert got["removed"] == {"other-missing-dist-f8": why}
    assert removed == [{"other-missing-dist-f8": why}]
    assert "removed other-missing-dist-f8 again: it installed but does not import here" in capsys.readouterr().out
    text = upstream_tests.summary({"counts": {"passed": 1, "failed": 0, "hub": 0, "skipped": 0}, "outcomes": {},
                                   "removed": got["removed"]}, 1.0)
    assert f"NOT INSTALLED other-missing-dist-f8 (the tag's test extra; tests that need it skip): {why}" in text


def test_an_install_that_fails_is_named_and_the_rest_goes_on(needs_a_missing_dist, capsys):
    """One requirement pip cannot install here (v0.20.2's compel==0.1.8 beside transformers 5) does not stop
    the run: it is named with pip's error, and the tests that need its module skip, naming it."""
    def fails(cmd):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found\n")

    got = upstream_tests.ensure_test_requirements(str(needs_a_missing_dist), "v9.9.10", True, fails,
                                                  check=lambda new: {}, uninstaller=lambda names: None)
    why = got["removed"]["definitely-not-installed-dist-f7"]
    assert "\n" not in why and "could not install definitely-not-installed-dist-f7>=1.0" in why
    assert "No matching distribution found" in why and "-m pip install" in why and got["installed"] == []
    assert "the tests that need it skip" in capsys.readouterr().out
    assert upstream_tests.module_of(why, "definitely-not-installed-dist-f7") == "definitely_not_installed_dist_f7"
    text = upstream_tests.summary({"counts": {"passed": 1, "failed": 0, "hub": 0, "skipped": 0}, "outcomes": {},
                                   "removed": got["removed"]}, 1.0)
    assert f"NOT INSTALLED definitely-not-installed-dist-f7 (the tag's test extra; tests that need it skip): {why}" \
        in text


def test_a_failed_install_names_pips_error_not_its_hint(needs_a_missing_dist):
    """pip ends a failed build with 'hint: See above for details.', which told nothing (v0.11.1)."""
    out = ("Collecting scikit-learn\n  Cython.Compiler.Errors.CompileError: sklearn/x.pyx\n"
           "error: metadata-generation-failed\n\nx Encountered error while generating package metadata.\n"
           "note: This is an issue with the package mentioned above, not pip.\nhint: See above for details.\n")

    got = upstream_tests.ensure_test_requirements(str(needs_a_missing_dist), "v9.9.10", True,
                                                  lambda cmd: subprocess.CompletedProcess(cmd, 1, "", out),
                                                  check=lambda new: {}, uninstaller=lambda names: None)
    why = got["removed"]["definitely-not-installed-dist-f7"]
    assert "(error: metadata-generation-failed;" in why and "hint" not in why


def test_pip_install_holds_what_is_installed(monkeypatch):
    seen = {}

    def fake_run(cmd, **kwargs):
        seen["cmd"] = cmd
        seen["held"] = Path(cmd[cmd.index("--constraint") + 1]).read_text().splitlines()
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(upstream_tests.subprocess, "run", fake_run)
    upstream_tests.pip_install(["pip", "install", "x"])
    import torch

    assert f"torch=={torch.__version__}" in seen["held"] and not [h for h in seen["held"] if "diffusers" in h]


def test_cli_refuses_a_missing_tag_or_repo(fake_upstream, tmp_path):
    fork_py = [sys.executable, str(ROOT / "scripts" / "fork.py"), "test-upstream"]
    res = subprocess.run([*fork_py, "--upstream-repo", str(fake_upstream), "--tag", "v0.0.0-none"],
                         capture_output=True, text=True)
    assert res.returncode == 2 and f"upstream repo {fake_upstream} has no tag v0.0.0-none" in res.stderr, res.stderr
    res = subprocess.run([*fork_py, "--upstream-repo", str(tmp_path / "nowhere")], capture_output=True, text=True)
    assert res.returncode == 2 and "does not exist" in res.stderr, res.stderr
    res = subprocess.run([*fork_py, "--upstream-repo", str(fake_upstream), "--tag", "../escape"],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "not a tag name: '../escape'" in res.stderr, res.stderr


def test_refuses_a_tag_without_tests(fork_root, tmp_path):
    repo = tmp_path / "no-tests"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "README").write_text("x")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "x")
    git(repo, "tag", "v1")
    with pytest.raises(ForkError, match="has no tests/ folder"):
        upstream_tests.run(fork_root, str(repo), "v1", [])


def test_deterministic_flag_turns_on_deterministic_kernels(monkeypatch):
    import torch

    from forklib import upstream_plugin

    monkeypatch.delenv("DIFFUSERS_FLASH_DETERMINISTIC", raising=False)
    upstream_plugin.deterministic_kernels()
    assert not torch.are_deterministic_algorithms_enabled()
    monkeypatch.setenv("DIFFUSERS_FLASH_DETERMINISTIC", "1")
    try:
        upstream_plugin.deterministic_kernels()
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False


# ---------------------------------------------------------------- known upstream test defects
pytest_plugins = ["pytester"]

DEFECTIVE = '''
import os


class AttentionBackendError(RuntimeError):
    pass


def test_defective():
    # upstream's own test is wrong here
    if os.environ.get("DEFECT_MODE") == "backend":
        raise AttentionBackendError("no attention backend for this input")
    assert os.environ.get("DEFECT_MODE") != "other-assert"
    assert 0.1 + 0.2 == 0.3


def test_really_broken():
    assert 1 + 1 == 3
'''


def test_fingerprint_ignores_comments_and_layout_not_code():
    a = "def f(x):\n    # why\n    return x + 1\n"
    assert plugin.fingerprint(a) == plugin.fingerprint("    def f(x):\n\n        return x + 1  # because\n")
    assert plugin.fingerprint(a) != plugin.fingerprint("def f(x):\n    return x + 2\n")


def _defect_entry(pytester, source, monkeypatch):
    # the inner pytest runs in this process: keep the plugin's process-wide patches out of it
    monkeypatch.setattr(plugin, "guard_tokenizers", lambda: None)
    monkeypatch.setattr(plugin, "alias_transformers", lambda: None)
    pytester.makepyfile(test_upstream=source)
    body = source[source.index("def test_defective"):source.index("def test_really_broken")]
    return {"test_upstream.py::test_defective": (plugin.fingerprint(body), "assert 0.1 + 0.2 == 0.3",
                                                  "fixed upstream in the test by #1")}


def test_a_listed_defect_is_counted_apart_and_nothing_else(pytester, monkeypatch):
    monkeypatch.setattr(plugin, "KNOWN_DEFECTS", _defect_entry(pytester, DEFECTIVE, monkeypatch))
    report = pytester.path / "report.json"
    pytester.runpytest("-p", "forklib.upstream_plugin", f"--upstream-report={report}")
    result = json.loads(report.read_text())
    defect = ["upstream-defect", "fixed upstream in the test by #1"]
    assert result["outcomes"]["test_upstream.py::test_defective"] == defect
    assert result["outcomes"]["test_upstream.py::test_really_broken"][0] == "failed"
    assert result["counts"] == {"passed": 0, "failed": 1, "hub": 0, "skipped": 0, "upstream-defect": 1}
    text = upstream_tests.summary(result, 1.0)
    assert "0 passed, 1 failed" in text and "1 known upstream test defect(s)" in text
    assert "KNOWN UPSTREAM TEST DEFECT (failed, not counted as a failure) test_upstream.py::test_defective" in text


def test_a_changed_test_is_no_longer_excused(pytester, monkeypatch):
    entry = _defect_entry(pytester, DEFECTIVE, monkeypatch)
    pytester.makepyfile(test_upstream=DEFECTIVE.replace("0.1 + 0.2 == 0.3", "0.1 + 0.2 == 0.31"))
    monkeypatch.setattr(plugin, "KNOWN_DEFECTS", entry)
    report = pytester.path / "report.json"
    pytester.runpytest("-p", "forklib.upstream_plugin", f"--upstream-report={report}")
    outcomes = json.loads(report.read_text())["outcomes"]
    assert outcomes["test_upstream.py::test_defective"][0] == "failed"


def test_a_test_whose_source_changed_between_tags_has_an_entry_per_source(pytester, monkeypatch):
    [(nodeid, entry)] = _defect_entry(pytester, DEFECTIVE, monkeypatch).items()
    other_tag = ("0" * 16, entry[1], "the other tag's")  # the test's source at another tag: not this one
    report = pytester.path / "report.json"
    monkeypatch.setattr(plugin, "KNOWN_DEFECTS", {nodeid: [other_tag, (entry[0], entry[1], "this tag's")]})
    pytester.runpytest("-p", "forklib.upstream_plugin", f"--upstream-report={report}")
    assert json.loads(report.read_text())["outcomes"][nodeid] == ["upstream-defect", "this tag's"]
    monkeypatch.setattr(plugin, "KNOWN_DEFECTS", {nodeid: [other_tag]})
    pytester.runpytest("-p", "forklib.upstream_plugin", f"--upstream-report={report}")
    assert json.loads(report.read_text())["outcomes"][nodeid][0] == "failed"


@pytest.mark.parametrize("mode", ["backend", "other-assert"])
def test_a_listed_defect_failing_otherwise_is_a_plain_failure(pytester, monkeypatch, mode):
    monkeypatch.setattr(plugin, "KNOWN_DEFECTS", _defect_entry(pytester, DEFECTIVE, monkeypatch))
    monkeypatch.setenv("DEFECT_MODE", mode)
    report = pytester.path / "report.json"
    pytester.runpytest("-p", "forklib.upstream_plugin", f"--upstream-report={report}")
    outcome = json.loads(report.read_text())["outcomes"]["test_upstream.py::test_defective"]
    assert outcome[0] == "failed", outcome
    assert ("AttentionBackendError" if mode == "backend" else "other-assert") in outcome[1]


def test_the_listed_gradient_checkpointing_defect_names_its_assertion_at_the_tag():
    mirror = Path("/work/.mirror/huggingface+diffusers/repo")
    if not mirror.is_dir():
        pytest.skip("no upstream mirror here")
    source = subprocess.run(["git", "-C", str(mirror), "show", "v0.4.2:tests/test_models_unet.py"],
                            capture_output=True, text=True).stdout
    nodeid = "tests/test_models_unet.py::UNet2DConditionModelTests::test_gradient_checkpointing"
    finger, assertion, _ = plugin.KNOWN_DEFECTS[nodeid]
    import ast

    classes = [c for c in ast.parse(source).body
               if isinstance(c, ast.ClassDef) and c.name == "UNet2DConditionModelTests"]
    node = next(n for c in classes
                for n in c.body if isinstance(n, ast.FunctionDef) and n.name == "test_gradient_checkpointing")
    lines = source.splitlines(keepends=True)[node.lineno - 1:node.end_lineno]
    assert plugin.fingerprint("".join(lines)) == finger
    assert [ln.strip() for ln in lines].count(assertion) == 1


# ---------------------------------------------------------------- what test-upstream removed again
def test_tests_needing_a_removed_dist_skip_naming_it_and_other_missing_modules_fail(tmp_path):
    """A test module, or a test, that fails only because it imports a module test-upstream installed and
    removed again (it does not import here: a torchvision built for another torch) is skipped with the reason;
    a module missing for any other reason stays a failure, and without the list nothing is skipped."""
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_module_level.py").write_text("import heldout_mod_f7\n\n\ndef test_a():\n    pass\n")
    (tmp_path / "tests" / "test_inside.py").write_text(
        "def test_held():\n    import heldout_mod_f7.ops  # noqa: F401\n\n\n"
        "def test_other():\n    import other_missing_mod_f7  # noqa: F401\n")
    # upstream's model code guards such imports (if is_torchvision_available(): from torchvision import
    # transforms), so a test reaching that code meets a NameError: skipped as well; any other NameError fails
    (tmp_path / "tests" / "guarded_f7.py").write_text(
        "try:\n    from heldout_mod_f7 import transforms\nexcept ImportError:\n    pass\n\n\n"
        "def resize():\n    return transforms.resize\n\n\ndef typo():\n    return transfroms.resize  # noqa: F821\n")
    (tmp_path / "tests" / "test_guarded.py").write_text(
        "from guarded_f7 import resize, typo\n\n\ndef test_guarded():\n    resize()\n\n\n"
        "def test_typo():\n    typo()\n")
    (tmp_path / "pytest.ini").write_text("[pytest]\n")

    def run(held):
        report = tmp_path / "outcomes.json"
        env = dict(os.environ, PYTHONPATH=str(ROOT / "scripts"))
        env.pop(upstream_tests.NOT_INSTALLED_ENV, None)
        if held:
            env[upstream_tests.NOT_INSTALLED_ENV] = json.dumps(held)
        subprocess.run([sys.executable, "-m", "pytest", "-p", upstream_tests.PLUGIN, "--upstream-report", str(report),
                        "-c", "pytest.ini", "-p", "no:cacheprovider", "--continue-on-collection-errors", "tests"],
                       cwd=tmp_path, env=env,
                       capture_output=True, text=True)
        return json.loads(report.read_text())["outcomes"]

    why = "import heldout_mod_f7: RuntimeError: operator heldout::nms does not exist"
    out = run({"heldout_mod_f7": why})
    assert out["tests/test_module_level.py"] == ["skipped", f"needs heldout_mod_f7, not installed: {why}"]
    assert out["tests/test_inside.py::test_held"] == ["skipped", f"needs heldout_mod_f7, not installed: {why}"]
    assert out["tests/test_inside.py::test_other"][0] == "failed"
    assert out["tests/test_guarded.py::test_guarded"] == ["skipped", f"needs heldout_mod_f7, not installed: {why}"]
    assert out["tests/test_guarded.py::test_typo"][0] == "failed"
    out = run({})
    assert out["tests/test_guarded.py::test_guarded"][0] == "failed"
    assert out["tests/test_module_level.py"][0] == "failed" and out["tests/test_inside.py::test_held"][0] == "failed"
    assert upstream_tests.module_of(why, "heldout-mod-f7") == "heldout_mod_f7"
    assert upstream_tests.module_of("the import check itself failed", "heldout-mod-f7") == "heldout_mod_f7"


# ---------------------------------------------------------------- what this machine's torch cannot do
def test_what_torch_cannot_do_here_skips_with_the_reason_and_lookalikes_fail(tmp_path):
    """FlexAttention's backward on the CPU raises NotImplementedError inside torch (v0.40.0's AnyFlowFAR
    training tests, with upstream's own code too): skipped, naming it. The same error raised anywhere else,
    or another NotImplementedError from flex attention (3D inputs), stays a failure."""
    import torch
    import torch.nn.attention

    if not hasattr(torch.nn.attention, "flex_attention"):
        pytest.skip(f"torch {torch.__version__} has no flex attention")
    from torch.nn.attention.flex_attention import flex_attention

    q = torch.randn(1, 1, 128, 16, requires_grad=True)
    try:
        flex_attention(q, q, q)
    except NotImplementedError:
        pass
    else:
        pytest.skip(f"torch {torch.__version__} has a FlexAttention backward on the CPU: nothing to skip")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_flex.py").write_text(
        "import torch\nfrom torch.nn.attention.flex_attention import flex_attention\n\n\n"
        "def test_backward():\n    q = torch.randn(1, 1, 128, 16, requires_grad=True)\n"
        "    flex_attention(q, q, q).sum().backward()\n\n\n"
        "def test_lookalike():\n"
        "    raise NotImplementedError('FlexAttention does not support backward on CPU.')\n\n\n"
        "def test_other_flex_error():\n    q = torch.randn(1, 1, 128, 16)\n    flex_attention(q[0], q[0], q[0])\n")
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    report = tmp_path / "outcomes.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "scripts"))
    subprocess.run([sys.executable, "-m", "pytest", "-p", upstream_tests.PLUGIN, "--upstream-report", str(report),
                    "-c", "pytest.ini", "-p", "no:cacheprovider", "tests"], cwd=tmp_path, env=env,
                   capture_output=True, text=True)
    out = json.loads(report.read_text())["outcomes"]
    assert out["tests/test_flex.py::test_backward"] == [
        "skipped", f"cannot run here: torch {torch.__version__} has no FlexAttention backward on the CPU"]
    assert out["tests/test_flex.py::test_lookalike"][0] == "failed"
    assert out["tests/test_flex.py::test_other_flex_error"][0] == "failed"


# ---------------------------------------------------------------- which repository, which code (issues 32, 29)
def _tagged_repo(tmp_path, name, marker):
    repo = tmp_path / name
    repo.mkdir()
    git(repo, "init", "-q")
    commit_tree(repo, marker)
    git(repo, "tag", "v9.9.9")
    return repo


def _fixture_at_tag(repo):
    return subprocess.run(["git", "-C", repo, "show", "v9.9.9:hf-internal-testing/dummy/data.txt"],
                          capture_output=True, text=True, check=True).stdout


def test_each_repository_url_has_its_own_cache_and_its_tag_is_checked_each_run(tmp_path, fork_root, monkeypatch,
                                                                              capsys):
    """A run against one repository executed another's conftest.py: one cache held every URL's tags."""
    monkeypatch.setenv("DIFFUSERS_FLASH_CACHE", str(tmp_path / "cache"))
    a, b = _tagged_repo(tmp_path, "a", "from-a"), _tagged_repo(tmp_path, "b", "from-b")
    got_a = upstream_tests.local_repo(fork_root, a.as_uri(), "v9.9.9")
    assert _fixture_at_tag(got_a) == "from-a"
    got_b = upstream_tests.local_repo(fork_root, b.as_uri(), "v9.9.9")
    assert _fixture_at_tag(got_b) == "from-b" and got_b != got_a
    assert _fixture_at_tag(upstream_tests.local_repo(fork_root, a.as_uri(), "v9.9.9")) == "from-a"
    commit_tree(a, "moved")  # the tag moves in that repository: fetched again, not the cached one
    git(a, "tag", "-f", "v9.9.9")
    assert _fixture_at_tag(upstream_tests.local_repo(fork_root, a.as_uri(), "v9.9.9")) == "moved"
    shutil.rmtree(a)  # unreachable: the copy fetched from it before, said so
    capsys.readouterr()
    assert _fixture_at_tag(upstream_tests.local_repo(fork_root, a.as_uri(), "v9.9.9")) == "moved"
    assert "could not check" in capsys.readouterr().err
    with pytest.raises(ForkError, match="cannot fetch tag v9.9.8"):
        upstream_tests.local_repo(fork_root, a.as_uri(), "v9.9.8")


def test_help_says_the_repository_must_be_trusted():
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "fork.py"), "test-upstream", "--help"],
                         capture_output=True, text=True)
    text = " ".join(res.stdout.split())
    assert res.returncode == 0 and "trust" in text and "conftest.py" in text, text
    assert "trust" in (ROOT / "docs" / "maintaining.md").read_text()


def test_a_distribution_that_imports_is_never_removed(tmp_path, monkeypatch):
    """sentencepiece's top_level.txt names 'sentencepiece/__init__': imported as a module name, it failed, and a
    working sentencepiece was uninstalled."""
    site = tmp_path / "site"
    (site / "fakepiece_f9").mkdir(parents=True)
    (site / "fakepiece_f9" / "__init__.py").write_text("from ._version import v  # noqa\n")
    (site / "fakepiece_f9" / "_version.py").write_text("v = 1\n")
    info = site / "fakepiece_f9-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fakepiece-f9\nVersion: 1.0\n")
    (info / "top_level.txt").write_text("fakepiece_f9/__init__\nfakepiece_f9/_version\n")
    (info / "RECORD").write_text("fakepiece_f9/__init__.py,,\nfakepiece_f9/_version.py,,\n")
    _fake_dist(site, "broken-dist-f9", module="broken_module_f9", source="raise RuntimeError('nms')\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
    assert upstream_tests.broken_imports({"fakepiece-f9", "broken-dist-f9"}) == \
        {"broken-dist-f9": "import broken_module_f9: RuntimeError: nms"}


def test_the_report_names_the_code_under_test(tmp_path, monkeypatch):
    """After a rebase to 0.40.0 the header said 'diffusers 0.4.2+flash.1', the installed metadata's version."""
    pkg = tmp_path / "site" / "diffusers"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise SystemExit('not imported')\n")
    (pkg / "_fork_version.py").write_text('# generated\n__version__ = "9.8.7+flash.3"\n')
    (pkg / ".upstream-manifest.json").write_text(json.dumps({"upstream": "9.8.7", "files": {}}))
    monkeypatch.setenv("PYTHONPATH", str(pkg.parent))
    got = upstream_tests.fork_under_test()
    assert got.startswith("diffusers 9.8.7+flash.3 (upstream 9.8.7") and str(pkg) in got, got
