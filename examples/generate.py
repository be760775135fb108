#!/usr/bin/env python3
"""Generate images with Stable Diffusion: one prompt or a file of them, on one device or many.

  python examples/generate.py                         # built-in tiny model: one 64x64 image, seconds on a CPU
  python examples/generate.py "a castle at dawn"      # another prompt: a new folder, the old images stay
  python examples/generate.py "a castle at dawn" --model CompVis/stable-diffusion-v1-4 --num-images-per-prompt 4
  accelerate launch --num_processes 8 examples/generate.py --prompts prompts.jsonl --model path/to/sd-v1-4

The model: without --model, the built-in tiny pipeline (diffusers.flash.local_pipelines.stable_diffusion("tiny"),
random weights, nothing downloaded): it makes 64x64 noise-like images in 10 steps, a check that everything
works, not pictures; its latents are 1/8 of the image's side, as Stable Diffusion's. --model takes a local
folder (one that pipe.save_pretrained wrote: it holds model_index.json) or a Hub repo id like
CompVis/stable-diffusion-v1-4 (downloaded once into the Hugging Face cache; offline, it must be there already).
Real models make 512x512 images in 50 steps by default.

Prompts: a PROMPT argument (default, when none is given: "a photograph of an astronaut riding a horse"; an
empty PROMPT is refused), or --prompts FILE: a
text file with one prompt a line, or a JSONL file (named *.jsonl, or whose first line starts with "{") with
one JSON object a line, e.g. {"prompt": "a red fox", "seed": 7, "negative_prompt": "blurry"}. "prompt" is
required; "seed" (an integer from 0 to 2**63 - 1) and "negative_prompt" are optional; other keys are refused.

Where images go: each run gets its own folder under --out (default: out/), named after the first prompt (or
the prompts file) plus a hash of every setting that changes the pixels (model, prompts, seeds, number of
images, steps, guidance, size, batch size, dtype, attention backend, device type), e.g.
out/a-castle-at-dawn-5e1f04a2/. A run with other settings therefore goes to a new folder and the old images
stay; --name NAME names the folder yourself. In the folder:
  PPPPP-IIII.png   prompt index P, image index I within that prompt, both from 0 (00002-0001.png: the
                   second image of the third prompt)
  manifest.jsonl   one JSON row an image: file, prompt, negative_prompt, seed, prompt_index, image_index,
                   model, steps, guidance_scale, height and width of the PNG as written, dtype, device,
                   backend, batch_size, seconds, nsfw
  run.json         the settings of the run
The last line printed names the folder.

Resume: run the same command again after a stop (Ctrl-C, a kill, a crash): it continues in the same folder,
keeps the images already written, makes again any PNG that does not decode (empty or cut short) or is not a
PNG of the run's size, and the result is the same, byte for byte, as an uninterrupted run. With nothing left
to make it loads no model. A run claims its folder (writes run.json) before loading the model, so a second
run started meanwhile with other settings is refused, with what changed, as a --name folder that holds images
made with other settings is. Two runs with the same settings may share a folder: each removes only the
temporary files of runs that are no longer running. Nothing is written or read through a symbolic link, a
FIFO or another special file in a run folder, nor through a run folder that is a link: refused in one line.

Reproducibility: image I of prompt P starts from latents drawn on the CPU from its own seed: derived from
(--seed, P, I), or S + I when the prompt's JSONL line gives "seed": S; the manifest records each image's
seed (to remake one, give its seed in JSONL). Images are batched by their global index and whole batches
are handed to the processes, so the PNG bytes depend neither on the number of processes nor on
interruptions. Another --batch-size gives the same images up to float rounding (a pixel value may move by 1).

Limits: --height and --width are multiples of 8 up to 256 latents a side (2048 pixels for Stable Diffusion,
whose latents are 1/8 of the side), and height x width at most 16,384 latents (1024x1024): the UNet attends
over every latent, and beyond that one attention call needs more than 8 GB under the math backend, while
Stable Diffusion 1.x was trained at 512x512. --steps is at most 1000 (the schedulers' training timesteps);
--guidance-scale is from -100 to 100 (far larger scales overflow to a black image). Every value is checked
before any model loads; a mistake gets one line.
Ctrl-C stops the run within a second or two on a quiet machine, whatever it is doing; a rerun resumes.

Needs torch and transformers; accelerate only to run several processes (accelerate launch).
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import io
import json
import math
import os
import re
import secrets
import signal
import socket
import stat
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator
from urllib.parse import urlparse

if TYPE_CHECKING:  # torch is imported late: bad input is refused before the heavy imports
    import torch

DEFAULT_PROMPT = "a photograph of an astronaut riding a horse"
PROMPT_KEYS = {"prompt", "seed", "negative_prompt"}
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
ENV_BACKEND = "DIFFUSERS_ATTENTION_BACKEND"
TINY = "local_pipelines:tiny:vae8"  # the model in run.json and the folder hash: the four-block VAE, latents 1/8
FAST_PATH_TOLERANCE = "images within 1/255 of the plain pipeline's"
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?")


class UsageError(Exception):
    """Bad input from the user: reported as one line, without a stack trace."""


class Interrupted(Exception):
    """Ctrl-C: reported as one line saying what is saved and that a rerun resumes; exit status 130."""


# ----------------------------------------------------------------------------------------- arguments

MAX_STEPS = 1000  # the schedulers' training timesteps: more steps than these cannot be spaced
MAX_SIDE_LATENTS = 256  # a side of at most 256 latents: 2048 pixels for Stable Diffusion
MAX_LATENTS = 128 * 128  # height x width in latents: 1024x1024 pixels for Stable Diffusion
MAX_IMAGES_PER_PROMPT = 10000  # file names give the image index four digits
MAX_BATCH = 64
MAX_SEED = 2**63 - 1
BACKENDS = ("auto", "flash-attn-4", "flash-attn", "sdpa-cudnn", "sdpa-flash", "sdpa-efficient", "sdpa", "math")
DEVICE = re.compile(r"(cpu|cuda|mps|xpu|meta)(:[0-9]+)?")


def whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, not {text!r}") from None


def positive_int(text: str) -> int:
    value = whole_number(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text}")
    return value


def size_int(text: str) -> int:
    value = positive_int(text)
    if value % 8:
        raise argparse.ArgumentTypeError(f"must be a multiple of 8, not {text} (latents are 1/8 of a side)")
    return value


def steps_int(text: str) -> int:
    value = positive_int(text)
    if value > MAX_STEPS:
        raise argparse.ArgumentTypeError(f"at most {MAX_STEPS} (the scheduler's training timesteps), not {text}")
    return value


def images_int(text: str) -> int:
    value = positive_int(text)
    if value > MAX_IMAGES_PER_PROMPT:
        raise argparse.ArgumentTypeError(f"at most {MAX_IMAGES_PER_PROMPT} (file names give the image index four "
                                         f"digits), not {text}")
    return value


def batch_int(text: str) -> int:
    value = positive_int(text)
    if value > MAX_BATCH:
        raise argparse.ArgumentTypeError(f"at most {MAX_BATCH} images per pipeline call (each needs its own "
                                         f"activations; larger batches gain no speed), not {text}")
    return value


def seed_int(text: str) -> int:
    value = whole_number(text)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be an integer from 0 to 2**63 - 1, not {text}")
    return value


MAX_GUIDANCE = 100.0  # Stable Diffusion is run at 1-20; far larger scales overflow the latents to NaN


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, not {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, not {text}")
    return value


def guidance_scale(text: str) -> float:
    value = finite_float(text)
    if abs(value) > MAX_GUIDANCE:
        raise argparse.ArgumentTypeError(f"must be from -{MAX_GUIDANCE:g} to {MAX_GUIDANCE:g}, not {text}: far larger "
                                         f"scales overflow the latents and give a black image")
    return value


class Once(argparse.Action):
    """Store an option's value; refuse the option a second time (argparse alone silently keeps the last)."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = namespace.__dict__.setdefault("_given", {})
        if self.dest in given:
            parser.error(f"{option_string} given twice ({given[self.dest]}, then {values}): give it once")
        given[self.dest] = values
        setattr(namespace, self.dest, values)


