#!/usr/bin/env python3
"""Generate images with Stable Diffusion: one prompt, or a file of them, on one device or many.

    python examples/generate.py                                  # tiny local model, default prompt, CPU-quick
    python examples/generate.py "a red fox in snow" --model path/to/sd-v1-4 --num-images-per-prompt 4
    accelerate launch --num_processes 8 examples/generate.py --prompts prompts.jsonl --model path/to/sd

Without --model the pipeline is diffusers.local_pipelines.stable_diffusion("tiny"), built locally with
random weights (no download), so its images are noise-like. --prompts takes a text file (one prompt a
line) or JSONL ({"prompt": ..., "seed": optional int, "negative_prompt": optional str} a line).

Reproducibility: image i of prompt p starts from latents drawn on the CPU from its own generator,
seeded from (--seed, p, i), or with seed S + i when the prompt's JSONL line gives "seed": S. Images
are put into batches by global index, and whole batches are handed to the processes, so every image is
computed in the same batch whatever the number of processes: the PNG bytes do not depend on N, nor on
an interruption (a partly written batch is recomputed in full and only its missing images are saved).
Another --batch-size gives the same images up to float rounding: batched kernels (GEMM, convolution,
GroupNorm) may round differently for another batch shape, which can move a pixel value by 1.
The manifest records each image's seed: to remake image 0 of a manifest row, give its seed in JSONL.

Output: out/PPPPP-IIII.png (prompt index, image index), out/manifest.jsonl (one row an image), and
out/run.json (every setting that fixes the pixels, batch size included; a rerun into the same folder
must match them, and then skips finished images). PNGs are written to a temporary name and renamed,
so a killed run never leaves a half-written PNG that a rerun would take as done.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import time
from pathlib import Path

DEFAULT_PROMPT = "a photograph of an astronaut riding a horse"
PROMPT_KEYS = {"prompt", "seed", "negative_prompt"}
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


class UsageError(Exception):
    """Bad input from the user: reported as one line, without a stack trace."""


# ----------------------------------------------------------------------------------------- arguments

def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text}")
    return value


def size_int(text):
    value = positive_int(text)
    if value % 8:
        raise argparse.ArgumentTypeError(f"must be a multiple of 8, not {text}")
    return value


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt_arg", nargs="?", metavar="PROMPT", help=f"the prompt (default: {DEFAULT_PROMPT!r})")
    p.add_argument("--prompt", help="the prompt (same as the positional argument)")
    p.add_argument("--prompts", metavar="FILE", help="text file (a prompt a line) or JSONL file of prompts")
    p.add_argument("--negative-prompt", default="", help="negative prompt for prompts that do not give one")
    p.add_argument("--model", help="local folder or Hub repo id (default: the built-in tiny random pipeline)")
    p.add_argument("--num-images-per-prompt", type=positive_int, default=1)
    p.add_argument("--batch-size", type=positive_int, default=1, help="images per pipeline call")
    p.add_argument("--steps", type=positive_int, help="denoising steps (default: 50, or 10 for the tiny model)")
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--height", type=size_int, help="default: 512, or the tiny model's default size")
    p.add_argument("--width", type=size_int, help="default: 512, or the tiny model's default size")
    p.add_argument("--seed", type=int, default=0, help="base seed; each image's seed derives from it")
    p.add_argument("--attention-backend", default=os.environ.get("DIFFUSERS_ATTENTION_BACKEND", "auto"),
                   help="attention backend (auto, math, sdpa, flash-attn, ...); default: "
                        "$DIFFUSERS_ATTENTION_BACKEND or auto")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: fp16 on CUDA, fp32 elsewhere")
    p.add_argument("--out", default="out", help="output folder (default: out/)")
    p.add_argument("--device", help="torch device (default: this process's device from accelerate)")
    p.add_argument("--_stop-after", dest="stop_after", type=int, help=argparse.SUPPRESS)  # tests: die mid-run
    args = p.parse_args(argv)
    if args.prompt_arg is not None and args.prompt is not None:
        p.error("give the prompt either positionally or with --prompt, not both")
    args.prompt = args.prompt if args.prompt is not None else args.prompt_arg
    if args.prompt is not None and args.prompts:
        p.error("give either a prompt or --prompts FILE, not both")
    tiny = args.model is None
    args.steps = args.steps or (10 if tiny else 50)
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


def load_prompts(args) -> list[dict]:
    rows = read_prompts_file(args.prompts) if args.prompts else [{"prompt": args.prompt or DEFAULT_PROMPT}]
    for row in rows:
        row.setdefault("negative_prompt", args.negative_prompt)
    return rows


# ---------------------------------------------------------------------------------------------- plan

def image_seed(base_seed: int, prompt_row: dict, p: int, i: int) -> int:
    """Seed of image i of prompt p: S + i for a prompt with its own seed S, else hashed from (base, p, i)."""
    if prompt_row.get("seed") is not None:
        return prompt_row["seed"] + i
    digest = hashlib.sha256(f"{base_seed}/{p}/{i}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def plan(prompts: list[dict], args) -> list[list[dict]]:
    """All images in global order (prompt, image), cut into batches of --batch-size."""
    jobs = [dict(prompt_index=p, image_index=i, prompt=row["prompt"], negative_prompt=row["negative_prompt"],
                 seed=image_seed(args.seed, row, p, i), file=f"{p:05d}-{i:04d}.png")
            for p, row in enumerate(prompts) for i in range(args.num_images_per_prompt)]
    return [jobs[k:k + args.batch_size] for k in range(0, len(jobs), args.batch_size)]


def model_name(args) -> str:
    return args.model or "local_pipelines:tiny"


def run_config(args, prompts, device) -> dict:
    """The settings that decide the pixels: a rerun into the same folder must match them."""
    digest = hashlib.sha256(json.dumps(prompts, sort_keys=True).encode()).hexdigest()
    return dict(model=model_name(args), prompts_sha256=digest,
                num_images_per_prompt=args.num_images_per_prompt, seed=args.seed,
                steps=args.steps, guidance_scale=args.guidance_scale, height=args.height, width=args.width,
                batch_size=args.batch_size, dtype=args.dtype, attention_backend=args.attention_backend,
                device_type=device.type)


def check_run_config(out: Path, config: dict, is_main: bool):
    path = out / "run.json"
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise UsageError(f"{path} is not valid JSON; use another --out or delete {out}/") from None
        changed = [f"{k}: {old.get(k)!r} -> {config[k]!r}" for k in config if old.get(k) != config[k]]
        if changed:
            raise UsageError(f"{out}/ holds images made with other settings ({'; '.join(changed)}); "
                             f"use another --out or delete {out}/")
    elif is_main:
        atomic_write(path, json.dumps(config, indent=1).encode())


# ----------------------------------------------------------------------------------------- pipeline

def load_pipeline(args, device, dtype):
    import torch

    from diffusers import StableDiffusionPipeline, local_pipelines

    if args.model is None:
        pipe = local_pipelines.stable_diffusion("tiny")
        for name in ("unet", "vae", "text_encoder", "safety_checker"):
            module = getattr(pipe, name, None)
            if isinstance(module, torch.nn.Module):
                module.to(dtype)
    else:
        try:
            pipe = StableDiffusionPipeline.from_pretrained(args.model, torch_dtype=dtype)
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot load --model {args.model}: {e}") from None
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    if hasattr(pipe, "set_attention_backend"):
        pipe.set_attention_backend(args.attention_backend)
    return pipe


def check_backend(name: str):
    """Refuse an unknown or unavailable --attention-backend before loading any model."""
    from diffusers import DiffusionPipeline

    if not hasattr(DiffusionPipeline, "set_attention_backend"):
        if name != "auto":
            raise UsageError(f"--attention-backend {name}: this diffusers build has no attention backends "
                             "(DiffusionPipeline.set_attention_backend is missing); use --attention-backend auto")
        return
    from diffusers.models.attention_dispatch import backend_status

    status = {n: (ok, why) for n, ok, why in backend_status()}
    if name != "auto" and name not in status:
        raise UsageError(f"--attention-backend {name}: unknown; choose one of: auto, {', '.join(status)}")
    if name in status and not status[name][0]:
        raise UsageError(f"--attention-backend {name} is not available here: {status[name][1]}")


def backend_error():
    """The exception an attention backend raises when it cannot serve a call (none without the dispatcher)."""
    try:
        from diffusers.models.attention_dispatch import AttentionBackendError
    except ImportError:
        return ()
    return AttentionBackendError


def initial_latents(pipe, batch, args, device, dtype):
    """Each image's latents drawn on the CPU from its own generator: batching cannot change them."""
    import torch

    shape = (pipe.unet.in_channels, args.height // 8, args.width // 8)
    noise = [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(job["seed"])) for job in batch]
    return torch.stack(noise).to(device=device, dtype=dtype)


