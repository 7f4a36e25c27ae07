"""Duplicate search on copies generated from the real crops in ../shared/data.

The other images are windows of the real data: every Zheng crop (centred on
its white cell), a window around every BCCD white cell, then, to reach
``--n``, grids of non-overlapping windows of the BCCD fields (red cells, which
look alike; 100 pixels, then 80 pixels past about 10,000 images). A quarter
of the images are copies of another one: a window of the same source moved by
up to 30% of its side (overlap at least 50%), zoomed by up to +-15%, turned by
one of the 8 flips/rotations, with brightness/contrast changed by up to 8%,
and re-encoded as JPEG, TIFF or BMP. Sources that the real data itself holds
twice (the pairs checked by eye in tests/test_duplicates.py, and BCCD fields
that overlap by less than half but show the same white cell, checked by eye
in the windows the search paired) count as one source.

Prints recall (copies joined to their original, directly or through their
group), false pairs per 1,000 images (pairs whose windows share no pixel of
one source; windows that do share pixels may pair), the time (wall and CPU)
and peak memory of building an index of all but ``--add`` images, and the
time to add the last ``--add`` images to it.

    .venv/bin/python benchmarks/duplicates.py --n 3000 --add 1000 --workers 2
    .venv/bin/python benchmarks/duplicates.py --n 20000 --add 1000 --workers 2
"""

from __future__ import annotations

import argparse
import hashlib
import io
import resource
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from leukflow.data.duplicates import MIN_OVERLAP, find_duplicates, image_thumbnail

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
#: Files of the real data that show the same cells (checked by eye).
SAME_SOURCE = [
    *[(f"zheng1/{a:03d}", f"zheng1/{b:03d}") for a, b in [
        (112, 139), (166, 171), (70, 72), (56, 92), (71, 84), (157, 158), (167, 169),
        (60, 90), (30, 86), (51, 73), (19, 75), (26, 89), (54, 91)]],
    *[(f"bccd/{a:05d}", f"bccd/{b:05d}") for a, b in [
        (37, 38), (384, 393), (205, 276), (230, 257), (227, 260), (242, 249), (231, 256),
        (386, 391), (206, 278), (382, 395), (244, 247), (223, 263), (226, 261), (204, 277),
        (224, 264), (233, 254), (243, 250), (236, 253), (248, 249), (381, 397), (229, 258),
        (237, 252)]],
    # fields that overlap by less than half (not pairs of whole files), whose white
    # cells are the same (checked by eye in the windows the search paired)
    *[(f"bccd/{a:05d}", f"bccd/{b:05d}") for a, b in [
        (166, 193), (364, 409), (225, 262), (232, 255), (44, 45)]],
]  # fmt: skip
TRANSPOSES = [None, Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180,
              Image.Transpose.ROTATE_270, Image.Transpose.FLIP_LEFT_RIGHT,
              Image.Transpose.FLIP_TOP_BOTTOM, Image.Transpose.TRANSPOSE,
              Image.Transpose.TRANSVERSE]  # fmt: skip