class Parser(argparse.ArgumentParser):
    """argparse, whose mistakes end in one line (main prints it), not usage lines and then the error."""

    def error(self, message: str):
        raise UsageError(f"{message} (--help tells each option)" if message.startswith("argument ") else message)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = Parser(prog="generate.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt_arg", nargs="?", metavar="PROMPT", help=f"the prompt (default: {DEFAULT_PROMPT!r})")
    p.add_argument("--prompt", action=Once, help="the prompt (same as the positional argument)")
    p.add_argument("--prompts", action=Once, metavar="FILE",
                   help="text file (a prompt a line) or JSONL file (keys: prompt, seed, negative_prompt)")
    p.add_argument("--negative-prompt", action=Once, default="",
                   help="negative prompt for prompts that do not give one")
    p.add_argument("--model", action=Once, help="local folder or Hub repo id (default: the built-in tiny random "
                                                "pipeline, which makes 64x64 images)")
    p.add_argument("--num-images-per-prompt", action=Once, type=images_int, default=1,
                   help=f"1 to {MAX_IMAGES_PER_PROMPT} (default: 1)")
    p.add_argument("--batch-size", action=Once, type=batch_int, default=1,
                   help=f"images per pipeline call, 1 to {MAX_BATCH} (default: 1)")
    p.add_argument("--steps", action=Once, type=steps_int,
                   help=f"denoising steps, 1 to {MAX_STEPS} (default: 50, or 10 for the tiny model)")
    p.add_argument("--guidance-scale", action=Once, type=guidance_scale, default=7.5,
                   help="classifier-free guidance, from -100 to 100; 1 or less turns it off (default: 7.5)")
    p.add_argument("--height", action=Once, type=size_int,
                   help="image height in pixels, a multiple of 8 (default: 512, or 64 for the tiny model)")
    p.add_argument("--width", action=Once, type=size_int,
                   help="image width in pixels, a multiple of 8 (default: 512, or 64 for the tiny model)")
    p.add_argument("--seed", action=Once, type=seed_int, default=0,
                   help="base seed, one integer from 0 to 2**63 - 1; each image's seed derives from it (default: 0)")
    p.add_argument("--attention-backend", action=Once,
                   help=f"attention backend (auto, math, sdpa, flash-attn, ...); default: ${ENV_BACKEND} or auto")
    p.add_argument("--dtype", action=Once, choices=sorted(DTYPES), help="default: fp16 on CUDA, fp32 elsewhere")
    p.add_argument("--out", action=Once, default="out", help="folder that holds the run folders (default: out/)")
    p.add_argument("--name", action=Once,
                   help="this run's folder under --out (default: from the first prompt and the settings' hash)")
    p.add_argument("--fast-path", action="store_true",
                   help=f"pipe.enable_fast_path(compile=True) in each process: CUDA graphs and torch.compile (about "
                        f"a minute of warm-up in a fresh process, faster steps after; {FAST_PATH_TOLERANCE}, so "
                        "fast-path runs get their own folder); without CUDA it says why once and runs as before, "
                        "in the plain run's folder (the images are the same)")
    p.add_argument("--device", action=Once, help="torch device, e.g. cpu, cuda, cuda:1 (default: the GPU if "
                                                 "there is one, else the CPU; under accelerate, this process's)")
    p.add_argument("--_stop-after", dest="stop_after", type=int, help=argparse.SUPPRESS)  # tests: die mid-run
    args, extra = p.parse_known_args(argv)

    def follows(token: str) -> str:
        k = len(argv) - 1 - argv[::-1].index(token)
        before = " ".join(argv[max(k - 2, 0):k] if k >= 2 and argv[k - 2].startswith("-") else argv[max(k - 1, 0):k])
        return f" (it follows '{before}')" if before else ""

    one_value = "each option takes one value (--seed takes one integer, not a list)"
    if extra and extra[0].startswith("-"):
        p.error(f"unrecognized option {extra[0]!r}; --help lists them")
    if extra:
        p.error(f"unrecognized argument {extra[0]!r}{follows(extra[0])}: {one_value}, and there is one prompt "
                "(several: --prompts FILE)")
    if args.prompt_arg is not None and _is_number(args.prompt_arg):
        p.error(f"{args.prompt_arg!r} would be taken as the prompt{follows(args.prompt_arg)}: {one_value}. For a "
                f"numeric prompt, write --prompt {args.prompt_arg}")
    if args.prompt_arg is not None and args.prompt is not None:
        p.error("give the prompt either positionally or with --prompt, not both")
    args.prompt = args.prompt if args.prompt is not None else args.prompt_arg
    if args.prompt is not None and not args.prompt.strip():
        p.error(f"the prompt is empty; give one, or leave it out for the default ({DEFAULT_PROMPT!r})")
    if args.prompt is not None and args.prompts:
        p.error("give either a prompt or --prompts FILE, not both")
    if args.name is not None:
        if not args.name.strip():
            p.error("--name is empty; give a folder name, or leave --name out for one made from the prompt")
        if args.name in (".", "..") or "/" in args.name or os.sep in args.name or "\0" in args.name:
            p.error(f"--name {args.name!r}: a plain folder name, without '/' (not . or ..)")
    if not args.out.strip() or "\0" in args.out:
        p.error("--out is empty; give a folder (default: out)")
    if args.device is not None:
        if not DEVICE.fullmatch(args.device.strip()):
            p.error(f"--device {args.device}: not a device name (cpu, cuda, cuda:1, mps, ...)")
        if args.device.startswith("meta"):
            p.error(f"--device {args.device}: the meta device holds no data, so it cannot make images; use cpu, "
                    "cuda or mps")
    if args.attention_backend is not None:
        args.backend_source = f"--attention-backend {args.attention_backend}"
    elif os.environ.get(ENV_BACKEND, "").strip():
        args.attention_backend = os.environ[ENV_BACKEND].strip()
        args.backend_source = f"${ENV_BACKEND}={args.attention_backend}"
    else:
        args.attention_backend, args.backend_source = "auto", "the attention backend auto"
    if args.attention_backend not in BACKENDS:
        raise UsageError(f"{args.backend_source}: unknown attention backend; choose one of: {', '.join(BACKENDS)}")
    world = os.environ.get("WORLD_SIZE", "1").strip() or "1"
    if not world.isdigit() or int(world) < 1:
        raise UsageError(f"WORLD_SIZE={os.environ['WORLD_SIZE']}: not a positive whole number (accelerate launch "
                         "and torchrun set it to the number of processes); unset it to run one process")
    args.steps = args.steps or (10 if args.model is None else 50)
    return args

