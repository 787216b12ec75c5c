"""Writing FFCV `.beton` files from image folders, arrays, CIFAR batches and built-in sets.

Every file has two fields, `image` (`RGBImageField`) and `label` (`IntField`, a class
index), and a sidecar `<stem>.classes.json` naming the classes in index order, which the
loaders (number of classes for Mixup) and exported models (class names) read back. Both are
written to temporary names and renamed into place; the class list records the fingerprint
of the `.beton` it was written with, and `read_classes` refuses it beside any other file
(e.g. a `.beton` replaced by a run that died before renaming its class list).

Class order, so that indices are stable across machines and runs:
- image folders: sorted class-folder names (as torchvision's `ImageFolder`);
- `.npz` arrays and CIFAR batches: the integer labels stored in the source, named by its
  `classes` array / `batches.meta` (`meta` for CIFAR-100), else `"0"`, `"1"`, ...;
- `digits`: `"0"` .. `"9"`; `synthetic`: `class_00`, `class_01`, ... (zero-padded, so
  sorted names and indices agree).
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

# NOTE: FFCV (and torch, ~5 s) is imported inside `convert`, so that the
# CLI answers bad input and --help at once; `.ffcv_fixes` goes first (thread counts).

__all__ = [
    "BUILTIN_SOURCES",
    "IMG_EXTENSIONS",
    "BetonInfo",
    "convert",
    "read_classes",
]

BUILTIN_SOURCES = ("digits", "synthetic")
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
WRITE_MODES = ("raw", "jpg", "smart")
SPLITS = ("train", "val")

# `smart` stores an image as JPEG when its raw pixels exceed this many bytes (a 256x256 RGB
# image), else raw. FFCV's own default threshold (None) silently means "always raw".
_SMART_THRESHOLD = 256 * 256 * 3
# What a .beton's fingerprint reads (see _fingerprint): the first MiB and some samples' bytes.
_FINGERPRINT_HEAD = 1 << 20
_FINGERPRINT_SAMPLES = 64
# Synthetic data: the seed of each split, so train and val are different draws of the same classes.
_SYNTHETIC_SEEDS = {"train": 0, "val": 1}
_DIGITS_VAL_FRACTION = 0.2
_DIGITS_SEED = 0
_MIN_PAGE = 1 << 23  # FFCV's default page (8 MiB); a sample must fit in one page


@dataclass(frozen=True)
class BetonInfo:
    """What a `.beton` holds: its path, sample count and class names (index order)."""

    path: Path
    num_samples: int
    classes: tuple[str, ...]


# --------------------------------------------------------------------------- datasets
# Indexable datasets handed to FFCV's writer processes: (HxWx3 uint8 image, int label).


class _ArrayDataset:
    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return self.images[i], int(self.labels[i])


class _FileDataset:
    def __init__(self, paths: list[str], labels: list[int]) -> None:
        self.paths, self.labels = paths, labels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        from PIL import Image

        path = self.paths[i]
        try:
            with Image.open(path) as im:
                image = np.asarray(im.convert("RGB"))
        except Exception as exc:  # noqa: BLE001 -- name the file, whatever PIL raised
            raise ValueError(f"{path}: cannot read image ({exc})") from exc
        return image, self.labels[i]


class _SyntheticDataset:
    """Random images whose class is learnable: a class colour (hue k/K) modulating stripes
    at a class angle (pi k/K), with a random phase and pixel noise per sample."""

    def __init__(self, num_samples: int, num_classes: int, img_size: int, seed: int) -> None:
        self.num_samples, self.num_classes, self.img_size, self.seed = num_samples, num_classes, img_size, seed
        hue = np.arange(num_classes) / num_classes
        self.colours = 255 * _hsv_to_rgb(hue, 0.8, 0.9)
        self.angles = np.pi * np.arange(num_classes) / num_classes
        self.grid = np.mgrid[0:img_size, 0:img_size] / img_size  # (2, H, W): y, x in [0, 1)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        label = i % self.num_classes
        rng = np.random.default_rng([self.seed, i])
        y, x = self.grid
        angle = self.angles[label]
        stripes = np.sin(2 * np.pi * (3 * (x * np.cos(angle) + y * np.sin(angle)) + rng.uniform()))
        image = self.colours[label] * (0.6 + 0.4 * stripes[..., None])
        image = image + rng.normal(0.0, 12.0, image.shape)
        return np.clip(image, 0, 255).astype(np.uint8), label


def _hsv_to_rgb(h: np.ndarray, s: float, v: float) -> np.ndarray:
    """(K,) hues in [0, 1) -> (K, 3) RGB in [0, 1] (the standard HSV hexcone formula)."""
    k = (np.array([5.0, 3.0, 1.0]) + 6.0 * h[:, None]) % 6.0
    return v - v * s * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


# --------------------------------------------------------------------------- sources


def _digits(split: str, img_size: int) -> tuple[_ArrayDataset, list[str]]:
    """scikit-learn's bundled 8x8 digits (1,797 images), upscaled to RGB, stratified 80/20."""
    import cv2
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    indices = np.arange(len(digits.target))
    train_idx, val_idx = train_test_split(
        indices, test_size=_DIGITS_VAL_FRACTION, stratify=digits.target, random_state=_DIGITS_SEED
    )
    chosen = np.sort(train_idx if split == "train" else val_idx)
    grey = np.round(digits.images[chosen] * (255.0 / 16.0)).astype(np.uint8)  # values are 0..16
    big = np.stack([cv2.resize(g, (img_size, img_size), interpolation=cv2.INTER_LINEAR) for g in grey])
    images = np.repeat(big[..., None], 3, axis=-1)
    return _ArrayDataset(images, digits.target[chosen]), [str(d) for d in range(10)]


