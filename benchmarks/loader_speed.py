"""FFCV train loader (tntsearch.data.make_loaders) against torchvision ImageFolder + DataLoader.

Both read the same ~5,000 JPEG images (random crops of scikit-image's sample photos,
resized to 160x160, one class per photo) with the same augmentation -- RandomResizedCrop to
128 (scale 0.35-1, ratio 3/4-4/3), horizontal flip, normalisation -- the same batch size and
the same number of workers (FFCV threads vs DataLoader processes). Epochs alternate between
the two so that load from other processes hits both alike. Prints images/s (wall clock),
images per CPU-second (this process's threads plus the DataLoader's worker processes, which
other processes' load does not change), the ratios, and FFCV's first-epoch numba compile
(JIT warm-up) time.

    .venv/bin/python benchmarks/loader_speed.py [--images 5000] [--workers N] [--epochs 3]
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

PHOTOS = ("astronaut", "camera", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
          "coins", "moon", "clock", "brick", "grass", "gravel", "colorwheel", "cell")
SIDE, CROP, BATCH = 160, 128, 64


def make_jpegs(root: Path, count: int, seed: int = 0) -> int:
    """`count` JPEGs in `root/<photo>/<i>.jpg`: random square crops (40-100% of the shorter
    side) of scikit-image's bundled photos, resized to SIDE x SIDE."""
    import skimage.data
    from PIL import Image

    photos = []
    for name in PHOTOS:
        image = np.asarray(getattr(skimage.data, name)())
        photos.append((name, np.repeat(image[..., None], 3, -1) if image.ndim == 2 else image[..., :3]))
    rng = np.random.default_rng(seed)
    for i in range(count):
        name, photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        side = int(min(h, w) * rng.uniform(0.4, 1.0))
        y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = Image.fromarray(photo[y : y + side, x : x + side]).resize((SIDE, SIDE), Image.BILINEAR)
        (root / name).mkdir(exist_ok=True)
        crop.save(root / name / f"{i:05d}.jpg", quality=90)
    return len(photos)


def _cpu_seconds() -> float:
    """User + system time of this process and of its reaped children (DataLoader workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed_epoch(loader) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds, images) of one epoch."""
    start, cpu, seen = time.perf_counter(), _cpu_seconds(), 0
    for images, _ in loader:
        seen += images.shape[0]
    return time.perf_counter() - start, _cpu_seconds() - cpu, seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs after the warm-up epoch")
    args = parser.parse_args()

    import torch
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    from tntsearch.data import convert, make_loaders
    from tntsearch.spec import DataSpec

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp, "jpegs")
        root.mkdir()
        start = time.perf_counter()
        classes = make_jpegs(root, args.images)
        beton = Path(tmp, "train.beton")
        convert(root, beton, write_mode="jpg", jpeg_quality=90, num_workers=args.workers)
        print(f"{args.images} JPEGs of {SIDE}x{SIDE} in {classes} classes, written and converted in "
              f"{time.perf_counter() - start:.1f} s; {args.workers} workers, batch {BATCH}, crop {CROP}")

        spec = DataSpec(train=str(beton), val=str(beton), batch_size=BATCH, num_workers=args.workers)
        start = time.perf_counter()
        ffcv_loader, _ = make_loaders(spec, CROP, device="cpu")
        build_s = time.perf_counter() - start

        augment = transforms.Compose([
            transforms.RandomResizedCrop(CROP, scale=spec.crop_scale, ratio=(3 / 4, 4 / 3)),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(spec.mean, spec.std),
        ])
        # Workers end with each epoch (forked, so cheap to start) so that their CPU time is counted.
        torch_loader = DataLoader(datasets.ImageFolder(str(root), transform=augment), batch_size=BATCH,
                                  shuffle=True, drop_last=True, num_workers=args.workers)

        warm_ffcv, _, _ = timed_epoch(ffcv_loader)  # includes numba's compile of the pipeline
        warm_torch, _, _ = timed_epoch(torch_loader)
        rates: dict[str, list[float]] = {"ffcv": [], "torchvision": []}
        per_cpu: dict[str, list[float]] = {"ffcv": [], "torchvision": []}
        for _ in range(args.epochs):
            for name, loader in (("ffcv", ffcv_loader), ("torchvision", torch_loader)):
                seconds, cpu, seen = timed_epoch(loader)
                rates[name].append(seen / seconds)
                per_cpu[name].append(seen / cpu)

    ffcv_rate, torch_rate = (statistics.median(rates[k]) for k in ("ffcv", "torchvision"))
    ffcv_cpu, torch_cpu = (statistics.median(per_cpu[k]) for k in ("ffcv", "torchvision"))
    steady_ffcv_epoch = (args.images // BATCH) * BATCH / ffcv_rate
    print(f"FFCV (tntsearch.data)         {ffcv_rate:8.0f} images/s  (median of {args.epochs} epochs: "
          f"{', '.join(f'{r:.0f}' for r in rates['ffcv'])})")
    print(f"torchvision ImageFolder       {torch_rate:8.0f} images/s  (median of {args.epochs} epochs: "
          f"{', '.join(f'{r:.0f}' for r in rates['torchvision'])})")
    print(f"ratio FFCV / torchvision      {ffcv_rate / torch_rate:8.2f}x")
    print(f"images per CPU-second         FFCV {ffcv_cpu:.0f}, torchvision {torch_cpu:.0f}: "
          f"ratio {ffcv_cpu / torch_cpu:.2f}x")
    print(f"FFCV JIT warm-up              {build_s + warm_ffcv - steady_ffcv_epoch:8.1f} s  "
          f"(loader build {build_s:.1f} s + first epoch {warm_ffcv:.1f} s - a warm epoch {steady_ffcv_epoch:.1f} s)")
    print(f"torchvision first epoch       {warm_torch:8.1f} s")
    print(f"host: {os.cpu_count()} cpus, load average {os.getloadavg()[0]:.1f} at the end "
          "(other processes' load slows both loaders alike: epochs alternate)")


if __name__ == "__main__":
    main()
