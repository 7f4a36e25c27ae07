"""Benchmark leukflow's training step against a bare torch loop on the same tensors.

Both train the same network from the same initial weights with the same
optimiser (Adam, ``--lr``), batch size, batch order and no augmentation, over
the same crops:

- bare: a loop over float tensors already resized, normalised and on the
  device (``model(x)``, cross-entropy, backward, step);
- leukflow: one epoch of :func:`leukflow.learn.train._train_epoch` on uint8
  crops, as ``train_encoder`` runs it (each batch moved, resized, normalised
  on the device; loss and accuracy read back after every step).

It prints images/s of each (the median epoch; the two loops take turns, epoch
by epoch, after one warm-up epoch each) and their ratio (target: leukflow >= 0.9x bare).
``--bf16`` (bf16 autocast) and ``--channels-last`` (channels-last memory)
apply to both loops; on a GPU leukflow trains with both, so a GPU run would
also measure ``--bf16 --channels-last`` (they run on CPU too, where they are
slower and only prove that the flags work).

    PYTHONPATH=src python benchmarks/train.py --arch resnet18 --n 512 --size 64
"""

import argparse
import copy
import dataclasses
import time

import numpy as np
import torch
from torch import nn

from leukflow.learn.models import build_encoder, channel_stats, normalise, pick_device, to_unit
from leukflow.learn.train import _Data, _Plan, _train_epoch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bare_epoch(model, optimizer, x, y, order, batch_size, bf16: bool) -> None:
    """One epoch of the plainest loop: slice, forward, loss, backward, step."""
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        if len(idx) < 2:
            continue
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(model(x[idx]).float(), y[idx])
        loss.backward()
        optimizer.step()


def alternate(fns: dict, epochs: int, device: torch.device) -> dict[str, float]:
    """Median seconds of an epoch of each loop, epochs run in turn (A, B, A, B...).

    Taking turns and the median keep a shared machine's changing load from
    favouring whichever loop ran first.
    """
    for fn in fns.values():
        fn()  # warm-up epoch: allocator, cuDNN autotuning, lazy init
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(epochs):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--n", type=int, default=512, help="training crops")
    ap.add_argument("--size", type=int, default=64, help="crop side (px)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=3, help="timed epochs of each loop (median)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast in both loops")
    ap.add_argument("--channels-last", action="store_true", help="channels-last in both loops")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device()
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (args.n, args.size, args.size, 3), dtype=np.uint8)
    labels = ["ALL" if i % 2 else "HEM" for i in range(args.n)]
    mean, std = channel_stats(crops)
    torch.manual_seed(0)
    first = build_encoder(args.arch, 2, input_size_px=args.size)
    memory = torch.channels_last if args.channels_last else torch.contiguous_format

    # leukflow: the training step as train_encoder runs it, augmentation off
    ckpt = {"classes": ["ALL", "HEM"], "training": "per_fold", "input_size_px": args.size,
            "mean": mean, "std": std, "stain": None}  # fmt: skip
    data = dataclasses.replace(
        _Data.of(crops, labels, ckpt, device), augment=lambda x, _gen: x,
        bf16=args.bf16, channels_last=args.channels_last,
    )  # fmt: skip
    plan = _Plan(training="per_fold", epochs=args.epochs + 1, batch_size=args.batch_size,
                 lr=args.lr, weight_decay=0.0, patience=0, n_fit=args.n)  # fmt: skip
    ours = copy.deepcopy(first).to(device, memory_format=memory)
    ours_opt = plan.optimizer(ours, phase=1)
    fit = np.arange(args.n)
    gen = torch.Generator().manual_seed(0)

    def leukflow_once() -> None:
        _train_epoch(ours, ours_opt, data, fit, gen, plan, None)

    # bare: the same crops as ready tensors on the device, the same batch order
    x = normalise(to_unit(torch.from_numpy(crops), args.size), mean, std).to(device)
    x = x.contiguous(memory_format=memory)
    y = data.y.to(device)
    bare = copy.deepcopy(first).to(device, memory_format=memory)
    bare_opt = torch.optim.Adam(bare.parameters(), lr=args.lr)
    order_gen = torch.Generator().manual_seed(0)

    def bare_once() -> None:
        order = torch.randperm(args.n, generator=order_gen).to(device)
        bare_epoch(bare, bare_opt, x, y, order, args.batch_size, args.bf16)

    median = alternate({"leukflow": leukflow_once, "bare": bare_once}, args.epochs, device)
    leukflow_s, bare_s = median["leukflow"], median["bare"]

    images = args.n  # per epoch
    flags = f"bf16={args.bf16} channels_last={args.channels_last}"
    threads = torch.get_num_threads()
    print(f"{args.arch}, {args.n} crops of {args.size} px, batch {args.batch_size}, "
          f"{args.epochs} timed epochs each, in turn, on {device} ({threads} threads), "
          f"{flags}")  # fmt: skip
    print(f"bare torch loop: {images / bare_s:8.1f} images/s")
    print(f"leukflow step:   {images / leukflow_s:8.1f} images/s")
    print(f"ratio leukflow/bare: {bare_s / leukflow_s:.2f}x (target >= 0.9x)")


if __name__ == "__main__":
    main()