def load_sources(data: Path) -> tuple[dict[str, np.ndarray], list[tuple[str, float, float, int]]]:
    """Real images by name, and the cell windows ``(source, cy, cx, side)`` to start from."""
    images, cells = {}, []
    for ds, folder, side in (("zheng1", "Dataset 1", 0.7), ("zheng2", "Dataset 2", 0.6)):
        for path in sorted((data / "segmentation_WBC" / folder).glob("*.bmp")):
            rgb = np.asarray(Image.open(path).convert("RGB"))
            name = f"{ds}/{path.stem}"
            images[name] = rgb
            h, w = rgb.shape[:2]
            cells.append((name, h / 2, w / 2, int(side * min(h, w))))
    bccd = data / "BCCD_Dataset" / "BCCD"
    for path in sorted((bccd / "JPEGImages").glob("*.jpg")):
        name = f"bccd/{path.stem.split('_')[-1]}"
        images[name] = np.asarray(Image.open(path).convert("RGB"))
        for obj in ET.parse(bccd / "Annotations" / f"{path.stem}.xml").iter("object"):
            if obj.findtext("name") == "WBC":
                box = [
                    float(obj.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax")
                ]
                side = int(np.clip(1.2 * max(box[2] - box[0], box[3] - box[1]), 96, 200))
                cells.append((name, (box[1] + box[3]) / 2, (box[0] + box[2]) / 2, side))
    return images, cells


def same_field_names() -> dict[str, str]:
    """Each file of :data:`SAME_SOURCE` -> one name for all files that show its field."""
    root: dict[str, str] = {}

    def find(name: str) -> str:
        while root.get(name, name) != name:
            name = root[name]
        return name

    for a, b in SAME_SOURCE:
        ra, rb = find(a), find(b)
        if ra != rb:
            root[max(ra, rb)] = min(ra, rb)
    return {name: find(name) for pair in SAME_SOURCE for name in pair}


def clamp(rgb: np.ndarray, cy: float, cx: float, side: int) -> tuple[int, int, int]:
    """Top-left corner and side of a window kept inside the image."""
    h, w = rgb.shape[:2]
    side = min(side, h, w)
    y0 = int(np.clip(round(cy - side / 2), 0, h - side))
    x0 = int(np.clip(round(cx - side / 2), 0, w - side))
    return y0, x0, side


def encode(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Re-encode as JPEG, TIFF or BMP and decode again."""
    fmt = rng.choice(["JPEG", "TIFF", "BMP"])
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format=fmt, **({"quality": int(rng.integers(75, 96))}
                                                  if fmt == "JPEG" else {}))  # fmt: skip
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def make_copy(rgb, window, rng):
    """A shifted, zoomed, turned, re-lit and re-encoded copy of a window."""
    y0, x0, side = window
    while True:
        fy, fx = rng.uniform(-0.3, 0.3, 2)
        if (1 - abs(fy)) * (1 - abs(fx)) >= MIN_OVERLAP + 0.02:
            break
    scale = float(np.exp(rng.uniform(np.log(1 / 1.15), np.log(1.15))))
    cy, cx = y0 + side / 2 + fy * side, x0 + side / 2 + fx * side
    cy0, cx0, cside = clamp(rgb, cy, cx, round(side * scale))
    crop = Image.fromarray(rgb[cy0 : cy0 + cside, cx0 : cx0 + cside])
    out_px = round(side * rng.uniform(0.85, 1.15))
    crop = crop.resize((out_px, out_px), Image.Resampling.BILINEAR)
    turn = TRANSPOSES[rng.integers(len(TRANSPOSES))]
    if turn is not None:
        crop = crop.transpose(turn)
    gain, offset = rng.uniform(0.92, 1.08), rng.uniform(-8, 8)
    pixels = np.clip(np.asarray(crop, float) * gain + offset, 0, 255).astype(np.uint8)
    return encode(pixels, rng), (cy0, cx0, cside)


def _grid(images: dict[str, np.ndarray], side: int) -> list:
    """Non-overlapping ``side``-pixel windows of every BCCD field."""
    return [
        (src, (y0, x0, side))
        for src in sorted(k for k in images if k.startswith("bccd/"))
        for y0 in range(0, images[src].shape[0] - side + 1, side)
        for x0 in range(0, images[src].shape[1] - side + 1, side)
    ]


def build(n: int, seed: int = 0, data: Path = DATA):
    """Manifest of ``n`` generated images (thumbnails only) and each image's source window."""
    rng = np.random.default_rng(seed)
    images, cells = load_sources(data)
    alias = same_field_names()
    windows = [(src, clamp(images[src], cy, cx, side)) for src, cy, cx, side in cells]
    n_copies = n // 4
    grid = _grid(images, 100)
    rng.shuffle(grid)
    # past about 10,000 images, 80-pixel windows too (their own generator keeps the
    # smaller sets as they were); they overlap the 100-pixel ones, which the score allows
    finer = _grid(images, 80)
    np.random.default_rng(seed + 1).shuffle(finer)
    grid += finer
    windows = (windows + grid)[: n - n_copies]
    rows, truth = [], []

    def add(name, src, rgb, region):
        rows.append({
            "image_id": f"bench/{name}", "dataset": "bench", "width": rgb.shape[1],
            "height": rgb.shape[0],
            "pixel_sha256": hashlib.sha256(f"{rgb.shape}".encode() + rgb.tobytes()).hexdigest(),
            "thumbnail": image_thumbnail(rgb).tobytes(),
        })  # fmt: skip
        truth.append((alias.get(src, src), src, *region))

    for k, (src, (y0, x0, side)) in enumerate(windows):
        add(f"w{k:06d}", src, encode(images[src][y0 : y0 + side, x0 : x0 + side], rng),
            (y0, x0, side))  # fmt: skip
    originals = rng.choice(len(windows), size=n_copies, replace=n_copies > len(windows))
    for k, w in enumerate(originals):
        src, window = windows[w]
        rgb, region = make_copy(images[src], window, rng)
        add(f"c{k:06d}", src, rgb, region)
    order = rng.permutation(len(rows))
    manifest = pd.DataFrame([rows[i] for i in order])
    truth = [truth[i] for i in order]
    copies = [(f"bench/w{w:06d}", f"bench/c{k:06d}") for k, w in enumerate(originals)]
    return manifest, truth, copies


def shares_pixels(t1: tuple, t2: tuple) -> bool:
    """Whether two windows share pixels of one source (any two files of one field do)."""
    if t1[0] != t2[0]:
        return False
    if t1[1] != t2[1]:
        return True  # two files of one field, shifted: regions are not comparable
    (y1, x1, s1), (y2, x2, s2) = t1[2:], t2[2:]
    return min(y1 + s1, y2 + s2) > max(y1, y2) and min(x1 + s1, x2 + s2) > max(x1, x2)


def score(manifest, truth, copies, pairs) -> tuple[float, float, int, list]:
    """Recall of copies (joined through groups) and the false pairs."""
    index = {i: n for n, i in enumerate(manifest["image_id"])}
    parent = list(range(len(index)))

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    false = []
    for a, b in zip(pairs["image_id_a"], pairs["image_id_b"], strict=True):
        ia, ib = index[a], index[b]
        parent[find(ia)] = find(ib)
        ta, tb = truth[ia], truth[ib]
        if not shares_pixels(ta, tb):
            false.append((a, b))
    direct = set(zip(pairs["image_id_a"], pairs["image_id_b"], strict=True))
    direct |= {(b, a) for a, b in direct}
    found = sum(find(index[a]) == find(index[b]) for a, b in copies)
    found_direct = sum((a, b) in direct for a, b in copies)
    sizes = pd.Series([find(i) for i in range(len(index))]).value_counts()
    return found / len(copies), found_direct / len(copies), int(sizes.max()), false


def cpu_s() -> float:
    """CPU seconds of this process and its finished workers (fair on a busy machine)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def child_rss_mb() -> float:
    """Peak resident memory of the largest finished worker, MB."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3000, help="images in the search")
    parser.add_argument("--add", type=int, default=1000, help="images added to an index")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-distance", type=float, default=None)
    parser.add_argument(
        "--check-scratch", action="store_true", help="also search all at once and compare"
    )
    args = parser.parse_args()
    max_distance = args.max_distance
    if max_distance is None:
        from leukflow.data.duplicates import DEFAULT_MAX_DISTANCE as max_distance
    start = time.perf_counter()
    manifest, truth, copies = build(args.n)
    print(
        f"generated {len(manifest)} images ({len(copies)} copies) in "
        f"{time.perf_counter() - start:.0f} s; peak RSS so far {peak_rss_mb():.0f} MB"
    )
    rss_before = peak_rss_mb()
    with tempfile.TemporaryDirectory() as cache:
        old = manifest.iloc[: len(manifest) - args.add]
        wall, cpu = time.perf_counter(), cpu_s()
        find_duplicates(old, max_distance=max_distance, cache_dir=cache, n_workers=args.workers)
        wall, cpu = time.perf_counter() - wall, cpu_s() - cpu
        print(
            f"search of {len(old)} images on {args.workers} workers: {wall:.1f} s wall, "
            f"{cpu:.1f} s CPU (all processes); peak RSS {peak_rss_mb():.0f} MB in the main "
            f"process (before the search {rss_before:.0f} MB), {child_rss_mb():.0f} MB in a worker"
        )
        wall, cpu = time.perf_counter(), cpu_s()
        pairs = find_duplicates(
            manifest, max_distance=max_distance, cache_dir=cache, n_workers=args.workers
        )
        wall, cpu = time.perf_counter() - wall, cpu_s() - cpu
        print(
            f"add {args.add} images to that index: {wall:.1f} s wall, {cpu:.1f} s CPU; "
            f"peak RSS {peak_rss_mb():.0f} MB"
        )
    recall, recall_direct, largest, false = score(manifest, truth, copies, pairs)
    print(
        f"{len(manifest)} images: pairs found {len(pairs)}; recall on copies {recall:.3f} "
        f"(direct pair {recall_direct:.3f}); false pairs {len(false)} = "
        f"{1000 * len(false) / len(manifest):.2f} per 1,000 images; largest group {largest}"
    )
    row = {image_id: n for n, image_id in enumerate(manifest["image_id"])}
    for a, b in false[:20]:
        print("  false:", a, truth[row[a]], b, truth[row[b]])
    if args.check_scratch:
        scratch = find_duplicates(manifest, max_distance=max_distance, n_workers=args.workers)
        print(f"same pairs as one search of all {len(manifest)}: {_same(scratch, pairs)}")


def _same(x: pd.DataFrame, y: pd.DataFrame) -> bool:
    keys = ["image_id_a", "image_id_b"]
    return (
        x.sort_values(keys)
        .reset_index(drop=True)
        .equals(y.sort_values(keys).reset_index(drop=True))
    )


if __name__ == "__main__":
    main()
