"""What a user meets outside examples/generate.py: the tiny local pipeline (no temp-folder litter, images of
the size asked for), `diffusers-cli env` without transformers, "auto" on a pipeline following the
process-wide backend, and the README's statements (tests/test_readme_examples.py runs its Python examples)."""
import ast
import re
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


# ------------------------------------------------------------------------------ item 6: no litter

def test_building_pipelines_leaves_no_tokenizer_folders(tmp_path, monkeypatch):
    from diffusers.flash import local_pipelines

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where mkdtemp/TemporaryDirectory put folders
    pipe = local_pipelines.stable_diffusion("tiny")
    local_pipelines.make_tokenizer()
    assert list(tmp_path.iterdir()) == []
    ids = pipe.tokenizer("a castle at dawn").input_ids  # the tokenizer works without its files
    assert ids[0] == pipe.tokenizer.bos_token_id and ids[-1] == pipe.tokenizer.eos_token_id and len(ids) > 3
    pipe.tokenizer.save_pretrained(tmp_path / "saved")
    from transformers import CLIPTokenizer

    assert CLIPTokenizer.from_pretrained(tmp_path / "saved")("a castle at dawn").input_ids == ids
    kept = tmp_path / "kept"
    local_pipelines.make_tokenizer(str(kept))  # a folder given is the caller's: kept
    assert sorted(p.name for p in kept.iterdir()) == ["merges.txt", "vocab.json"]


def test_default_image_size_is_the_png_size():
    from diffusers.flash import local_pipelines

    assert local_pipelines.default_image_size("tiny") == 64 and local_pipelines.vae_scale_factor("tiny") == 8
    assert local_pipelines.default_image_size("sd1") == 512 and local_pipelines.vae_scale_factor("sd1") == 8


@pytest.mark.parametrize("height,width", [(64, 64), (16, 40)])
def test_the_tiny_pipeline_gives_the_size_asked_for(height, width):
    """Issue 33 item 6: as a library, as in the CLI (generate.py's 64x64 default is the pipeline's own size)."""
    from diffusers.flash import local_pipelines

    pipe = local_pipelines.stable_diffusion("tiny")
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a castle", height=height, width=width, num_inference_steps=1).images[0]
    assert image.size == (width, height)
    factor = local_pipelines.vae_scale_factor("tiny")
    assert pipe.vae.config.block_out_channels and 2 ** (len(pipe.vae.config.block_out_channels) - 1) == factor
    docs = " ".join(f.__doc__ for f in (local_pipelines.vae_scale_factor, local_pipelines.default_image_size,
                                        local_pipelines.stable_diffusion))
    assert "2 for the tiny" not in docs and "1/8" in docs


# ------------------------------------------------------------- item 7: diffusers-cli env, no transformers

def test_env_command_runs_without_transformers(monkeypatch, capsys):
    from diffusers.commands import env

    monkeypatch.setattr(env, "is_transformers_available", lambda: False)
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    info = env.EnvironmentCommand().run()
    assert info["Transformers version"] == "not installed"
    assert "- Transformers version: not installed" in capsys.readouterr().out


def test_env_command_reports_transformers_when_installed(capsys):
    import transformers

    from diffusers.commands import env

    assert env.EnvironmentCommand().run()["Transformers version"] == transformers.__version__


# ------------------------------------------------------- item 9: "auto" follows the process default

@pytest.fixture
def process_backend():
    from diffusers.flash.attention import dispatch as ad

    yield ad
    ad.set_attention_backend(None)


def attention_modules(pipe):
    from diffusers.flash.attention.mixin import attention_classes

    return [m for model in (pipe.unet, pipe.vae) for m in model.modules()
            if isinstance(m, attention_classes())]


