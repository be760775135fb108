#!/usr/bin/env python3
"""Where a UNet step's GPU time goes, by op family (convolution, matmul, attention, norm, elementwise),
per attention backend: SD 1.x architecture, random weights, fp16, 512x512, classifier-free guidance.

  python scripts/profile_unet.py --images 8 --backends math,auto
"""
import argparse
import re
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from diffusers import local_pipelines
from diffusers.models import attention_dispatch as ad

FAMILIES = [  # first match wins, on aten op names
    ("attention", r"attention|_efficient_attention|_flash_attention|_cudnn_attention|fmha"),
    ("convolution", r"conv|cudnn_convolution"),
    ("matmul", r"addmm|\bmm\b|aten::mm|bmm|matmul|linear|baddbmm"),
    ("softmax", r"softmax"),
    ("norm", r"norm"),
    ("elementwise", r"add|mul|div|sub|silu|gelu|copy|cat|clone|contiguous|to_copy|where|exp|sin|cos|pow|neg|fill"),
]


def family(name: str) -> str:
    for fam, pattern in FAMILIES:
        if re.search(pattern, name):
            return fam
    return "other"


def profile_step(unet, images, steps=3):
    dev, dt = "cuda", torch.float16
    sample = torch.randn(2 * images, 4, 64, 64, device=dev, dtype=dt)
    text = torch.randn(2 * images, 77, 768, device=dev, dtype=dt)
    t = torch.tensor(500, device=dev)
    with torch.no_grad():
        for _ in range(2):
            unet(sample, t, encoder_hidden_states=text)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                unet(sample, t, encoder_hidden_states=text)
            torch.cuda.synchronize()
    totals = defaultdict(float)
    for ev in prof.key_averages():
        if ev.key.startswith("aten::") and ev.self_device_time_total > 0:
            totals[family(ev.key)] += ev.self_device_time_total / 1000 / steps
    return totals


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--backends", default="math,auto")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_unet.py needs CUDA")
    unet = local_pipelines.components("sd1")["unet"].to("cuda", torch.float16).eval()
    print(f"# {torch.cuda.get_device_name()}; torch {torch.__version__}; UNet batch {2 * args.images} "
          f"({args.images} images + guidance), fp16, 64x64 latents; GPU ms per step by op family (self time)")
    rows = {}
    for name in args.backends.split(","):
        unet.set_attention_backend(name)
        rows[name] = profile_step(unet, args.images)
    fams = [f for f, _ in FAMILIES] + ["other"]
    print("| backend | " + " | ".join(fams) + " | total |")
    print("|---" * (len(fams) + 2) + "|")
    for name, t in rows.items():
        print(f"| {name} | " + " | ".join(f"{t.get(f, 0):.2f}" for f in fams) + f" | {sum(t.values()):.2f} |")


if __name__ == "__main__":
    main()
