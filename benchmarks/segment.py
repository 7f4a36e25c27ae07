"""Segmentation speed: leukflow against the bare kernel loop, on 1 and 2 workers.

On the same images in one run (BCCD's 640x480 fields from ../shared/data, and
generated 2592x1944 smears the size of ALL-IDB1's), prints:

- the bare kernel loop: the numpy / scikit-image calls of S0 (read, grey,
  multi-Otsu, opening, closing, hole filling, small-object removal, labels,
  region boxes, edge-padded square crops, resize) and nothing else, in one
  process;
- leukflow's segmentation (``segment_to_store``: dask tasks, field checks, ROI
  tables, crops streamed to zarr) on 1 worker and on 2 workers;
- the parallel efficiency (1-worker time / (2 x 2-worker time)) and the peak
  memory of leukflow on a quarter of the images and on all of them.

    .venv/bin/python benchmarks/segment.py [--fields 24] [--bccd 120] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import color, filters, measure, morphology, transform

from leukflow.data.demo import draw_demo_dataset
from leukflow.segment import SegmentParams, segment_to_store

REPO = Path(__file__).resolve().parents[1]
BCCD = REPO.parent / "shared" / "data" / "BCCD_Dataset" / "BCCD" / "JPEGImages"
PARAMS = SegmentParams()  # S0 as published: grey, 3 classes, min area 250


def bare_loop(paths: list[Path]) -> tuple[float, int]:
    """S0's kernels alone, one image after the other."""
    p, n_rois = PARAMS, 0
    start = time.perf_counter()
    for path in paths:
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"))
        grey = color.rgb2gray(rgb)
        mask = grey < filters.threshold_multiotsu(grey, classes=p.classes)[0]
        mask = morphology.opening(mask, morphology.disk(1))
        mask = morphology.closing(mask, morphology.disk(p.closing_radius_px))
        mask = morphology.remove_small_holes(mask, max_size=p.min_area_px)
        mask = morphology.remove_small_objects(mask, max_size=p.min_area_px - 1)
        for region in measure.regionprops(measure.label(mask)):
            r0, c0, r1, c1 = region.bbox
            side = int(np.ceil(max(r1 - r0, c1 - c0) * (1 + 2 * p.roi_margin)))
            y0, x0 = (r0 + r1 - side) // 2, (c0 + c1 - side) // 2
            crop = rgb[max(0, y0) : y0 + side, max(0, x0) : x0 + side]
            if crop.shape[:2] != (side, side):  # squares past the edge repeat edge pixels
                h, w = rgb.shape[:2]
                pad = ((max(0, -y0), max(0, y0 + side - h)), (max(0, -x0), max(0, x0 + side - w)))
                crop = np.pad(crop, (*pad, (0, 0)), mode="edge")
            transform.resize(crop, (p.roi_size_px, p.roi_size_px), anti_aliasing=True)
            n_rois += 1
    return time.perf_counter() - start, n_rois


def leukflow_run(paths: list[Path], n_workers: int, out: Path) -> tuple[float, int]:
    start = time.perf_counter()
    result = segment_to_store(
        paths, [p.stem for p in paths], params=PARAMS, crops_path=out / f"crops_{n_workers}.zarr",
        attrs={}, n_workers=n_workers, chunk_size=4,
    )  # fmt: skip
    return time.perf_counter() - start, len(result.rois)


def peak_memory_mb(paths: list[Path], out: Path) -> float:
    """VmHWM (MB) of a fresh process segmenting ``paths`` on 1 worker."""
    listing = out / "paths.json"
    listing.write_text(json.dumps([str(p) for p in paths]))
    code = (
        "import json, sys; from pathlib import Path; sys.path.insert(0, 'benchmarks');"
        "from segment import leukflow_run;"
        f"leukflow_run([Path(p) for p in json.load(open({str(listing)!r}))], 1, "
        f"Path({str(out)!r}));"
        "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=REPO)  # fmt: skip
    return float(run.stdout.split()[-1]) / 1024


def smears(folder: Path, n: int) -> list[Path]:
    """``n`` demo fields upscaled to 2592x1944, the size of ALL-IDB1's smears."""
    draw_demo_dataset(folder / "demo", n_fields=max(n, 2), seed=0, fields_per_patient=1)
    paths = []
    for src in sorted((folder / "demo" / "images").glob("*.png"))[:n]:
        big = Image.open(src).resize((2592, 1944), Image.Resampling.BICUBIC)
        paths.append(folder / f"{src.stem}_2592.jpg")
        big.save(paths[-1], quality=92)
    return paths


def report(name: str, paths: list[Path], out: Path, repeats: int) -> None:
    # bare and leukflow alternate, and each keeps its fastest of `repeats` runs, so
    # that a busy machine slows neither side more than the other
    bare = one = two = float("inf")
    for _ in range(repeats):
        t, n_bare = bare_loop(paths)
        bare = min(bare, t)
        t, n_one = leukflow_run(paths, 1, out)
        one = min(one, t)
        t, n_two = leukflow_run(paths, 2, out)
        two = min(two, t)
    if not n_bare == n_one == n_two:
        raise RuntimeError(f"ROI counts differ: bare {n_bare}, 1 worker {n_one}, 2 {n_two}")
    quarter = peak_memory_mb(paths[: max(1, len(paths) // 4)], out)
    whole = peak_memory_mb(paths, out)
    n = len(paths)
    print(f"{name}: {n} images, {n_one} ROIs (fastest of {repeats} alternating runs)")
    print(f"  bare kernel loop:      {bare:7.2f} s  ({n / bare:6.1f} images/s)")
    print(
        f"  leukflow, 1 worker:    {one:7.2f} s  ({one / bare:.2f}x the bare loop; target <= 1.1)"
    )
    print(f"  leukflow, 2 workers:   {two:7.2f} s  (parallel efficiency {one / (2 * two):.2f}; "
          "target >= 0.85)")  # fmt: skip
    print(f"  peak memory, 1 worker: {quarter:.0f} MB for {max(1, n // 4)} images, "
          f"{whole:.0f} MB for {n}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fields", type=int, default=24, help="2592x1944 smears (default 24)")
    parser.add_argument("--bccd", type=int, default=120, help="BCCD fields (default 120)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each (default 3)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="leukflow-seg-") as tmp:
        out = Path(tmp)
        if BCCD.is_dir():
            report("BCCD 640x480", sorted(BCCD.glob("*.jpg"))[: args.bccd], out, args.repeats)
        else:
            print(f"BCCD skipped: {BCCD} not found")
        report("generated 2592x1944 smears", smears(out, args.fields), out, args.repeats)


if __name__ == "__main__":
    main()
