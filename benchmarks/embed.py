"""Benchmark the embed step against a bare forward loop on the same ROIs.

Bare: the model's forward over tensors already decoded, resized, normalised
and on the device. leukflow: :func:`leukflow.learn.embed.embed_rois` from the crop
store on disk (decode, transform, forward, zarr write, checkpoint load
included). Crops are real white cells (Zheng et al. 2018, ../shared/data),
resized to the ROI side and repeated to ``--n-rois``; generated ones when the
data set is absent.

    PYTHONPATH=src python benchmarks/embed.py --arch resnet18 --n-rois 4000
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import leukflow
from leukflow.data.io import open_embeddings, write_crops
from leukflow.learn.embed import embed_rois
from leukflow.learn.models import encoder_from_checkpoint, pick_device, save_checkpoint, to_tensor
from leukflow.learn.train import train_encoder

ZHENG = Path(__file__).resolve().parents[2] / "shared" / "data" / "segmentation_WBC"


def load_rois(n: int, size: int) -> tuple[np.ndarray, str]:
    files = sorted(ZHENG.glob("Dataset */*.bmp"))
    if files:
        cells = [
            np.asarray(Image.open(f).convert("RGB").resize((size, size), Image.BILINEAR))
            for f in files
        ]
        source = f"{len(files)} Zheng crops from {ZHENG}"
    else:
        rng = np.random.default_rng(0)
        cells = list(rng.integers(0, 256, (64, size, size, 3), dtype=np.uint8))
        source = "64 generated crops (Zheng data absent)"
    crops = np.stack([cells[i % len(cells)] for i in range(n)])
    return crops, source


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bare_forward(model, x: torch.Tensor, batch_size: int, device: torch.device) -> float:
    cuda = device.type == "cuda"
    start = time.perf_counter()
    with (
        torch.inference_mode(),
        torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda),
    ):
        for i in range(0, len(x), batch_size):
            model.backbone(x[i : i + batch_size])
    sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--n-rois", type=int, default=4000)
    parser.add_argument("--roi-size", type=int, default=64, help="side of the stored crops")
    parser.add_argument("--input-size", type=int, default=0, help="side the net sees (0: roi)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2, help="the rule's threads")
    parser.add_argument("--workers", type=int, default=-1, help="loader workers (-1: as the rule)")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    args = parser.parse_args()

    device = pick_device()
    cuda = device.type == "cuda"
    workers = args.threads - 1 if cuda else 0  # as embed_rois.py
    if args.workers >= 0:
        workers = args.workers
    size = args.input_size or args.roi_size
    crops, source = load_rois(args.n_rois, args.roi_size)
    ck, _ = train_encoder(crops[:8], ["a"] * 8, arch=args.arch, training="frozen",
                          input_size_px=size, epochs=1, batch_size=2, lr=1e-3, seed=0)  # fmt: skip
    print(f"leukflow {leukflow.__version__}, torch {torch.__version__}, device {device}"
          f"{' ' + torch.cuda.get_device_name() if cuda else ''}, threads {args.threads} "
          f"(bare: torch {args.threads}; leukflow: torch {max(1, args.threads - workers)}, "
          f"loader workers {workers})")  # fmt: skip
    print(f"{args.arch}: {args.n_rois} ROIs of {args.roi_size} px -> {size} px, batch "
          f"{args.batch_size}; {source}")  # fmt: skip

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_crops(crops, tmp / "crops.zarr", {})
        save_checkpoint(ck, tmp / "all.pt")
        model = encoder_from_checkpoint(ck).to(device)
        if cuda:
            torch.backends.cudnn.benchmark = True
            model = model.to(memory_format=torch.channels_last)
        x = to_tensor(crops, ck["mean"], ck["std"], size).to(device)
        if cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        torch.set_num_threads(args.threads)  # the bare loop gets every thread
        bare_forward(model, x[: 2 * args.batch_size], args.batch_size, device)  # warm-up
        bare = min(bare_forward(model, x, args.batch_size, device) for _ in range(args.repeats))
        del x
        torch.set_num_threads(max(1, args.threads - workers))  # as embed_rois.py

        def run() -> float:
            start = time.perf_counter()
            embed_rois([tmp / "all.pt"], tmp / "crops.zarr", tmp / "emb.zarr",
                       leukflow_version=leukflow.__version__, batch_size=args.batch_size,
                       num_workers=workers, device=device)  # fmt: skip
            sync(device)
            return time.perf_counter() - start

        ours = min(run() for _ in range(args.repeats))
        assert open_embeddings(tmp / "emb.zarr")["all"].shape[0] == args.n_rois

    n = args.n_rois
    print(f"bare forward   : {n / bare:10.1f} ROIs/s ({bare:.2f} s)")
    print(f"leukflow embed : {n / ours:10.1f} ROIs/s ({ours:.2f} s)")
    print(f"ratio          : {bare / ours:.2f}x of bare (target >= 0.8)")


if __name__ == "__main__":
    main()