def _npz(path: Path) -> tuple[_ArrayDataset, list[str]]:
    with np.load(path, allow_pickle=False) as f:
        missing = {"images", "labels"} - set(f.files)
        if missing:
            raise ValueError(f"{path}: needs arrays 'images' (N,H,W,3 uint8) and 'labels' (N,), missing {sorted(missing)}")
        images, labels = f["images"], f["labels"]
        names = [str(c) for c in f["classes"]] if "classes" in f.files else None
    if images.ndim == 3:  # greyscale N,H,W
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.dtype != np.uint8:
        raise ValueError(f"{path}: 'images' must be uint8 N,H,W,3 (or N,H,W), got {images.dtype} {images.shape}")
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    return _ArrayDataset(images, labels), _class_names(path, labels, names, len(images))


class _ArrayUnpickler(pickle.Unpickler):
    """Loads CIFAR batches (dicts of lists, bytes and numpy arrays) and nothing else:
    pickle can run arbitrary code, so only the globals numpy arrays need are allowed."""

    _ALLOWED = {
        ("_codecs", "encode"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            raw = _ArrayUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError) as exc:
        raise ValueError(f"{path}: not a CIFAR batch ({exc})") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: not a CIFAR batch (a {type(raw).__name__}, not a dict)")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in raw.items()}


def _cifar(root: Path, split: str) -> tuple[_ArrayDataset, list[str]]:
    """CIFAR-10 (`data_batch_*`, `test_batch`, `batches.meta`) or CIFAR-100 (`train`, `test`, `meta`)."""
    if (root / "batches.meta").is_file():
        files = sorted(root.glob("data_batch_*")) if split == "train" else [root / "test_batch"]
        meta, names_key, labels_key = root / "batches.meta", "label_names", "labels"
    else:
        files = [root / ("train" if split == "train" else "test")]
        meta, names_key, labels_key = root / "meta", "fine_label_names", "fine_labels"
    missing = [str(f) for f in files if not f.is_file()]
    if not files or missing:
        raise FileNotFoundError(f"{root}: CIFAR batches for split {split!r} not found ({', '.join(missing) or 'data_batch_*'})")
    batches = [_unpickle(f) for f in files]
    for f, b in zip(files, batches):
        if "data" not in b or labels_key not in b:
            raise ValueError(f"{f}: not a CIFAR batch (needs 'data' and '{labels_key}')")
    data = np.concatenate([np.asarray(b["data"], dtype=np.uint8) for b in batches])
    labels = np.concatenate([np.asarray(b[labels_key], dtype=np.int64) for b in batches])
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in _unpickle(meta)[names_key]]
    return _ArrayDataset(images, labels), _class_names(root, labels, names, len(images))


