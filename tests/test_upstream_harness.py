"""fork.py test-upstream: the plugin's Hub classification on synthetic errors, and the whole harness
run on a tiny synthetic 'upstream' git repository (offline, CPU)."""
import json
import os
import re
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


def test_transformers_oserror_naming_the_repo_it_loaded_while_offline(offline, monkeypatch):
    def from_pretrained(pretrained_model_name_or_path):
        raise OSError(f"Can't load image processor for '{pretrained_model_name_or_path}'. Make sure ...")

    err = raised(from_pretrained, "openai/clip-vit-base-patch32")
    assert plugin.hub_repo(err) == "openai/clip-vit-base-patch32"
    monkeypatch.delenv("HF_HUB_OFFLINE")  # online, the same error is a real failure
    assert plugin.hub_repo(err) is None


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


@pytest.mark.skip(reason="test is slow")
def test_slow():
    raise AssertionError("never runs")


class GPUTests(unittest.TestCase):
    @unittest.skipIf(True, "This test requires a GPU")
    def test_gpu(self):
        raise AssertionError("never runs")
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
    (repo / "src").mkdir(exist_ok=True)
    (repo / "src" / "not_a_test.py").write_text("raise SystemExit('upstream code must not be laid out')\n")
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
    assert re.match(r"test-upstream: 1 passed, 2 failed, 2 skipped for the Hub, 2 skipped by upstream .* in "
                    r"\d+\.\ds$", line), line
    assert "needs the Hugging Face Hub: fake-org/fake-unet" in out
    assert "needs the Hugging Face Hub: fake-org/fake-clip" in out
    assert "FAILED tests/test_fake.py::test_unrelated_oserror_fails" in out
    laid = fork_root / "upstream-tests" / "v9.9.9"
    assert (laid / "hf-internal-testing" / "dummy" / "data.txt").read_text() == "tagged"
    assert not (laid / "src").exists()
    outcomes = json.loads((laid / "outcomes.json").read_text())["outcomes"]
    assert outcomes["tests/test_fake.py::test_needs_the_hub"] == ["hub", "fake-org/fake-unet"]
    assert outcomes["tests/test_fake.py::test_fails"][0] == "failed"


@pytest.mark.slow
def test_harness_exit_zero_when_nothing_fails_and_pytest_args_pass_through(fake_upstream, fork_root, capfd):
    rc = upstream_tests.run(fork_root, str(fake_upstream), "v9.9.9", ["-k", "passes or hub or slow"])
    out = capfd.readouterr().out
    assert rc == 0, out
    assert "test-upstream: 1 passed, 0 failed, 2 skipped for the Hub, 1 skipped by upstream" in out


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
def test_defective():
    # upstream's own test is wrong here
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
    return {"test_upstream.py::test_defective": (plugin.fingerprint(body), "fixed upstream in the test by #1")}


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
