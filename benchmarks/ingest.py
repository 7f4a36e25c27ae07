"""Ingest throughput and memory on a generated set of smear crops.

Prints, on the same files in one run: a bare loop that only hashes and decodes
each file (sha256 + Pillow load), leukflow's ingest on 1 worker and on 2
workers (decode, hash, pixel hash, size checks, thumbnail), and the peak
memory of ingest for a quarter of the set and for the whole set.

    .venv/bin/python benchmarks/ingest.py --n 20000
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image


def generate(folder: Path, n: int, size_px: int) -> list[str]:
    """Write ``n`` distinct JPEG crops (a dark disc on a pale field, noise, shifts)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size_px, :size_px]
    names = []
    for i in range(n):
        cy, cx = rng.uniform(0.3, 0.7, 2) * size_px
        r = rng.uniform(0.15, 0.3) * size_px
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
        img = np.full((size_px, size_px, 3), (230, 215, 210), float)
        img[disc] = (90, 50, 130)
        img += rng.normal(0, 6, img.shape)
        name = f"crops/{i // 1000:03d}/cell_{i:06d}.jpg"
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / name, quality=90)
        names.append(name)
    return names


def bare_loop(folder: Path, names: list[str]) -> float:
    start = time.perf_counter()
    for name in names:
        hashlib.sha256((folder / name).read_bytes()).hexdigest()
        with Image.open(folder / name) as im:
            im.load()
    return time.perf_counter() - start


def leukflow_ingest(folder: Path, names: list[str], n_workers: int) -> tuple[float, int]:
    from leukflow.data.ingest import ingest_images

    records = pd.DataFrame({"path": names, "label": "x", "patient": names})
    start = time.perf_counter()
    manifest, rejects = ingest_images(
        records, dataset="bench", root=folder, min_size_px=8, n_workers=n_workers
    )
    elapsed = time.perf_counter() - start
    if len(manifest) != len(names) or len(rejects):
        raise RuntimeError(f"ingest kept {len(manifest)} of {len(names)} images: {rejects}")
    return elapsed, len(manifest)


def peak_memory_mb(folder: Path, n: int) -> float:
    """Peak resident memory (VmHWM, MB) of a fresh process ingesting the first ``n`` files.

    One worker, so decoding, hashing and the growing manifest all live in the
    measured process. (VmHWM restarts at exec, unlike ru_maxrss.)
    """
    code = (
        "import json, sys; sys.path.insert(0, 'benchmarks');"
        "from ingest import leukflow_ingest; from pathlib import Path;"
        f"names = json.load(open({str(folder / 'names.json')!r}))[:{n}];"
        f"leukflow_ingest(Path({str(folder)!r}), names, 1);"
        "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000, help="images (default 20000)")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="leukflow-bench-") as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        names = generate(folder, args.n, args.size)
        (folder / "names.json").write_text(json.dumps(names))
        print(
            f"generated {args.n} JPEG crops of {args.size}x{args.size} px "
            f"in {time.perf_counter() - start:.1f} s"
        )
        bare = bare_loop(folder, names)
        one, _ = leukflow_ingest(folder, names, 1)
        two, _ = leukflow_ingest(folder, names, 2)
        print(f"bare loop (sha256 + decode), 1 process: {args.n / bare:8.0f} images/s")
        print(
            f"leukflow ingest, 1 worker:              {args.n / one:8.0f} images/s "
            f"({one / bare:.2f}x the bare loop's time)"
        )
        print(
            f"leukflow ingest, 2 workers:             {args.n / two:8.0f} images/s "
            f"(speed-up {one / two:.2f}x over 1 worker)"
        )
        quarter, whole = peak_memory_mb(folder, args.n // 4), peak_memory_mb(folder, args.n)
        print(
            f"peak memory of ingest (1 worker, VmHWM): {quarter:.0f} MB for {args.n // 4} "
            f"images, {whole:.0f} MB for {args.n} images"
        )


if __name__ == "__main__":
    main()
