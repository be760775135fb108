#!/usr/bin/env python3
"""Throughput of an examples/generate.py run from its manifest: images / the busiest process's
generation time (model loading excluded), per folder given. Compares runs with 1 and N processes.

  python scripts/manifest_throughput.py out-1gpu out-2gpu
"""
import json
import sys
from collections import defaultdict
from pathlib import Path


def throughput(folder):
    rows = [json.loads(line) for line in (Path(folder) / "manifest.jsonl").read_text().splitlines() if line.strip()]
    busy = defaultdict(float)
    for r in rows:
        busy[r["rank"]] += r["seconds"]  # each image carries its share of its batch's time
    return len(rows), len(busy), len(rows) / max(busy.values())


def main(folders):
    base = None
    for folder in folders:
        images, procs, rate = throughput(folder)
        base = base or rate
        print(f"{folder}: {images} images on {procs} process(es): {rate:.3f} img/s ({rate / base:.2f}x the first)")


if __name__ == "__main__":
    main(sys.argv[1:])