def _class_names(source: Path, labels: np.ndarray, names: list[str] | None, num_images: int) -> list[str]:
    if labels.shape != (num_images,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{source}: labels must be {num_images} integers, got {labels.dtype} {labels.shape}")
    if num_images == 0:
        raise ValueError(f"{source}: no images")
    if labels.min() < 0:
        raise ValueError(f"{source}: labels must be >= 0, found {labels.min()}")
    if names is None:
        return [str(i) for i in range(int(labels.max()) + 1)]
    if labels.max() >= len(names):
        raise ValueError(f"{source}: label {labels.max()} has no class name ({len(names)} names)")
    return names


def _image_folder(root: Path) -> tuple[_FileDataset, list[str]]:
    """`root/<class>/**/<image>` with classes in sorted order, files sorted within each."""
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(f"{root}: no class folders (expected {root}/<class>/<image>)")
    paths: list[str] = []
    labels: list[int] = []
    empty = []
    for index, name in enumerate(classes):
        found = sorted(
            os.path.join(dirpath, f)
            for dirpath, _, files in os.walk(root / name, followlinks=True)
            for f in files
            if f.lower().endswith(IMG_EXTENSIONS)
        )
        if not found:
            empty.append(name)
        paths += found
        labels += [index] * len(found)
    if empty:
        raise ValueError(f"{root}: class folders without images ({', '.join(empty)}); allowed extensions: {' '.join(IMG_EXTENSIONS)}")
    return _FileDataset(paths, labels), classes


def _open_source(
    source: str | os.PathLike, split: str, img_size: int | None, num_samples: int | None, num_classes: int | None
) -> tuple[Any, list[str], int | None]:
    """(dataset, class names, largest raw image in bytes if known) for any supported source."""
    builtin = str(source) in BUILTIN_SOURCES
    if not builtin and img_size is not None:
        raise ValueError("img_size applies to the built-in sources (digits, synthetic); use max_resolution for files")
    if str(source) != "synthetic" and (num_samples is not None or num_classes is not None):
        raise ValueError("num_samples and num_classes apply to the synthetic source only")
    size = 32 if img_size is None else img_size
    if builtin and size < 8:
        raise ValueError(f"img_size must be >= 8, got {size}")
    if str(source) == "digits":
        dataset, classes = _digits(split, size)
        return dataset, classes, size * size * 3
    if str(source) == "synthetic":
        n = 1000 if num_samples is None else num_samples
        k = 10 if num_classes is None else num_classes
        if n < 1:
            raise ValueError(f"num_samples must be >= 1, got {n}")
        if k < 2:
            raise ValueError(f"num_classes must be >= 2, got {k}")
        width = len(str(k - 1))
        return _SyntheticDataset(n, k, size, _SYNTHETIC_SEEDS[split]), [f"class_{i:0{width}d}" for i in range(k)], size * size * 3
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory (sources: an image folder, a .npz, a CIFAR batch folder, digits, synthetic)")
    if path.is_file():
        if path.suffix != ".npz":
            raise ValueError(f"{path}: unsupported file (expected a .npz with 'images' and 'labels')")
        dataset, classes = _npz(path)
        return dataset, classes, int(np.prod(dataset.images.shape[1:]))
    if (path / "batches.meta").is_file() or (path / "meta").is_file():
        dataset, classes = _cifar(path, split)
        return dataset, classes, 32 * 32 * 3
    dataset, classes = _image_folder(path)
    return dataset, classes, None


def _page_size(max_sample_bytes: int | None, max_resolution: int | None) -> int:
    """Smallest power of two >= 8 MiB holding twice the largest sample (FFCV needs a
    sample to fit in one page). Unknown sizes (folders without max_resolution) get 32 MiB,
    enough for a raw 3,500 x 3,000 image."""
    if max_resolution is not None:
        max_sample_bytes = max_resolution * max_resolution * 3
    if max_sample_bytes is None:
        return 1 << 25
    return max(_MIN_PAGE, 1 << int(2 * max_sample_bytes - 1).bit_length())


# --------------------------------------------------------------------------- public API


def convert(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    split: Literal["train", "val"] = "train",
    max_resolution: int | None = None,
    jpeg_quality: int = 90,
    write_mode: Literal["raw", "jpg", "smart"] = "raw",
    img_size: int | None = None,
    num_samples: int | None = None,
    num_classes: int | None = None,
    num_workers: int | None = None,
) -> BetonInfo:
    """Write `source` to the FFCV file `out` and its class names to `<stem>.classes.json`.

    Args:
        source: an image folder (`root/<class>/<image>`), a `.npz` (`images` N,H,W,3 uint8,
            `labels` N ints, optional `classes`), a CIFAR-10/100 batch folder, or one of the
            built-in names `digits` (scikit-learn's handwritten digits) and `synthetic`.
        out: the `.beton` to write (parent folders are created; written to a temporary
            name first, so a failed run leaves no half file under this name).
        split: which split of `digits`, `synthetic` and CIFAR to write; others ignore it.
        max_resolution: shrink images whose longer side exceeds this (FFCV's INTER_AREA).
        jpeg_quality: 1-100, for `jpg` and `smart` modes.
        write_mode: `raw` pixels (exact, large), `jpg`, or `smart` (JPEG for images above
            256x256 pixels, raw below).
        img_size: side of the generated images for `digits` and `synthetic` (default 32).
        num_samples, num_classes: size of the `synthetic` set (defaults 1000 and 10).
        num_workers: writer processes (default: every core).

    Returns:
        The written file's `BetonInfo`.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if write_mode not in WRITE_MODES:
        raise ValueError(f"write_mode must be one of {', '.join(WRITE_MODES)}, got {write_mode!r}")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must be in 1..100, got {jpeg_quality}")
    if max_resolution is not None and max_resolution < 1:
        raise ValueError(f"max_resolution must be >= 1, got {max_resolution}")
    workers = (os.cpu_count() or 1) if num_workers is None else num_workers
    if workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {workers}")
    out = Path(out)
    if out.suffix != ".beton":
        raise ValueError(f"{out}: the output file must end in .beton")

    dataset, classes, max_bytes = _open_source(source, split, img_size, num_samples, num_classes)
    from .ffcv_fixes import SafeWriter
    from ffcv.fields import IntField, RGBImageField

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    classes_tmp = _classes_path(out).with_name(f".{_classes_path(out).name}.{os.getpid()}.tmp")
    fields = {
        "image": RGBImageField(
            write_mode=write_mode,
            max_resolution=max_resolution,
            smart_threshold=_SMART_THRESHOLD if write_mode == "smart" else None,
            jpeg_quality=jpeg_quality,
        ),
        "label": IntField(),
    }
    writer = SafeWriter(str(tmp), fields, page_size=_page_size(max_bytes, max_resolution),
                        num_workers=min(workers, len(dataset)), desc=f"writing {out}")
    try:
        writer.from_indexed_dataset(dataset)
        meta = {"classes": list(classes), "num_samples": len(dataset), "source": str(source), "split": split,
                "beton": _fingerprint(tmp)}
        classes_tmp.write_text(json.dumps(meta, indent=1) + "\n")
        # NOTE: two renames, not one transaction: a crash between them leaves the old class
        # list beside the new file, which read_classes then refuses (fingerprints differ).
        os.replace(tmp, out)
        os.replace(classes_tmp, _classes_path(out))
    finally:
        tmp.unlink(missing_ok=True)
        classes_tmp.unlink(missing_ok=True)
    return BetonInfo(out, len(dataset), tuple(classes))


def _classes_path(beton: Path) -> Path:
    return beton.with_suffix(".classes.json")


def _fingerprint(beton: Path) -> str:
    """`<size>:<sha256>` of what tells two `.beton` files apart: the first MiB (header,
    field table, the per-sample index with labels and data pointers), the allocation table,
    and the stored bytes of up to `_FINGERPRINT_SAMPLES` samples spread over the file. A copy
    keeps it, a rewrite from other data changes it, and it reads a few MiB whatever the size."""
    from . import ffcv_fixes  # noqa: F401 -- imports FFCV keeping the thread counts
    from ffcv.types import ALLOC_TABLE_TYPE, HeaderType

    size = beton.stat().st_size
    header = np.fromfile(beton, dtype=HeaderType, count=1)
    table_ptr = int(header["alloc_table_ptr"][0]) if header.size else size
    if not HeaderType.itemsize <= table_ptr <= size:
        raise ValueError(f"{beton}: not an FFCV .beton file (its allocation table would start at byte {table_ptr} "
                         f"of {size})")
    alloc = np.fromfile(beton, dtype=ALLOC_TABLE_TYPE, offset=table_ptr)
    digest = hashlib.sha256()
    with open(beton, "rb") as f:
        digest.update(f.read(_FINGERPRINT_HEAD))
        digest.update(alloc.tobytes())
        for i in np.unique(np.linspace(0, len(alloc) - 1, min(len(alloc), _FINGERPRINT_SAMPLES)).astype(int)):
            f.seek(int(alloc["ptr"][i]))
            digest.update(f.read(min(int(alloc["size"][i]), _FINGERPRINT_HEAD)))
    return f"{size}:{digest.hexdigest()}"


def read_classes(beton_path: str | os.PathLike) -> list[str]:
    """Class names in label order, from the `<stem>.classes.json` beside a `.beton`.

    Raises:
        FileNotFoundError: no class list (or no `.beton`) there.
        ValueError: the class list is malformed, or was written with another `.beton` than
            the one beside it.
    """
    path = _classes_path(Path(beton_path))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no class list beside {beton_path} (written by tntsearch.data convert)")
    try:
        meta = json.loads(path.read_text())
        classes = meta["classes"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a class list ({exc})") from exc
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise ValueError(f"{path}: 'classes' must be a list of strings")
    if meta.get("beton") != _fingerprint(Path(beton_path)):
        raise ValueError(f"{path}: written with another version of {beton_path} (size or contents differ); "
                         "write both again with `python -m tntsearch.data convert`")
    return classes