# ------------------------------------------------------------------------------------------- prompts

def parse_prompt_line(line: str, where: str) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise UsageError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(row, dict):
        raise UsageError(f"{where}: expected a JSON object like {{\"prompt\": \"...\"}}, got {type(row).__name__}")
    unknown = set(row) - PROMPT_KEYS
    if unknown:
        raise UsageError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(PROMPT_KEYS)}")
    if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
        raise UsageError(f"{where}: needs a non-empty string \"prompt\"")
    seed = row.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise UsageError(f"{where}: \"seed\" must be an integer from 0 to 2**63 - 1, not {seed!r}")
    if not isinstance(row.get("negative_prompt", ""), str):
        raise UsageError(f"{where}: \"negative_prompt\" must be a string")
    return row


def read_prompts_file(path: str) -> list[dict]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read prompts file {path}: {e}") from None
    lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise UsageError(f"prompts file {path} has no prompts")
    if path.endswith(".jsonl") or lines[0][1].startswith("{"):
        return [parse_prompt_line(line, f"{path} line {n}") for n, line in lines]
    return [{"prompt": line} for _, line in lines]


def load_prompts(args: argparse.Namespace) -> list[dict]:
    rows = read_prompts_file(args.prompts) if args.prompts else [{"prompt": args.prompt or DEFAULT_PROMPT}]
    for row in rows:
        row.setdefault("negative_prompt", args.negative_prompt)
    return rows


# ---------------------------------------------------------------------------------------------- model

def looks_like_path(text: str) -> bool:
    """A local path rather than a Hub repo id (``name`` or ``owner/name``): it starts with '.', '~' or a
    separator, is not a valid repo id (more than one '/', a backslash, other characters), or its first
    component is a folder here (``models/sd-v1-4`` with ``./models``)."""
    if text.startswith((".", "~", "/", os.sep)) or "\\" in text or not HUB_ID.fullmatch(text) or ".." in text:
        return True
    return "/" in text and os.path.isdir(text.split("/")[0])


def _hub_unreachable() -> str | None:
    """Why the Hub cannot be reached (offline mode, or no connection within a few seconds), else None."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    try:
        from huggingface_hub import constants

        endpoint = constants.ENDPOINT
    except (ImportError, AttributeError):
        endpoint = "https://huggingface.co"
    url = urlparse(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=5).close()
    except OSError as e:
        return f"{url.hostname} cannot be reached: {e.strerror or e}"
    return None


def check_model(args: argparse.Namespace) -> None:
    """Before anything heavy: a --model path must exist and hold a pipeline; a Hub repo id must be cached
    or the Hub reachable. Sets args.model_ref (what from_pretrained gets) and args.local_files_only."""
    args.model_ref, args.local_files_only = args.model, False
    if args.model is None:
        return
    path = Path(os.path.expanduser(args.model))
    if path.exists():
        if not path.is_dir():
            raise UsageError(f"--model {args.model}: {path} is a file; give the folder that holds model_index.json")
        if not (path / "model_index.json").is_file():
            raise UsageError(f"--model {args.model}: the folder {path} has no model_index.json, so it is not a saved "
                             "diffusers pipeline (pipe.save_pretrained(FOLDER) writes one)")
        args.model_ref = str(path.resolve())
        return
    if looks_like_path(args.model):
        parent = next((q for q in path.absolute().parents if q.exists()), None)
        raise UsageError(f"--model {args.model}: the path {path.absolute()} does not exist"
                         + (f" (the nearest folder that does: {parent})" if parent else ""))
    try:
        from huggingface_hub import constants, try_to_load_from_cache
    except ImportError:
        return
    if isinstance(try_to_load_from_cache(args.model, "model_index.json"), str):
        args.local_files_only = _hub_unreachable() is not None  # cached: offline, load without asking the Hub
        return
    why = _hub_unreachable()
    if why:
        cache = getattr(constants, "HF_HUB_CACHE", None) or getattr(constants, "HUGGINGFACE_HUB_CACHE", "")
        raise UsageError(f"--model {args.model}: no local folder of that name, so it is taken as a Hub repo id; it "
                         f"is not in the Hugging Face cache ({cache}), and this machine is offline ({why}). To fix: "
                         f"download it once with network ('hf download {args.model}', or this same command online), "
                         "or give --model a local folder")


def model_name(args: argparse.Namespace) -> str:
    return getattr(args, "model_ref", None) or args.model or TINY


# ---------------------------------------------------------------------------------------------- plan

def image_seed(base_seed: int, prompt_row: dict, p: int, i: int) -> int:
    """Seed of image i of prompt p: S + i for a prompt with its own seed S, else hashed from (base, p, i)."""
    if prompt_row.get("seed") is not None:
        return prompt_row["seed"] + i
    digest = hashlib.sha256(f"{base_seed}/{p}/{i}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def plan(prompts: list[dict], args: argparse.Namespace) -> list[list[dict]]:
    """All images in global order (prompt, image), cut into batches of --batch-size."""
    jobs = [dict(prompt_index=p, image_index=i, prompt=row["prompt"], negative_prompt=row["negative_prompt"],
                 seed=image_seed(args.seed, row, p, i), file=f"{p:05d}-{i:04d}.png")
            for p, row in enumerate(prompts) for i in range(args.num_images_per_prompt)]
    return [jobs[k:k + args.batch_size] for k in range(0, len(jobs), args.batch_size)]


PIXEL_SETTINGS = ("model", "prompts_sha256", "num_images_per_prompt", "seed", "steps", "guidance_scale", "height",
                  "width", "batch_size", "dtype", "attention_backend", "device_type", "fast_path")
FLAGS = dict(model="--model", num_images_per_prompt="--num-images-per-prompt", seed="--seed", steps="--steps",
             guidance_scale="--guidance-scale", height="--height", width="--width", batch_size="--batch-size",
             dtype="--dtype", attention_backend="the attention backend", device_type="the device type",
             fast_path="--fast-path")


def run_config(args: argparse.Namespace, prompts: list[dict], device: torch.device) -> dict:
    """The settings that decide the pixels (their hash names the run's folder), and the prompts to say in
    words what changed when a --name folder is refused."""
    text = json.dumps(prompts, sort_keys=True)
    config = dict(model=model_name(args), prompts_sha256=hashlib.sha256(text.encode()).hexdigest(),
                  num_images_per_prompt=args.num_images_per_prompt, seed=args.seed, steps=args.steps,
                  guidance_scale=args.guidance_scale, height=args.height, width=args.width,
                  batch_size=args.batch_size, dtype=args.dtype, attention_backend=args.attention_backend,
                  device_type=device.type, num_prompts=len(prompts))
    if args.fast_path:  # only when on: runs made before this option keep their folders
        config["fast_path"] = True
    config["prompts"] = prompts if len(text) <= 65536 else prompts[:1]
    return config


def run_folder_name(args: argparse.Namespace, prompts: list[dict], config: dict) -> str:
    if args.name:
        return args.name
    words = Path(args.prompts).stem if args.prompts else prompts[0]["prompt"]
    slug = ""
    for word in re.findall(r"[a-z0-9]+", words.lower()):  # whole words, up to 40 characters
        if len(slug) + len(word) + 1 > 41:
            break
        slug = f"{slug}-{word}"
    slug = slug.strip("-") or re.sub(r"[^a-z0-9]+", "", words.lower())[:40] or "run"
    digest = hashlib.sha256(json.dumps({k: config[k] for k in PIXEL_SETTINGS if k in config}, sort_keys=True).encode())
    return f"{slug}-{digest.hexdigest()[:8]}"


def describe_changes(old: dict, new: dict) -> list[str]:
    """What differs between two run.json settings, in words."""
    changes = []
    if old.get("prompts_sha256") != new["prompts_sha256"]:
        a, b = old.get("prompts"), new["prompts"]
        if not (isinstance(a, list) and all(isinstance(row, dict) for row in a)):
            a = None  # a run.json edited by hand: say only that the prompts changed
        if old.get("num_prompts") != new["num_prompts"]:
            changes.append(f"the prompts changed ({old.get('num_prompts')} -> {new['num_prompts']} prompts)")
        elif a and b and len(a) == len(b) == new["num_prompts"]:
            p = next((k for k in range(len(a)) if a[k] != b[k]), 0)
            which = "" if len(a) == 1 else f" of line {p + 1}"
            for key, word in (("prompt", "the prompt"), ("negative_prompt", "the negative prompt"),
                              ("seed", "the seed")):
                if a[p].get(key) != b[p].get(key):
                    changes.append(f"{word}{which} changed ({a[p].get(key)!r} -> {b[p].get(key)!r})")
        else:
            changes.append("the prompts changed")
    for key, flag in FLAGS.items():
        if old.get(key) != new.get(key):
            changes.append(f"{flag} changed ({old.get(key)} -> {new.get(key)})")
    return changes


def settings_json(config: dict) -> bytes:
    """run.json's bytes: strict JSON (finite numbers only)."""
    return json.dumps(config, indent=1, allow_nan=False).encode()


def read_run_json(folder: Path) -> dict | None:
    """The settings a run folder holds (None where it has no run.json); a damaged one is refused in one line."""
    path = folder / "run.json"
    try:
        data = read_regular(path)
    except FileNotFoundError:
        return None
    try:
        old = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        old = None
    if not isinstance(old, dict):
        raise UsageError(f"{path} is damaged (not a JSON object of settings); delete {folder}/ or choose another "
                         "--name")
    return old


def refuse_other_settings(folder: Path, old: dict, config: dict) -> None:
    changes = describe_changes(old, config)
    if changes:
        raise UsageError(f"{folder}/ holds images made with other settings: {'; '.join(changes)}. Leave out --name "
                         f"to get a new folder for these settings, choose another --name, or delete {folder}/")


def check_run_config(folder: Path, config: dict) -> bool:
    """Refuse a folder made with other settings; True when it already holds this run (resume). Read only: the
    processes of a run other than the first check; the first claims (:func:`claim_run`)."""
    old = read_run_json(folder)
    if old is None:
        return False
    refuse_other_settings(folder, old, config)
    return True


def claim_run(folder: Path, config: dict) -> bool:
    """Check and claim a run folder in one step, before the model loads: run.json is made as a hard link to a
    complete temporary file, which fails where a run.json exists, so that of two runs started together with
    other settings one claims the folder and the other is refused. True when the folder held this run
    already (a resume)."""
    from diffusers.flash.fsio import default_mode, temporary_name

    target = folder / "run.json"
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=temporary_name(target), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), default_mode())
            f.write(settings_json(config))
            f.flush()
            os.fsync(f.fileno())
        for _ in range(3):
            try:
                os.link(tmp, target)
            except FileExistsError:
                old = read_run_json(folder)
                if old is None:  # removed in between by a run that stopped without images: try again
                    continue
                refuse_other_settings(folder, old, config)
                return True
            except OSError as e:  # a file system without hard links: create it exclusively instead
                if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.EXDEV):
                    raise
                exclusive_write(target, settings_json(config))
            fsync_dir(folder)
            return False
        raise UsageError(f"{target} keeps appearing and disappearing: another run is starting and stopping in "
                         f"{folder}/; try again")
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


