"""``python -m bench coldstart``: the fast path's cold start, each run in a new process with its own empty
inductor and Triton caches.

  python -m bench coldstart --batch-sizes 1,8 --json coldstart.json

Per batch size, a process per mode, one after the other: ``helper`` (enable_fast_path(compile=True), the VAE
decoder compiled in a helper process), ``no-helper`` (parallel_compile=False), ``cache-write``
(cache=FILE, absent: compiled as fresh and the file written, the UNet compiled ahead of time into it on torch
2.11+), ``cache-load`` (the file written by ``cache-write``, read into empty caches: a new machine with the
file), and ``artifacts-write`` / ``artifacts-load``, the same with torch's artifacts only in the file (the
UNet not compiled ahead: precompile.ENABLED off). Warm-up = enable_fast_path plus the
first pipeline call, which compiles and captures; that call makes only ``--steps`` denoising steps (default
2: the warm-up is about compiling), and ``then_s`` is a second call of the same steps, for scale. SD 1.x
architecture, random weights, fp16, 512x512, guidance 7.5 (``--tiny``: the tiny model on the CPU, where the
fast path does not apply: a check of this script, not a measurement).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import torch

from .common import BenchError, header, machine, parse_ints, table, write_json

MODES = {"helper": dict(parallel_compile=True), "no-helper": dict(parallel_compile=False),
         "cache-write": dict(cache=True), "cache-load": dict(cache=True),
         "artifacts-write": dict(cache=True), "artifacts-load": dict(cache=True)}
LOADS = {"cache-load": "cache-write", "artifacts-load": "artifacts-write"}  # reader -> the writer of its file
CHILD_TIMEOUT_S = 540


def child(job: dict[str, Any]) -> dict[str, Any]:
    """In the new process: build the pipeline, then time enable_fast_path + the first call, and a second."""
    from diffusers.flash.fastpath import engine as fast_path
    from diffusers.flash.fastpath import precompile

    precompile.ENABLED = not job["mode"].startswith("artifacts")  # artifacts-*: the file without the precompiled UNet

    from .pipeline import PROMPT, build

    args = argparse.Namespace(device=job["device"], dtype=job["dtype"], tiny=job["tiny"], model=None,
                              external_diffusers=False, keep_safety_checker=False)
    pipe, _ = build(args)
    torch.set_grad_enabled(False)
    gen = dict(height=job["size"], width=job["size"], num_inference_steps=job["steps"], guidance_scale=7.5,
               output_type="np")

    def call():
        pipe([PROMPT] * job["images"], generator=torch.Generator(job["device"]).manual_seed(0), **gen)
        if job["device"].startswith("cuda"):
            torch.cuda.synchronize()

    options = dict(MODES[job["mode"]], cache=job["cache"]) if job["cache"] else MODES[job["mode"]]
    start = time.perf_counter()
    report = pipe.enable_fast_path(compile=True, **options)
    call()
    warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    call()
    return dict(warmup_s=warmup_s, then_s=time.perf_counter() - start, applied=report,
                models_s=fast_path.warmup_seconds(pipe), helper=fast_path.helper_results(pipe),
                cache=fast_path.cache_status(pipe))


def run_one(job: dict[str, Any], scratch: str, logs: str | None = None) -> dict[str, Any]:
    """``job`` in a new process with empty inductor and Triton caches of its own; its stderr kept as
    ``logs/MODE-IMAGES.log`` where ``logs`` is given (with ``TORCH_LOGS`` set: what each cache key is made of)."""
    caches = tempfile.mkdtemp(prefix=f"{job['mode']}-{job['images']}-", dir=scratch)
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=os.path.join(caches, "inductor"),
               TRITON_CACHE_DIR=os.path.join(caches, "triton"), PYTHONUNBUFFERED="1")
    row = dict(mode=job["mode"], images=job["images"], status="error")
    try:
        proc = subprocess.run([sys.executable, "-m", "bench.coldstart", "--child", json.dumps(job)], env=env,
                              capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return dict(row, reason=f"over {CHILD_TIMEOUT_S} s")
    if logs:
        os.makedirs(logs, exist_ok=True)
        with open(os.path.join(logs, f"{job['mode']}-{job['images']}.log"), "w") as f:
            f.write(proc.stderr)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return dict(row, reason=f"exit status {proc.returncode}: {last[:300]}")
    return dict(row, status="ok", **json.loads(lines[-1]))


COLUMNS = [("mode", "mode", None), ("imgs", "images", None), ("warm-up s", "warmup_s", "{:.1f}"),
           ("UNet s", lambda r: (r.get("models_s") or {}).get("UNet step"), "{:.1f}"),
           ("VAE s", lambda r: (r.get("models_s") or {}).get("VAE decode"), "{:.1f}"),
           ("then s", "then_s", "{:.2f}"),
           ("helper", lambda r: ", ".join(f"{k}: {v}" for k, v in (r.get("helper") or {}).items()) or None, None),
           ("cache", lambda r: r.get("cache") and ("loaded" if r["cache"]["loaded"] else r["cache"]["problem"]
                                                   or "not loaded") + f", written {r['cache']['written']}x", None),
           ("UNet ahead", lambda r: ", ".join(f"{k} {v}" for k, v in ((r.get("cache") or {}).get("precompiled")
                                                                      or {}).items() if v and k != "problems")
            or None, None),
           ("status", lambda r: r["status"] + (f": {r['reason']}" if r.get("reason") else ""), None)]


def render(report: dict[str, Any]) -> str:
    c = report["config"]
    return "\n".join([header(report["machine"]),
                      f"# cold start: each row a new process with empty inductor and Triton caches; warm-up = "
                      f"enable_fast_path(compile=True) + the first call of {c['steps']} steps (not 50: the warm-up "
                      f"is compiling); then s = a second call of {c['steps']} steps; {c['dtype']}, {c['size']}px, "
                      f"{c['model']}", "", table(COLUMNS, report["rows"])])


def parse(argv: Sequence[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench coldstart", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", default="1,8", help="images per call, comma-separated (default 1,8)")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {', '.join(MODES)}")
    ap.add_argument("--steps", type=int, default=2, help="denoising steps of the timed calls (default 2)")
    ap.add_argument("--tiny", action="store_true", help="tiny model, fp32, CPU, 128px: checks this script only")
    ap.add_argument("--json", metavar="FILE", help="write the report as JSON (after every row)")
    ap.add_argument("--logs", metavar="DIR", help="keep each process's stderr here (MODE-IMAGES.log)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    try:
        args.batch_sizes = parse_ints(args.batch_sizes, "--batch-sizes")
        args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        bad = [m for m in args.modes if m not in MODES]
        if bad or not args.modes:
            raise BenchError(f"--modes: unknown {', '.join(map(repr, bad)) or 'none given'}; from {', '.join(MODES)}")
        for load, write in LOADS.items():
            if load in args.modes and write not in args.modes:
                raise BenchError(f"--modes {load} reads the file {write} writes: give both")
        if args.steps < 1:
            raise BenchError(f"--steps must be at least 1, not {args.steps}")
        if not args.tiny and not args.child and not torch.cuda.is_available():
            raise BenchError("no CUDA device: the cold start is a GPU measurement (--tiny checks the script)")
    except BenchError as e:
        ap.error(str(e))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(list(sys.argv[1:] if argv is None else argv))
    if args.child:
        print(json.dumps(child(json.loads(args.child)), default=str))
        return 0
    device, dtype, size = ("cpu", "fp32", 128) if args.tiny else ("cuda", "fp16", 512)
    report = dict(kind="coldstart", schema=1, complete=False, machine=machine(device),
                  config=dict(steps=args.steps, dtype=dtype, size=size, device=device, modes=args.modes,
                              model="tiny, random weights" if args.tiny else "SD 1.x, random weights"), rows=[])
    # cache-write before cache-load, whatever order they were given in
    modes = sorted(args.modes, key=list(MODES).index)
    with tempfile.TemporaryDirectory(prefix="bench-coldstart-") as scratch:
        for images in args.batch_sizes:
            for mode in modes:
                cache = os.path.join(scratch, f"{mode.split('-')[0]}-{images}.bin")
                job = dict(mode=mode, images=images, steps=args.steps, device=device, dtype=dtype, size=size,
                           tiny=args.tiny, cache=cache if MODES[mode].get("cache") else None)
                row = run_one(job, scratch, args.logs)
                if mode in LOADS.values() and os.path.exists(cache):
                    row["cache_file_mib"] = os.path.getsize(cache) / 2**20
                report["rows"].append(row)
                print(f"{mode} x{images}: {row.get('warmup_s', row.get('reason'))}", file=sys.stderr)
                if args.json:
                    write_json(args.json, report)
    report["complete"] = True
    print(render(report))
    if args.json:
        write_json(args.json, report)
        print(f"\nJSON: {args.json}")
    return 1 if any(r["status"] != "ok" for r in report["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
