"""Peak memory of ``leukflow serve`` under concurrent large uploads.

Starts the real review server (``leukflow serve``) in a child process on
127.0.0.1 for each scenario, warms it up with one small upload, then sends
``--uploads`` concurrent uploads of one ``--megapixels`` PNG (demo fields tiled)
and reads the child's peak resident memory (``VmHWM``, reset after warm-up
through ``/proc/<pid>/clear_refs``). Prints, per scenario, the peak above the
warm baseline, the answers (303 analysed, 503 busy) and the time; the target
is that 8 concurrent uploads raise the peak by at most 1.5x what one does.

    .venv/bin/python benchmarks/serve_load.py RESULTS_DIR [--megapixels 36]
        [--uploads 8] [--max-decoding 2] [--classifier knn]

Requests are bounded (a timeout on each); nothing listens beyond 127.0.0.1.
"""

from __future__ import annotations

import argparse
import io
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests
from PIL import Image

from leukflow.data.demo import draw_demo_dataset

REQUEST_TIMEOUT_S = 900


def field_png(megapixels: float, work: Path) -> bytes:
    """A PNG of about ``megapixels`` million pixels: real-looking demo fields, tiled."""
    draw_demo_dataset(work, n_fields=4, seed=5, fields_per_patient=1)
    tiles = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(work.rglob("*.png"))]
    side = int((megapixels * 1e6) ** 0.5)
    th, tw = tiles[0].shape[:2]
    rows = []
    for r in range(-(-side // th)):
        row = [tiles[(r + c) % len(tiles)] for c in range(-(-side // tw))]
        rows.append(np.concatenate(row, axis=1))
    big = np.concatenate(rows, axis=0)[:side, :side]
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def scenario(args: argparse.Namespace, png: bytes, n_uploads: int) -> dict:
    """One fresh server, warmed up, then ``n_uploads`` concurrent uploads."""
    port = free_port()
    cmd = [sys.executable, "-m", "leukflow.cli", "serve", "--model", args.results_dir,
           "--host", "127.0.0.1", "--port", str(port), "--max-upload-mb", "200",
           "--max-pixels", str(int(args.megapixels * 1.1e6)),
           "--max-decoding", str(args.max_decoding)]  # fmt: skip
    if args.classifier:
        cmd += ["--classifier", args.classifier]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start: {cmd}")
            try:
                if requests.get(url, timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                time.sleep(0.3)
        small = io.BytesIO()
        Image.fromarray(np.full((480, 640, 3), 230, np.uint8)).save(small, format="PNG")
        requests.post(f"{url}/upload", files={"image": ("warm.png", small.getvalue())},
                      timeout=REQUEST_TIMEOUT_S, allow_redirects=False)  # fmt: skip
        Path(f"/proc/{server.pid}/clear_refs").write_text("5")  # reset VmHWM to now
        base_kib = status_kib(server.pid, "VmRSS")

        def send(i: int) -> int:
            reply = requests.post(
                f"{url}/upload", files={"image": (f"field_{i}.png", png)},
                timeout=REQUEST_TIMEOUT_S, allow_redirects=False,
            )  # fmt: skip
            return reply.status_code

        start = time.perf_counter()
        with ThreadPoolExecutor(n_uploads) as pool:
            codes = list(pool.map(send, range(n_uploads)))
        seconds = time.perf_counter() - start
        peak_kib = status_kib(server.pid, "VmHWM")
    finally:
        server.terminate()
        server.wait(timeout=30)
    return {
        "base_mib": base_kib / 1024,
        "raise_mib": (peak_kib - base_kib) / 1024,
        "codes": {c: codes.count(c) for c in sorted(set(codes))},
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results_dir")
    parser.add_argument("--megapixels", type=float, default=36)
    parser.add_argument("--uploads", type=int, default=8)
    parser.add_argument("--max-decoding", type=int, default=2)
    parser.add_argument("--classifier")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        png = field_png(args.megapixels, Path(tmp))
    print(f"upload: {args.megapixels:g} MP PNG, {len(png) / 1e6:.1f} MB; "
          f"server --max-decoding {args.max_decoding}")  # fmt: skip
    found = {}
    for n in (1, args.uploads):
        found[n] = r = scenario(args, png, n)
        print(f"{n} concurrent: peak +{r['raise_mib']:.0f} MiB over a warm "
              f"{r['base_mib']:.0f} MiB; answers {r['codes']}; {r['seconds']:.1f} s")  # fmt: skip
    odd = {c for r in found.values() for c in r["codes"]} - {303, 503}
    if odd:
        print(f"WARNING: answers other than 303 (analysed) and 503 (busy): {sorted(odd)}")
    ratio = found[args.uploads]["raise_mib"] / max(found[1]["raise_mib"], 1e-9)
    print(f"peak raise, {args.uploads} vs 1: {ratio:.2f}x (target <= 1.5x)")


if __name__ == "__main__":
    main()
