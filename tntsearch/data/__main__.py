"""`python -m tntsearch.data convert SOURCE OUT.beton [...]`: write one FFCV file.

A thin edge over `tntsearch.data.convert`: bad input (a missing path, an unsupported or
empty source, an invalid option) prints one line on stderr and exits with code 2.
"""
from __future__ import annotations

import argparse
import sys

from .writing import BUILTIN_SOURCES, SPLITS, WRITE_MODES, convert

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tntsearch.data", description="FFCV data sets for tntsearch.")
    commands = parser.add_subparsers(dest="command", required=True)
    conv = commands.add_parser(
        "convert",
        help="write one .beton (and <stem>.classes.json) from a data source",
        description="Write one FFCV .beton and its <stem>.classes.json. SOURCE is an image folder "
        "(root/<class>/<image>; classes in sorted order), a .npz ('images' N,H,W,3 uint8, 'labels', "
        f"optional 'classes'), a CIFAR-10/100 batch folder, or a built-in set: {', '.join(BUILTIN_SOURCES)}.",
    )
    conv.add_argument("source", help="image folder, .npz, CIFAR folder, digits or synthetic")
    conv.add_argument("out", help="the .beton file to write")
    conv.add_argument("--split", choices=SPLITS, default="train", help="split of digits/synthetic/CIFAR (default: train)")
    conv.add_argument("--max-resolution", type=int, default=None, help="shrink images whose longer side exceeds N pixels")
    conv.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality for jpg/smart modes (default: 90)")
    conv.add_argument("--write-mode", choices=WRITE_MODES, default="raw",
                      help="raw pixels, jpg, or smart (JPEG above 256x256 pixels) (default: raw)")
    conv.add_argument("--img-size", type=int, default=None, help="image side for digits/synthetic (default: 32)")
    conv.add_argument("--num-samples", type=int, default=None, help="synthetic: number of images (default: 1000)")
    conv.add_argument("--num-classes", type=int, default=None, help="synthetic: number of classes (default: 10)")
    conv.add_argument("--num-workers", type=int, default=None, help="writer processes (default: every core)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        info = convert(
            args.source, args.out, split=args.split, max_resolution=args.max_resolution,
            jpeg_quality=args.jpeg_quality, write_mode=args.write_mode, img_size=args.img_size,
            num_samples=args.num_samples, num_classes=args.num_classes, num_workers=args.num_workers,
        )
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {info.path}: {info.num_samples} images, {len(info.classes)} classes "
          f"(names in {info.path.with_suffix('.classes.json')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
