#!/usr/bin/env python3
"""Does the fast path keep the images, and how long does it take to warm up in this process?

SD 1.x architecture with random weights (the same pipeline as scripts/benchmark.py, safety checker left
out), fp16, 512x512, 50 steps, one seed: the plain pipeline's image against enable_fast_path()'s, as the
largest difference in 8-bit pixel levels. Run it after a benchmark on the same machine to see the warm-up
of a second process (torch.compile's caches warm).

  python scripts/check_fast_path.py --compile --images 1
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmark import drop_safety_checker, place  # noqa: E402

from diffusers import fast_path, local_pipelines  # noqa: E402


def generate(pipe, images, steps, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    out = pipe(["a lighthouse at dusk"] * images, num_inference_steps=steps, generator=g, output_type="np")
    torch.cuda.synchronize()
    return np.asarray(out.images)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--no-parallel-compile", dest="parallel_compile", action="store_false",
                    help="compile the VAE decoder in this process after the UNet, not in a helper process")
    ap.add_argument("--json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("check_fast_path.py needs CUDA")
    pipe = place(local_pipelines.stable_diffusion("sd1"), "cuda", torch.float16)
    drop_safety_checker(pipe)
    plain = generate(pipe, args.images, args.steps)
    start = time.perf_counter()
    report = pipe.enable_fast_path(compile=args.compile, parallel_compile=args.parallel_compile)
    first = generate(pipe, args.images, args.steps)
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    again = generate(pipe, args.images, args.steps)
    steady_s = time.perf_counter() - start
    levels = lambda a, b: float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max() * 255)  # noqa: E731
    row = dict(card=torch.cuda.get_device_name(), torch=torch.__version__, images=args.images, steps=args.steps,
               compile=args.compile, applied={k: v for k, v in report.items() if k != "reasons"},
               reasons=report["reasons"], parallel_compile=args.parallel_compile,
               warmup_s=round(first_s - steady_s, 1), steady_s=round(steady_s, 3),
               warmup_parts={k: round(v, 2) for k, v in fast_path.warmup_seconds(pipe).items()},
               compile_helper=fast_path.helper_results(pipe),
               max_diff_levels=round(levels(first, plain), 3),
               mean_diff_levels=round(float(np.abs(first.astype(np.float64) - plain).mean() * 255), 4),
               replay_repeatable=bool(np.array_equal(first, again)))
    print(json.dumps(row))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(row, f, indent=1)
    if row["max_diff_levels"] > 2:
        raise SystemExit(f"the fast path changed the image by {row['max_diff_levels']:.2f}/255 (> 2/255)")


if __name__ == "__main__":
    main()