def generate_batch(pipe, batch, args, device, dtype):
    start = time.perf_counter()
    try:
        result = pipe([job["prompt"] for job in batch], negative_prompt=[job["negative_prompt"] for job in batch],
                      height=args.height, width=args.width, num_inference_steps=args.steps,
                      guidance_scale=args.guidance_scale, latents=initial_latents(pipe, batch, args, device, dtype))
    except backend_error() as e:
        raise UsageError(f"--attention-backend {args.attention_backend}: {e}") from None
    nsfw = result.nsfw_content_detected or [False] * len(batch)
    return result.images, nsfw, time.perf_counter() - start


# ------------------------------------------------------------------------------------------- output

def atomic_write(path: Path, data: bytes):
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class Writer:
    """Saves PNGs (temp name, then rename) and appends manifest rows to this process's part file."""

    def __init__(self, out: Path, rank: int, stop_after=None):
        self.out, self.rank, self.stop_after, self.count = out, rank, stop_after, 0
        self.part = open(out / f"manifest.part-{rank}.jsonl", "a", encoding="utf-8")

    def save(self, image, row: dict):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        data = buf.getvalue()
        tmp = self.out / f".{row['file']}.{os.getpid()}.tmp"
        if self.stop_after is not None and self.count == self.stop_after:  # tests: die while writing
            tmp.write_bytes(data[: len(data) // 2])
            os._exit(3)
        tmp.write_bytes(data)
        self.part.write(json.dumps(row) + "\n")  # row before rename: a PNG on disk always has its row
        self.part.flush()
        os.fsync(self.part.fileno())
        os.replace(tmp, self.out / row["file"])
        self.count += 1

    def close(self):
        self.part.close()


def remove_stale_temps(out: Path):
    for tmp in out.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def merge_manifest(out: Path) -> int:
    """manifest.jsonl := its old rows + every part file's rows, newest row per image, PNG present."""
    rows = {}
    sources = [out / "manifest.jsonl"] + sorted(out.glob("manifest.part-*.jsonl"))
    for src in sources:
        if not src.exists():
            continue
        for line in src.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
            key = (row["prompt_index"], row["image_index"])
            if (out / row["file"]).exists() and row["finished"] >= rows.get(key, {}).get("finished", -1):
                rows[key] = row
    atomic_write(out / "manifest.jsonl", "".join(json.dumps(rows[k]) + "\n" for k in sorted(rows)).encode())
    for src in sources[1:]:
        src.unlink(missing_ok=True)
    return len(rows)


# --------------------------------------------------------------------------------------------- main

def process_state(args):
    """accelerate's view of this process. Without CUDA, processes that torchrun started (accelerate launch
    --multi_gpu) are CPU processes joined over gloo."""
    import torch
    from accelerate import PartialState

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and "MASTER_ADDR" in os.environ and "ACCELERATE_MIXED_PRECISION" in os.environ:
        print("generate.py: accelerate launch started one process (without GPUs it starts several only with "
              "--multi_gpu); this process makes every image", file=sys.stderr)
    cpu = (args.device or "").startswith("cpu") or (world > 1 and not torch.cuda.is_available())
    return PartialState(cpu=cpu)


def pick_device_dtype(args, state):
    import torch

    device = torch.device(args.device) if args.device else state.device
    args.dtype = args.dtype or ("fp16" if device.type == "cuda" else "fp32")
    return device, getattr(torch, DTYPES[args.dtype])


def default_size(args):
    from diffusers import local_pipelines

    size = local_pipelines.default_image_size("tiny") if args.model is None else 512
    args.height, args.width = args.height or size, args.width or size


def manifest_row(job, args, device, state, batch, seconds, nsfw) -> dict:
    return dict(job, backend=args.attention_backend, model=model_name(args), steps=args.steps,
                guidance_scale=args.guidance_scale, height=args.height, width=args.width, dtype=args.dtype,
                device=str(device), batch_size=len(batch), seconds=seconds / len(batch), batch_seconds=seconds,
                nsfw=bool(nsfw), rank=state.process_index, finished=time.time())


def generate_share(pipe, batches, out: Path, args, device, dtype, state):
    """This process's batches; images already on disk (from an interrupted run) are not saved again."""
    from tqdm.auto import tqdm

    writer = Writer(out, state.process_index, args.stop_after)
    desc = f"images (process 0 of {state.num_processes})" if state.num_processes > 1 else "images"
    with tqdm(total=sum(map(len, batches)), unit="img", desc=desc, disable=not state.is_main_process) as bar:
        for batch in batches:
            images, nsfw, seconds = generate_batch(pipe, batch, args, device, dtype)
            for job, image, flagged in zip(batch, images, nsfw):
                if not (out / job["file"]).exists():
                    writer.save(image, manifest_row(job, args, device, state, batch, seconds, flagged))
            bar.update(len(batch))
    writer.close()


def run(args):
    prompts = load_prompts(args)  # bad input fails here, before the heavy imports
    check_backend(args.attention_backend)
    state = process_state(args)
    device, dtype = pick_device_dtype(args, state)
    default_size(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    check_run_config(out, run_config(args, prompts, device), state.is_main_process)
    batches = plan(prompts, args)
    done = sum((out / job["file"]).exists() for batch in batches for job in batch)
    todo = [b for b in batches if not all((out / job["file"]).exists() for job in b)]
    if state.is_main_process:
        remove_stale_temps(out)
    state.wait_for_everyone()  # every process has scanned `out` before anyone writes to it

    pipe = load_pipeline(args, device, dtype)
    with state.split_between_processes(todo) as mine:  # whole batches: the same in any number of processes
        generate_share(pipe, mine, out, args, device, dtype, state)
    state.wait_for_everyone()
    if state.is_main_process:
        rows = merge_manifest(out)
        total = sum(map(len, batches))
        print(f"{total} images ({done} already there) as PNGs in {out}/; manifest {out}/manifest.jsonl ({rows} rows)")


def main(argv=None):
    args = parse_args(argv)
    try:
        run(args)
    except UsageError as e:
        sys.exit(f"generate.py: error: {e}")


if __name__ == "__main__":
    main()
