"""examples/generate.py's run folder under attack and mishap (issue 32 defects 6, 7, 9, 12, 13, 15, 16): the
folder is claimed in one step, no write follows a planted symlink, another run's temporaries are kept, damaged
files and a full disk get one line, a FIFO does not hang the run, files get the umask's mode, and a kept image
must be a PNG of the run's size."""
import errno
import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "generate.py"
SMALL = ["--height", "16", "--width", "16", "--steps", "2", "--num-images-per-prompt", "2", "--device", "cpu"]
FILES = ["00000-0000.png", "00000-0001.png"]


@pytest.fixture(scope="module")
def gen():
    spec = importlib.util.spec_from_file_location("generate_run_folder_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def reference(gen, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    gen.main(["--out", str(out), "--name", "run", *SMALL])
    return out / "run"


def copy_run(reference, out, name="run"):
    folder = out / name
    folder.mkdir(parents=True)
    for f in ["run.json", "manifest.jsonl", *FILES]:
        (folder / f).write_bytes((reference / f).read_bytes())
    return folder


def images(folder):
    return {f: (folder / f).read_bytes() for f in FILES}


def error_of(gen, argv):
    with pytest.raises(SystemExit) as e:
        gen.main(argv)
    message = str(e.value.code)
    assert message.startswith("generate.py: error: ") and "\n" not in message, message
    return message


# ---------------------------------------------------------------- defect 6: check and claim in one step

def test_a_second_run_with_other_settings_started_meanwhile_is_refused(gen, tmp_path, monkeypatch):
    """Run B (--seed 2) starts while run A (--seed 1) loads its model, on the same --name: B is refused, and
    run.json keeps A's settings, with which A's images were made."""
    real_load = gen.load_pipeline
    seen = []

    def load_while_another_run_starts(*args, **kwargs):
        if not seen:
            seen.append(True)
            with pytest.raises(SystemExit) as e:
                gen.main(["--out", str(tmp_path), "--name", "shared", "--seed", "2", *SMALL])
            seen.append(str(e.value.code))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(gen, "load_pipeline", load_while_another_run_starts)
    gen.main(["--out", str(tmp_path), "--name", "shared", "--seed", "1", *SMALL])
    assert "holds images made with other settings" in seen[1] and "--seed changed (1 -> 2)" in seen[1]
    assert json.loads((tmp_path / "shared" / "run.json").read_text())["seed"] == 1


def test_a_run_that_fails_before_any_image_gives_the_folder_back(gen, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise gen.UsageError("cannot load --model: broken")

    monkeypatch.setattr(gen, "load_pipeline", fail)
    error_of(gen, ["--out", str(tmp_path / "out"), "--name", "n", *SMALL])
    assert not (tmp_path / "out").exists()  # the claimed run.json and the folders made are gone again


# ------------------------------------------------------------------- defect 7: no write through a symlink

def test_a_planted_manifest_part_symlink_is_never_written_through(gen, reference, tmp_path):
    folder = copy_run(reference, tmp_path)
    (folder / FILES[1]).unlink()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (folder / "manifest.part-0.jsonl").symlink_to(victim)
    message = error_of(gen, ["--out", str(tmp_path), "--name", "run", *SMALL])
    assert "manifest.part-0.jsonl is a symbolic link, not a regular file" in message
    assert victim.read_text() == "precious\n"


def test_the_writer_refuses_a_link_and_its_temporary_names_cannot_be_guessed(gen, reference, tmp_path):
    folder = copy_run(reference, tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (folder / "manifest.part-0.jsonl").symlink_to(victim)
    with pytest.raises(gen.UsageError, match="is a symbolic link"):
        gen.Writer(folder, 0)
    (folder / "manifest.part-0.jsonl").unlink()
    # the name the writer used to take, .FILE.PID.tmp, planted as a link to the victim
    (folder / f".{FILES[0]}.{os.getpid()}.tmp").symlink_to(victim)
    writer = gen.Writer(folder, 0)
    row = dict(json.loads((reference / "manifest.jsonl").read_text().splitlines()[0]))
    writer.save(Image.open(reference / FILES[0]), row)
    writer.close()
    assert victim.read_text() == "precious\n"
    assert (folder / FILES[0]).read_bytes() == (reference / FILES[0]).read_bytes()


# ------------------------------------------------------- defect 9: another run's temporaries are kept

def test_startup_removes_only_temporaries_of_dead_processes(gen, reference, tmp_path):
    folder = copy_run(reference, tmp_path)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        in_flight = folder / f".{FILES[1]}.{live.pid}.1a2b3c4d.tmp"
        left = folder / f".{FILES[1]}.{dead.pid}.5e6f7a8b.tmp"
        in_flight.write_bytes(b"half a png")
        left.write_bytes(b"half a png")
        (folder / FILES[1]).unlink()
        gen.main(["--out", str(tmp_path), "--name", "run", *SMALL])
        assert in_flight.exists()  # another run is writing it
        assert not left.exists()  # its writer is gone
    finally:
        live.kill()
        live.wait()
    assert images(folder) == images(reference)


def test_stale_temporary_names(gen):
    from diffusers.flash.fsio import stale_temporary

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert stale_temporary(f".00000-0000.png.{dead.pid}.ab12.tmp")
    assert stale_temporary(f".run.json.{dead.pid}.k2j_3x9q.tmp")
    assert not stale_temporary(f".00000-0000.png.{os.getpid()}.ab12.tmp")  # this process
    assert not stale_temporary(f".00000-0000.png.{os.getppid()}.ab12.tmp")  # alive
    assert not stale_temporary(".write-test-abc")  # no pid: not provably stale
    assert not stale_temporary("00000-0000.png")


# ------------------------------------------------------------------- defect 12: one line, not a traceback

def test_a_full_disk_is_one_line_naming_the_folder(gen, tmp_path, monkeypatch):
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd to name an fd's file")
    real_fsync = os.fsync

    def fsync(fd):
        if ".png." in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")  # as the kernel gives it: no file name
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    message = error_of(gen, ["--out", str(tmp_path), "--name", "full", *SMALL])
    assert f"cannot write {tmp_path / 'full'}/: No space left on device; a rerun resumes once fixed" in message
    assert not [f for _, _, files in os.walk(tmp_path) for f in files if f.endswith(".tmp")]


@pytest.mark.parametrize("text", ["[]", "null", "3", '"x"', "[" * 100000 + "]" * 100000, '{"prompts": [1, 2]}'],
                         ids=["list", "null", "number", "string", "nested-100000-deep", "prompts-not-objects"])
def test_a_run_json_that_is_not_settings_is_one_line(gen, tmp_path, text):
    folder = tmp_path / "n"
    folder.mkdir()
    (folder / "run.json").write_text(text)
    message = error_of(gen, ["--out", str(tmp_path), "--name", "n", *SMALL])
    assert "run.json is damaged" in message or "holds images made with other settings" in message


def test_bad_manifest_rows_are_dropped_with_a_note_not_a_crash(gen, reference, tmp_path, capsys):
    folder = copy_run(reference, tmp_path)
    good = (folder / "manifest.jsonl").read_text()
    bad = ['[]', 'null', '{"file": 3}', '{"file": "00000-0000.png", "prompt_index": "x", "image_index": 0}',
           '{"file": "../../etc/passwd", "prompt_index": 0, "image_index": 0, "finished": 1}',
           '[' * 100000 + ']' * 100000]
    (folder / "manifest.jsonl").write_text(good + "\n".join(bad) + "\n")
    (folder / FILES[1]).unlink()
    gen.main(["--out", str(tmp_path), "--name", "run", *SMALL])
    captured = capsys.readouterr()
    assert "6 damaged manifest rows dropped" in captured.err
    rows = [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]
    assert [r["file"] for r in rows] == FILES
    gen.main(["--out", str(tmp_path), "--name", "run", *SMALL])  # and the next rerun is clean
    assert "damaged" not in capsys.readouterr().err


# -------------------------------------------------------------- defect 13: a FIFO, a run-folder symlink

def test_a_fifo_named_manifest_jsonl_is_refused_at_once(gen, reference, tmp_path):
    folder = copy_run(reference, tmp_path)
    (folder / "manifest.jsonl").unlink()
    os.mkfifo(folder / "manifest.jsonl")

    def hung(*_):
        raise TimeoutError("the run hung on the FIFO")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)
    try:
        message = error_of(gen, ["--out", str(tmp_path), "--name", "run", *SMALL])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert "manifest.jsonl is a FIFO, not a regular file" in message


def test_a_run_folder_symlink_cannot_send_output_outside_out(gen, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "run").symlink_to(outside)
    message = error_of(gen, ["--out", str(out), "--name", "run", *SMALL])
    assert f"{out / 'run'} is a symbolic link, not a folder" in message
    assert list(outside.iterdir()) == []


# ---------------------------------------------------------------------- defect 15: the umask's mode

@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def test_atomic_write_gives_the_mode_open_gives(tmp_path, umask_027):
    from diffusers.flash import fsio

    fsio.atomic_write(tmp_path / "a", b"x")
    with open(tmp_path / "b", "w"):
        pass
    assert (tmp_path / "a").stat().st_mode & 0o777 == (tmp_path / "b").stat().st_mode & 0o777 == 0o640
    fsio.atomic_write(tmp_path / "c", b"x", mode=0o600)  # for a caller whose file is private
    assert (tmp_path / "c").stat().st_mode & 0o777 == 0o600


def test_run_json_manifest_and_pngs_get_the_same_mode(gen, tmp_path, umask_027):
    gen.main(["--out", str(tmp_path), "--name", "m", *SMALL])
    folder = tmp_path / "m"
    modes = {f: (folder / f).stat().st_mode & 0o777 for f in ["run.json", "manifest.jsonl", *FILES]}
    assert set(modes.values()) == {0o640}, modes


# ------------------------------------------------------- defect 16: a kept image is a PNG of the run's size

def test_resume_remakes_a_png_of_another_size_or_another_format(gen, reference, tmp_path, capsys):
    folder = copy_run(reference, tmp_path)
    Image.new("RGB", (8, 8)).save(folder / FILES[0], format="PNG")
    Image.new("RGB", (16, 16)).save(folder / FILES[1], format="GIF")
    gen.main(["--out", str(tmp_path), "--name", "run", *SMALL])
    err = capsys.readouterr().err
    assert f"{FILES[0]} is 8x8, not 16x16: making it again" in err
    assert f"{FILES[1]} is a GIF image, not a PNG: making it again" in err
    assert images(folder) == images(reference)