def test_auto_on_a_pipeline_follows_the_process_wide_backend(process_backend, monkeypatch):
    from diffusers.flash import local_pipelines

    ad = process_backend
    monkeypatch.delenv(ad.ENV_VAR, raising=False)
    pipe = local_pipelines.stable_diffusion("tiny")
    modules = attention_modules(pipe)
    pipe.set_attention_backend("auto")
    ad.set_attention_backend("math")  # later, process-wide: not silently ignored
    assert modules and {ad.current(m) for m in modules} == {"math"}
    pipe.set_attention_backend("sdpa")  # a name pins: over the process-wide default
    assert {ad.current(m) for m in modules} == {"sdpa"}
    with ad.attention_backend("math"):  # the context is strongest
        assert {ad.current(m) for m in modules} == {"math"}
    pipe.unet.set_attention_backend("auto")  # unpins the UNet only
    assert {ad.current(m) for m in pipe.unet.modules() if m in modules} == {"math"}
    assert {ad.current(m) for m in pipe.vae.modules() if m in modules} == {"sdpa"}
    pipe.set_attention_backend(None)
    ad.set_attention_backend(None)
    monkeypatch.setenv(ad.ENV_VAR, "math")
    assert {ad.current(m) for m in modules} == {"math"}  # then the environment
    monkeypatch.delenv(ad.ENV_VAR)
    assert {ad.current(m) for m in modules} == {"auto"}
    with pytest.raises(ad.AttentionBackendError):
        pipe.set_attention_backend("bogus")


# ---------------------------------------------------------------------------------- item 9: README

def section(title):
    start = README.index(f"## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end > 0 else None]


def test_readme_says_how_to_get_a_cpu_torch():
    text = section("Install and the two commands")
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in text
    assert "Without an NVIDIA GPU" in text


def test_readme_says_how_long_the_two_commands_take():
    """Issue 33 item 7."""
    text = " ".join(section("Install and the two commands").split())
    assert "the main job then runs in seconds on a CPU" in text
    assert re.search(r"The tests take about \d+ minutes on 2 CPU cores", text)


def test_readme_attention_example_imports_what_it_uses():
    (code,) = re.findall(r"```python\n(.*?)```", section("Attention backends"), flags=re.S)
    tree = ast.parse(code)
    imported = {alias.asname or alias.name.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, (ast.Import, ast.ImportFrom)) for alias in node.names}
    assigned = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    used = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)}
    assert used <= imported | assigned | set(dir(__builtins__)), used - imported - assigned
    assert "dispatch" not in code  # the internal module: the public names come from diffusers.flash


def test_readme_states_the_backend_precedence():
    text = " ".join(section("Attention backends").split())
    assert "Which setting wins, strongest first" in text
    assert 'pipe.set_attention_backend("auto")` is not a pin' in text
    order = [text.index(s) for s in ("`with attention_backend(name):`", "`pipe.set_attention_backend(name)`",
                                     "`set_attention_backend(name)` (the process-wide",
                                     "`DIFFUSERS_ATTENTION_BACKEND=name`", "then `auto`")]
    assert order == sorted(order)


def test_readme_install_line_needs_no_placeholder_and_is_for_users_only():
    """Issue 33 item 9: no OWNER to edit without saying how; the maintainer material lives in
    docs/maintaining.md."""
    text = " ".join(section("Install and the two commands").split())
    assert "OWNER" not in README and "git remote get-url origin" in text and "pip install /path/to/the/clone" in text
    for maintainer in ("## How the fork is built", "What the fork tool checks", "test-upstream", "Applied-Upstream"):
        assert maintainer not in README, maintainer
    maintaining = (ROOT / "docs" / "maintaining.md").read_text(encoding="utf-8")
    assert "## How the fork is built: a patch series" in maintaining and "### What the fork tool checks" in maintaining
    assert len(README.split()) < 1600


def test_readme_says_what_generate_does_on_a_second_prompt_and_a_rerun():
    text = " ".join(section("generate.py").split())
    assert "other prompts or settings get a new folder" in text and "resumes" in text
    assert "a mistake gets one line" in text and "Ctrl-C stops it within a second or two" in text