# ------------------------------------------------------------------------------------------- output

O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
PNG_NAME = re.compile(r"[0-9]{5,}-[0-9]{4,}\.png")


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (diffusers.flash.fsio; imported late: torch may be missing)."""
    from diffusers.flash.fsio import fsync_path

    fsync_path(path)


def atomic_write(path: Path, data: bytes) -> None:
    """Temporary name in the same folder, fsync, rename: a kill leaves the old file or the new. The file gets
    the mode open() gives (0o666 less the umask), as the PNGs do."""
    from diffusers.flash.fsio import atomic_write as write

    write(path, data)


def kind_of(mode: int) -> str:
    for test, word in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISDIR, "a folder"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device")):
        if test(mode):
            return word
    return "not a regular file"


def not_regular(path: Path, what: str) -> UsageError:
    return UsageError(f"{path} is {what}, not a regular file; generate.py reads and writes a run folder's files "
                      "only as regular files, never through a link: remove it, and a rerun resumes")


def _open_regular(path: Path, flags: int) -> int:
    """os.open without following a symlink or blocking on a FIFO; anything but a regular file is refused."""
    try:
        fd = os.open(path, flags | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP or (e.errno in (errno.ENXIO, errno.EISDIR) and os.path.lexists(path)):
            raise not_regular(path, kind_of(os.lstat(path).st_mode)) from None
        raise
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise not_regular(path, kind_of(mode))
    return fd


def read_regular(path: Path, limit: int = 1 << 28) -> bytes:
    """A run folder's file (run.json, a manifest); FileNotFoundError where there is none."""
    fd = _open_regular(path, os.O_RDONLY)
    with os.fdopen(fd, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise UsageError(f"{path} is larger than {limit >> 20} MB, far more than a run writes; move it away")
    return data


def exclusive_write(path: Path, data: bytes) -> int:
    """Create ``path`` (it must not exist: O_EXCL never follows a symlink) and write ``data`` to disk; returns
    the file's inode number."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o666)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
        return os.fstat(f.fileno()).st_ino


def png_problem(path: Path, size: tuple[int, int]) -> str | None:
    """Why ``path`` is not a finished image of this run (None when it is): it must be a regular file holding a
    PNG of ``size`` (width, height) that decodes completely (an empty or cut-short file does not)."""
    from PIL import Image

    try:
        fd = _open_regular(path, os.O_RDONLY)
    except UsageError:
        return f"is {kind_of(os.lstat(path).st_mode)}, not a PNG file"
    except OSError:
        return "cannot be read"
    try:
        with os.fdopen(fd, "rb") as f, Image.open(f) as image:
            if image.format != "PNG":
                return f"is a {image.format or 'non-PNG'} image, not a PNG"
            if image.size != size:
                return f"is {image.size[0]}x{image.size[1]}, not {size[0]}x{size[1]}"
            image.load()
    except Exception:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError... for broken files
        return "does not decode (empty or cut short)"
    return None


def remove_stale_temporaries(folder: Path) -> None:
    """Remove the temporary files (``.NAME.PID.RANDOM.tmp``) that a run killed mid-write left: only those whose
    process is gone. Another run writing into the same folder keeps its own."""
    from diffusers.flash.fsio import stale_temporary

    with contextlib.suppress(OSError), os.scandir(folder) as entries:
        for entry in entries:
            if stale_temporary(entry.name):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)


class Output:
    """--out and the run's folder in it. Folders this run creates, and the run.json it claimed, are removed
    again when it stops before writing any image, so that a failed run leaves nothing."""

    def __init__(self, root: Path, folder: Path) -> None:
        self.root, self.folder, self.created, self.claimed = root, folder, [], False

    def _mkdir(self, path: Path) -> None:
        missing = [q for q in [path, *path.parents] if not os.path.lexists(q)][::-1]
        for q in missing:
            try:
                q.mkdir()
            except FileExistsError:  # another process of this run made it a moment ago
                if not q.is_dir():
                    raise
                continue
            self.created.append(q)

    def check_writable(self, flag: str) -> None:
        """Refuse an --out that is a file or cannot be written, before the model is loaded."""
        existing = next(q for q in [self.root, *self.root.parents] if q.exists() or q == q.parent)
        if existing.exists() and not existing.is_dir():
            what = "that is a file" if existing == self.root else f"{existing} is a file"
            raise UsageError(f"{flag}: {what}, not a folder; give a folder (it is made if missing)")
        try:
            self._mkdir(self.root)
            fd, probe = tempfile.mkstemp(dir=self.root, prefix=".write-test-")
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise UsageError(f"{flag}: cannot write into {self.root}/ ({e.strerror or e}); choose another --out "
                             "folder") from None

    def check_folder(self) -> None:
        """The run folder, where it exists, is a real folder inside --out (not a symlink leading elsewhere), and
        its run.json and manifests are regular files: refused in one line before any model loads."""
        if not os.path.lexists(self.folder):
            return
        mode = os.lstat(self.folder).st_mode
        if not stat.S_ISDIR(mode):
            raise UsageError(f"{self.folder} is {kind_of(mode)}, not a folder: run folders are made by generate.py "
                             "inside --out, so that its output stays there; remove it or choose another --name")
        for path in [self.folder / "run.json", self.folder / "manifest.jsonl", *self.folder.glob("manifest.part-*")]:
            if os.path.lexists(path) and not stat.S_ISREG(os.lstat(path).st_mode):
                raise not_regular(path, kind_of(os.lstat(path).st_mode))

    def claim(self, config: dict) -> bool:
        """Make the run folder and claim it (:func:`claim_run`); True on a resume."""
        self._mkdir(self.folder)
        self.check_folder()
        resuming = claim_run(self.folder, config)
        self.claimed = not resuming
        remove_stale_temporaries(self.folder)  # left by a killed run: never taken as an image
        return resuming

    def discard_if_no_image(self) -> None:
        if not os.path.isdir(self.folder) or os.path.islink(self.folder) or any(self.folder.glob("*.png")):
            return
        if self.claimed:
            for f in [self.folder / "run.json", *self.folder.glob("manifest.part-*.jsonl")]:
                with contextlib.suppress(OSError):
                    f.unlink()
            remove_stale_temporaries(self.folder)
        for q in reversed(self.created):
            with contextlib.suppress(OSError):
                q.rmdir()  # only if empty


class Writer:
    """Saves PNGs (temporary name, fsync, rename) and appends manifest rows to this process's part file. No
    write follows a symlink: the part file is opened with O_NOFOLLOW, and each PNG's temporary name holds a
    random part and is created with O_EXCL (a planted file or link there is never written through)."""

    def __init__(self, out: Path, rank: int, stop_after: int | None = None) -> None:
        self.out, self.rank, self.stop_after, self.count = out, rank, stop_after, 0
        self.written: list[tuple[Path, int]] = []  # (PNG, inode of the file renamed there)
        fd = _open_regular(out / f"manifest.part-{rank}.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        self.part = os.fdopen(fd, "a", encoding="utf-8")

    def save(self, image, row: dict) -> None:
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        data = buf.getvalue()
        line = json.dumps(row, allow_nan=False) + "\n"
        tmp = self.out / f".{row['file']}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        if self.stop_after is not None and self.count == self.stop_after:  # tests: die while writing
            exclusive_write(tmp, data[: len(data) // 2])
            os._exit(3)
        try:
            inode = exclusive_write(tmp, data)  # the bytes are on disk before the name says the image is done
            self.written.append((self.out / row["file"], inode))
            self.part.write(line)  # row before rename: a PNG on disk always has its row
            self.part.flush()
            os.fsync(self.part.fileno())
            os.replace(tmp, self.out / row["file"])
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        fsync_dir(self.out)
        self.count += 1

    def saved(self) -> int:
        """The PNGs this writer has put in place, counted on disk (each is the file it wrote, by inode): exact
        also when a Ctrl-C lands between a rename and the count."""
        count = 0
        for path, inode in self.written:
            with contextlib.suppress(OSError):
                count += os.lstat(path).st_ino == inode
        return count

    def close(self) -> None:
        self.part.close()


def manifest_row_ok(row: Any) -> bool:
    """A manifest row this script wrote: an object with the image's file name, its indices and a finite
    "finished" time, all finite numbers (strict JSON)."""
    if not isinstance(row, dict) or not isinstance(row.get("file"), str) or not PNG_NAME.fullmatch(row["file"]):
        return False
    numbers = [row.get("prompt_index"), row.get("image_index"), row.get("finished")]
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in numbers):
        return False
    try:
        json.dumps(row, allow_nan=False)
    except (ValueError, TypeError, RecursionError):
        return False
    return True


def merge_manifest(out: Path) -> int:
    """manifest.jsonl := its old rows + every part file's rows, newest row per image, PNG present. Rows that
    are not this script's (damaged, edited) are dropped with a note, not a crash."""
    rows, dropped = {}, 0
    sources = [out / "manifest.jsonl"] + sorted(out.glob("manifest.part-*.jsonl"))
    for src in sources:
        try:
            text = read_regular(src).decode("utf-8", errors="replace")
        except FileNotFoundError:
            continue
        for line in text.splitlines():
            try:
                row = json.loads(line)
            except (ValueError, RecursionError):  # a line cut short by a kill, or not JSON
                dropped += bool(line.strip())
                continue
            if not manifest_row_ok(row):
                dropped += 1
                continue
            key = (row["prompt_index"], row["image_index"])
            if (out / row["file"]).is_file() and row["finished"] >= rows.get(key, {}).get("finished", -1):
                rows[key] = row
    if dropped:
        print(f"generate.py: note: {plural(dropped, 'damaged manifest row')} dropped (not JSON objects this script "
              f"writes); {out}/manifest.jsonl is rewritten without them", file=sys.stderr)
    atomic_write(out / "manifest.jsonl",
                 "".join(json.dumps(rows[k], allow_nan=False) + "\n" for k in sorted(rows)).encode())
    for src in sources[1:]:
        src.unlink(missing_ok=True)
    return len(rows)


def scan(folder: Path, batches: list[list[dict]], size: tuple[int, int]) -> tuple[set, list]:
    """Images already done (a regular file, a PNG of ``size`` (width, height) that decodes), and (name, why)
    for the others, which are made again."""
    done, broken = set(), []
    if folder.is_dir() and not folder.is_symlink():
        for job in (job for batch in batches for job in batch):
            path = folder / job["file"]
            if os.path.lexists(path):
                problem = png_problem(path, size)
                if problem:
                    broken.append((job["file"], problem))
                else:
                    done.add(job["file"])
    return done, broken


# ----------------------------------------------------------------------------------------- pipeline

def check_backend(args: argparse.Namespace) -> None:
    """Refuse an unknown or unavailable attention backend before loading any model, naming where it came from
    (--attention-backend or $DIFFUSERS_ATTENTION_BACKEND)."""
    from diffusers import DiffusionPipeline

    name, source = args.attention_backend, args.backend_source
    if not hasattr(DiffusionPipeline, "set_attention_backend"):
        if name != "auto":
            raise UsageError(f"{source}: this diffusers build has no attention backends "
                             "(DiffusionPipeline.set_attention_backend is missing); use auto")
        return
    from diffusers.flash.attention.dispatch import backend_status

    status = {n: (ok, why) for n, ok, why in backend_status()}
    if name != "auto" and name not in status:
        raise UsageError(f"{source}: unknown attention backend; choose one of: auto, {', '.join(status)}")
    if name in status and not status[name][0]:
        raise UsageError(f"{source}: not available here: {status[name][1]}")


def backend_scope(name: str) -> contextlib.AbstractContextManager:
    """Every attention call of the run uses ``name`` (over $DIFFUSERS_ATTENTION_BACKEND: --attention-backend
    auto means auto)."""
    try:
        from diffusers.flash.attention.dispatch import attention_backend
    except ImportError:
        return contextlib.nullcontext()
    return attention_backend(name)


def backend_error() -> type[Exception] | tuple:
    """The exception an attention backend raises when it cannot serve a call (none without the dispatcher)."""
    try:
        from diffusers.flash.attention.dispatch import AttentionBackendError
    except ImportError:
        return ()
    return AttentionBackendError


@contextlib.contextmanager
def quiet_fp16_cpu_warning() -> Iterator[None]:
    """Upstream warns once per model that fp16 on the CPU "will fail"; it runs (slowly). We say so once."""
    from diffusers.utils import logging

    logger = logging.get_logger("diffusers.pipeline_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def torch_modules(pipe: Any) -> list:
    """The pipeline's models (denoiser, VAE, text encoders, safety checker) that it has."""
    import torch

    names = ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "safety_checker")
    found = (getattr(pipe, name, None) for name in names)
    return [m for m in found if isinstance(m, torch.nn.Module)]


def load_pipeline(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, show_steps: bool) -> Any:
    import torch

    from diffusers import DiffusionPipeline
    from diffusers.flash import local_pipelines

    if args.model is None:
        pipe = local_pipelines.stable_diffusion("tiny")
        for module in torch_modules(pipe):
            module.to(dtype)
    else:
        try:
            pipe = DiffusionPipeline.from_pretrained(args.model_ref, torch_dtype=dtype,
                                                     local_files_only=args.local_files_only)
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UsageError(f"cannot load --model {args.model}: {first}") from None
        if type(pipe).__name__ not in PIPELINES:
            raise UsageError(f"--model {args.model} is a {type(pipe).__name__}; generate.py makes images from text "
                             f"with {', '.join(PIPELINES)}")
    quiet = quiet_fp16_cpu_warning() if dtype == torch.float16 and device.type != "cuda" else contextlib.nullcontext()
    with quiet:
        try:
            pipe = pipe.to(device)
        except ValueError as e:  # 0.4.0's pipelines refuse float16 on the CPU, which later releases run
            if "float16" not in str(e) or device.type == "cuda":
                raise
            for module in torch_modules(pipe):
                module.to(device)
    # real models: a bar of denoising steps under the images bar (a 50-step image takes minutes on a CPU)
    pipe.set_progress_bar_config(disable=not show_steps, desc="steps", unit="step", leave=False, position=1)
    return pipe


# the text-to-image pipelines generate.py runs (the ones a release has): Stable Diffusion 1.x/2.x, SDXL (0.19
# on), SD3 (0.29 on) and Flux (0.30 on)
PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusion3Pipeline", "FluxPipeline")


def vae_scale(pipe: Any) -> int:
    """Pixels per latent: 8 for Stable Diffusion's VAE, 2 for the tiny one."""
    return 2 ** (len(pipe.vae.config.block_out_channels) - 1)


def initial_latents(pipe: Any, batch: list[dict], args: argparse.Namespace, device: torch.device,
                    dtype: torch.dtype) -> torch.Tensor:
    """Each image's latents drawn on the CPU from its own generator: batching cannot change them."""
    import torch

    scale = vae_scale(pipe)
    h, w = args.height // scale, args.width // scale
    if getattr(pipe, "unet", None) is not None:
        channels = pipe.unet.in_channels
    else:  # SD3's and Flux's transformer (Flux takes its latents packed in 2x2 patches: 4 channels each)
        channels = pipe.transformer.config.in_channels // (4 if type(pipe).__name__ == "FluxPipeline" else 1)
    noise = [torch.randn((channels, h, w), generator=torch.Generator("cpu").manual_seed(job["seed"])) for job in batch]
    latents = torch.stack(noise)
    if type(pipe).__name__ == "FluxPipeline":
        latents = pipe._pack_latents(latents, len(batch), channels, h, w)
    return latents.to(device=device, dtype=dtype)


def generate_batch(pipe: Any, batch: list[dict], args: argparse.Namespace, device: torch.device,
                   dtype: torch.dtype) -> tuple[list, list, float]:
    scale = vae_scale(pipe)
    start = time.perf_counter()
    try:
        with backend_scope(args.attention_backend):
            # the pipeline takes its size as its own factor times the latents' (8 up to 0.9; from 0.10 the
            # VAE's, held in pipe.vae_scale_factor); the tiny VAE upsamples 2x
            factor = getattr(pipe, "vae_scale_factor", 8)
            result = pipe([job["prompt"] for job in batch],
                          negative_prompt=[job["negative_prompt"] for job in batch],
                          height=args.height // scale * factor, width=args.width // scale * factor,
                          num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                          latents=initial_latents(pipe, batch, args, device, dtype))
    except backend_error() as e:
        raise UsageError(f"{args.backend_source}: {e}") from None
    nsfw = getattr(result, "nsfw_content_detected", None) or [False] * len(batch)
    return result.images, nsfw, time.perf_counter() - start


# --------------------------------------------------------------------------------------------- main

class OneProcess:
    """accelerate's PartialState, for one process, where accelerate is not installed."""

    process_index, num_processes, is_main_process = 0, 1, True

    def __init__(self) -> None:
        import torch

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def wait_for_everyone(self) -> None:
        pass

    @contextlib.contextmanager
    def split_between_processes(self, items: list) -> Iterator[list]:
        yield items


def process_state(args: argparse.Namespace) -> Any:
    """accelerate's view of this process (one process without accelerate). Without CUDA, processes that
    torchrun started (accelerate launch --multi_gpu) are CPU processes joined over gloo."""
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        from accelerate import PartialState
    except ImportError:
        if world > 1:
            raise UsageError(f"{world} processes need accelerate: pip install accelerate") from None
        return OneProcess()
    if world == 1 and "MASTER_ADDR" in os.environ and "ACCELERATE_MIXED_PRECISION" in os.environ:
        print("generate.py: accelerate launch started one process (without GPUs it starts several only with "
              "--multi_gpu); this process makes every image", file=sys.stderr)
    cpu = (args.device or "").startswith("cpu") or (world > 1 and not torch.cuda.is_available())
    return PartialState(cpu=cpu)


def pick_device_dtype(args: argparse.Namespace, state: Any) -> tuple[torch.device, torch.dtype]:
    import torch

    if args.device:
        try:
            device = torch.device(args.device)
        except (RuntimeError, ValueError):
            raise UsageError(f"--device {args.device}: not a device name (cpu, cuda, cuda:1, mps, ...)") from None
        if device.type == "cuda":
            if not torch.cuda.is_available():
                build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
                raise UsageError(f"--device {args.device}: no CUDA GPU here (torch {torch.__version__} is {build} "
                                 "and sees none); leave out --device to run on the CPU")
            if device.index is not None and device.index >= torch.cuda.device_count():
                raise UsageError(f"--device {args.device}: there are {torch.cuda.device_count()} GPU(s), "
                                 f"numbered from 0")
        elif device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise UsageError(f"--device {args.device}: MPS (Apple GPU) is not available here")
    else:
        device = state.device
    args.dtype = args.dtype or ("fp16" if device.type == "cuda" else "fp32")
    if args.dtype == "fp16" and device.type == "cpu" and state.is_main_process:
        print("generate.py: note: --dtype fp16 on the CPU runs (PyTorch has CPU kernels for it) but is usually "
              "slower than fp32, and its images differ from fp32's by rounding; fp32 is the CPU default",
              file=sys.stderr)
    return device, getattr(torch, DTYPES[args.dtype])


TINY_SIZE = 64  # local_pipelines.default_image_size("tiny"), known before anything heavy is imported


def model_vae_factor(args: argparse.Namespace) -> int:
    """Pixels per latent along a side, read from the model's vae/config.json where it is at hand (a folder, the
    Hugging Face cache); 8 (Stable Diffusion's) otherwise and for the built-in tiny model."""
    if args.model is None:
        return 8
    config = None
    if os.path.isdir(getattr(args, "model_ref", None) or ""):
        config = os.path.join(args.model_ref, "vae", "config.json")
    else:
        with contextlib.suppress(Exception):
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(args.model, "vae/config.json")
            config = found if isinstance(found, str) else None
    try:
        with open(config or "", encoding="utf-8") as f:
            blocks = json.load(f)["block_out_channels"]
        return 2 ** (len(blocks) - 1) if isinstance(blocks, list) and 1 <= len(blocks) <= 8 else 8
    except (OSError, ValueError, KeyError, TypeError):
        return 8


def model_config(args: argparse.Namespace, name: str) -> dict:
    """The model's ``name`` JSON file (e.g. "unet/config.json") where it is at hand (a folder, the Hugging Face
    cache); {} otherwise."""
    path = None
    if os.path.isdir(getattr(args, "model_ref", None) or ""):
        path = os.path.join(args.model_ref, name)
    else:
        with contextlib.suppress(Exception):
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(args.model, name)
            path = found if isinstance(found, str) else None
    try:
        with open(path or "", encoding="utf-8") as f:
            config = json.load(f)
        return config if isinstance(config, dict) else {}
    except (OSError, ValueError):
        return {}


def model_sample_size(args: argparse.Namespace) -> int:
    """The denoiser's own size in latents (64 for SD 1.x: 512 pixels; 128 for SDXL, SD3 and Flux: 1024)."""
    for name in ("unet/config.json", "transformer/config.json"):
        config = model_config(args, name)
        if config:
            size = config.get("sample_size", 128)  # Flux's transformer names none: its pipeline's default is 128
            return size if isinstance(size, int) and 1 <= size <= MAX_SIDE_LATENTS else 64
    return 64


def default_size(args: argparse.Namespace) -> None:
    """Image size in pixels: the tiny model's own (64x64) or the model's (its denoiser's sample size: 512x512
    for SD 1.x, 1024x1024 for SDXL, SD3 and Flux); then the limits attention sets, before any model loads."""
    factor = model_vae_factor(args)
    size = TINY_SIZE if args.model is None else model_sample_size(args) * factor
    args.height, args.width = args.height or size, args.width or size
    h, w = args.height // factor, args.width // factor
    given = f"--height {args.height} --width {args.width}"
    if min(h, w) < 1:
        raise UsageError(f"{given}: too small for this model, whose latents are 1/{factor} of a side: at least "
                         f"{factor} pixels a side")
    if model_config(args, "model_index.json").get("_class_name") == "FluxPipeline" and (h % 2 or w % 2):
        raise UsageError(f"{given}: Flux takes its latents in 2x2 patches: sizes must be multiples of {2 * factor} "
                         f"pixels")
    if max(h, w) > MAX_SIDE_LATENTS:
        raise UsageError(f"{given}: too large: at most {MAX_SIDE_LATENTS * factor} pixels a side for this model "
                         f"({MAX_SIDE_LATENTS} latents, which are 1/{factor} of a side)")
    if h * w > MAX_LATENTS:
        side = int(math.isqrt(MAX_LATENTS)) * factor
        raise UsageError(f"{given}: too large: the UNet attends over every latent ({h}x{w} = {h * w:,} here, at "
                         f"1/{factor} of each side); at most {MAX_LATENTS:,} ({side}x{side} pixels), beyond which "
                         "one attention call needs more than 8 GB under the math backend, and Stable Diffusion 1.x "
                         "was trained at 512x512")


def manifest_row(job: dict, image: Any, args: argparse.Namespace, device: torch.device, state: Any, batch: list,
                 seconds: float, nsfw: bool) -> dict:
    width, height = image.size  # the PNG as written
    return dict(job, backend=args.attention_backend, model=model_name(args), steps=args.steps,
                guidance_scale=args.guidance_scale, height=height, width=width, dtype=args.dtype,
                device=str(device), batch_size=len(batch), seconds=seconds / len(batch), batch_seconds=seconds,
                nsfw=bool(nsfw), rank=state.process_index, finished=time.time())


def generate_share(pipe: Any, batches: list, done: set, out: Path, args: argparse.Namespace, device: torch.device,
                   dtype: torch.dtype, state: Any,
                   writer: Writer) -> None:
    """This process's batches; images already done (from an interrupted run) are not saved again."""
    from tqdm.auto import tqdm

    desc = f"images (process 0 of {state.num_processes})" if state.num_processes > 1 else "images"
    times = []
    with tqdm(total=sum(map(len, batches)), unit="img", desc=desc, disable=not state.is_main_process,
              position=0) as bar:
        for batch in batches:
            images, nsfw, seconds = generate_batch(pipe, batch, args, device, dtype)
            times.append((len(batch), seconds))
            for job, image, flagged in zip(batch, images, nsfw):
                if job["file"] not in done:
                    writer.save(image, manifest_row(job, image, args, device, state, batch, seconds, flagged))
            bar.update(len(batch))
    if times:
        print(f"generate.py: {timing_line(times, state)}", file=sys.stderr)


def timing_line(times: list[tuple[int, float]], state: Any) -> str:
    """This process's first batch (its warm-up: the fast path compiles and captures there) apart from the rest."""
    who = f"process {state.process_index}: " if state.num_processes > 1 else ""
    (n0, s0), rest = times[0], times[1:]
    line = f"{who}first batch {plural(n0, 'image')} in {s0:.1f} s (warm-up included)"
    if rest:
        n, s = sum(k for k, _ in rest), sum(x for _, x in rest)
        line += f"; then {plural(n, 'image')} at {n / s:.2f} img/s" if s > 0 else ""
    return line


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def check_requirements() -> None:
    """torch and transformers (the pipeline's text encoder) must be installed; accelerate is optional."""
    import importlib.util

    missing = [name for name in ("torch", "transformers") if importlib.util.find_spec(name) is None]
    if missing:
        raise UsageError(f"needs {' and '.join(missing)}, not installed here: pip install {' '.join(missing)} (from "
                         "a clone: pip install \".[torch,transformers]\"; without a GPU, install torch first with "
                         "--index-url https://download.pytorch.org/whl/cpu)")


PROGRESS: dict = {}  # what a Ctrl-C reports, kept up to date by run(): folder, total, done, writer
_LAST_WORD = threading.Lock()  # the one line at a Ctrl-C is printed once: by main() or by the watcher


def interrupted_line() -> str:
    """The line a Ctrl-C ends with: what is saved, and that the same command resumes."""
    folder, total, writer = PROGRESS.get("folder"), PROGRESS.get("total", 0), PROGRESS.get("writer")
    saved = PROGRESS.get("done", 0) + (writer.saved() if writer is not None else 0)
    if folder is None:
        return "interrupted (Ctrl-C) before any image was made; nothing to resume"
    where = f"{saved} of {plural(total, 'image')} are in {folder}/" if saved else "no image was made yet"
    return f"interrupted (Ctrl-C); {where}; run the same command again to resume"


@contextlib.contextmanager
def stop_soon_on_ctrl_c(grace: float = 1.5) -> Iterator[None]:
    """Python runs its Ctrl-C handler only between bytecodes, so one long call inside torch (a model load, a
    large attention) would hold a Ctrl-C off for minutes. Here the signal also wakes a watcher thread
    (signal.set_wakeup_fd, written by the C-level handler at once); where the main thread has not ended the
    run ``grace`` seconds later, the watcher prints the same one line and ends the process (status 130). Every
    PNG is complete under its name (written under a temporary one first) and a rerun resumes."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    r, w = os.pipe()
    os.set_blocking(w, False)
    try:
        old = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    except (ValueError, OSError):
        os.close(r)
        os.close(w)
        yield
        return
    finished = threading.Event()

    def watch() -> None:
        while not finished.is_set():
            got = os.read(r, 64)
            if finished.is_set() or not got or signal.SIGINT not in got:
                continue
            if finished.wait(grace):
                return
            if _LAST_WORD.acquire(blocking=False):
                with contextlib.suppress(Exception):
                    print(f"\ngenerate.py: {interrupted_line()}", file=sys.stderr, flush=True)
            elif finished.wait(grace):  # the main thread is saying it: let it finish
                return
            os._exit(130)

    watcher = threading.Thread(target=watch, name="generate.py Ctrl-C", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        finished.set()
        signal.set_wakeup_fd(old)
        with contextlib.suppress(OSError):
            os.write(w, b"\0")
        watcher.join(2 * grace + 1)
        os.close(w)
        os.close(r)
        if _LAST_WORD.locked():
            _LAST_WORD.release()


def run(args: argparse.Namespace) -> None:
    prompts = load_prompts(args)  # bad input fails here, before the heavy imports
    check_requirements()
    check_model(args)
    default_size(args)
    root = Path(args.out)
    probe = Output(root, root)
    probe.check_writable("--out " + args.out)  # before the imports: a bad --out is said at once
    try:
        state = process_state(args)
        device, dtype = pick_device_dtype(args, state)
        check_backend(args)
    except BaseException:
        probe.discard_if_no_image()
        raise
    if args.fast_path and device.type != "cuda":
        if state.is_main_process:
            print(f"generate.py: --fast-path: no CUDA device ({device.type}), so it changes nothing: the images are "
                  "the plain pipeline's, in the plain run's folder", file=sys.stderr)
        args.fast_path = False
    config = run_config(args, prompts, device)
    output = Output(root, root / run_folder_name(args, prompts, config))
    output.created = probe.created
    folder = output.folder
    args.run_folder = folder
    batches = plan(prompts, args)
    total = sum(map(len, batches))
    writer, done = None, set()
    PROGRESS.update(total=total, done=0)
    try:
        output.check_folder()
        if state.is_main_process:
            resuming = output.claim(config)  # checked and claimed in one step, before the model loads
        else:
            resuming = check_run_config(folder, config)
        PROGRESS["folder"] = folder
        done, broken = scan(folder, batches, (args.width, args.height))
        PROGRESS["done"] = len(done)
        todo = [b for b in batches if not all(job["file"] in done for job in b)]
        if state.is_main_process:
            for name, why in broken[:5]:
                print(f"generate.py: {folder}/{name} {why}: making it again", file=sys.stderr)
            if len(broken) > 5:
                print(f"generate.py: ... and {len(broken) - 5} more PNGs to make again", file=sys.stderr)
            print(f"generate.py: {'resuming' if resuming else 'new run'} in {folder}/: {plural(total, 'image')}, "
                  f"{len(done)} already there", file=sys.stderr)
        if todo:
            pipe = load_pipeline(args, device, dtype, show_steps=args.model is not None and state.is_main_process)
            if args.fast_path:
                report = pipe.enable_fast_path(compile=True)
                applied = ", ".join(f"{k} ({', '.join(v)})" for k, v in report.items() if k != "reasons" and v)
                said = "; ".join(report["reasons"])
                print(f"generate.py: fast path: {applied or 'not applied'}{'; ' + said if said else ''}",
                      file=sys.stderr)
            state.wait_for_everyone()  # the folder is claimed and every process has scanned it before anyone writes
            writer = Writer(folder, state.process_index, args.stop_after)
            PROGRESS["writer"] = writer
            with state.split_between_processes(todo) as mine:  # whole batches: the same in any number of processes
                generate_share(pipe, mine, done, folder, args, device, dtype, state, writer)
            writer.close()
        state.wait_for_everyone()
    except KeyboardInterrupt:
        if writer is not None:
            writer.close()
        saved = len(done) + (writer.saved() if writer else 0)
        if state.is_main_process and state.num_processes == 1 and saved:
            with contextlib.suppress(OSError, UsageError):
                merge_manifest(folder)
        output.discard_if_no_image()
        raise Interrupted(interrupted_line()) from None
    except BaseException:
        if state.is_main_process:
            output.discard_if_no_image()
        raise
    if state.is_main_process:
        rows = merge_manifest(folder)
        print(f"{plural(total, 'image')} ({len(done)} already there) as PNGs in {folder}/; "
              f"manifest {folder}/manifest.jsonl ({rows} rows)")


def say_last(line: str) -> None:
    """The one line a run ends with at a Ctrl-C, unless the watcher said it already."""
    if _LAST_WORD.acquire(blocking=False):
        print(f"generate.py: {line}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    """The command line; user mistakes end with one line on stderr (exit status 1), Ctrl-C with 130."""
    PROGRESS.clear()
    with stop_soon_on_ctrl_c():
        try:
            run(parse_args(argv))
        except UsageError as e:
            sys.exit(f"generate.py: error: {e}")
        except Interrupted as e:
            say_last(str(e))
            sys.exit(130)
        except KeyboardInterrupt:  # before the run's own handler, or a second Ctrl-C inside it
            say_last(interrupted_line())
            sys.exit(130)
        except OSError as e:  # the output folder filled up or went away mid-run
            where = e.filename or PROGRESS.get("folder") or "--out"
            what = e.strerror or str(e) or type(e).__name__
            sys.exit(f"generate.py: error: cannot write {where}{'/' if where == PROGRESS.get('folder') else ''}: "
                     f"{what}; a rerun resumes once fixed")


if __name__ == "__main__":
    main()
