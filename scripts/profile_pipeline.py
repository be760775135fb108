#!/usr/bin/env python3
"""Where a whole fast-path pipeline call's time goes: GPU busy time against wall time, kernel time by family,
and the longest stretches where the GPU waits for the host.

SD 1.x architecture with random weights (scripts/benchmark.py's pipeline, safety checker left out), fp16,
512x512, 50 steps: enable_fast_path(compile=...), one warm-up call, then one call under torch.profiler.

  python scripts/profile_pipeline.py --images 1 --compile full --json out/profile.json
"""
import argparse
import json
import os
import re
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmark import drop_safety_checker, place  # noqa: E402
from fast_path_variants import FAMILIES  # noqa: E402

from diffusers import local_pipelines  # noqa: E402


def call(pipe, images, steps):
    g = torch.Generator(device="cuda").manual_seed(0)
    pipe(["a lighthouse at dusk"] * images, num_inference_steps=steps, generator=g, output_type="np")
    torch.cuda.synchronize()


def summarize(prof, wall_ms):
    kernels = sorted(((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                      if e.device_type == torch.autograd.DeviceType.CUDA), key=lambda k: k[0])
    busy, gaps, fams, end = 0.0, [], {}, None
    for start, stop, name in kernels:
        fam = next(f for f, pat in FAMILIES if re.search(pat, name, re.I))
        fams[fam] = fams.get(fam, 0.0) + (stop - start) / 1000
        if end is not None and start > end:
            gaps.append(((start - end) / 1000, name[:80]))
        busy += max(0.0, stop - max(start, end or start)) / 1000
        end = max(end or stop, stop)
    span = (end - kernels[0][0]) / 1000 if kernels else 0.0
    gaps.sort(reverse=True)
    return dict(wall_ms=round(wall_ms, 2), gpu_span_ms=round(span, 2), gpu_busy_ms=round(busy, 2),
                gpu_idle_in_span_ms=round(span - busy, 2), kernels=len(kernels),
                families_ms={k: round(v, 2) for k, v in sorted(fams.items(), key=lambda kv: -kv[1])},
                longest_gaps_ms=[(round(g, 3), n) for g, n in gaps[:10]],
                gaps_over_20us=sum(1 for g, _ in gaps if g > 0.02),
                gap_ms_total=round(sum(g for g, _ in gaps), 2))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--compile", choices=("none", "full", "regional"), default="full")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    pipe = place(local_pipelines.stable_diffusion("sd1"), "cuda", torch.float16)
    drop_safety_checker(pipe)
    pipe.set_progress_bar_config(disable=True)
    pipe.enable_fast_path(compile={"none": False, "full": True, "regional": "regional"}[args.compile])
    call(pipe, args.images, args.steps)
    start = time.perf_counter()
    call(pipe, args.images, args.steps)
    plain_ms = (time.perf_counter() - start) * 1000
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        call(pipe, args.images, args.steps)
        wall_ms = (time.perf_counter() - start) * 1000
    row = dict(card=torch.cuda.get_device_name(), torch=torch.__version__, images=args.images, steps=args.steps,
               compile=args.compile, unprofiled_wall_ms=round(plain_ms, 2), **summarize(prof, wall_ms))
    print(json.dumps(row, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(row, f, indent=1)


if __name__ == "__main__":
    main()
