"""Checking `.beton` files before anything trains on them (docs/data.md, docs/design.md).

A damaged file (truncated by a failed copy, foreign, written with other field types) must
fail the search at spec load, with one line naming the spec field, the path and what is
wrong, not one trial at a time under a Ray traceback. `read_info` reads what FFCV's own
`Reader` reads, checked piece by piece against the file size first (FFCV reads past the
end of a truncated file without complaint), then decodes the first sample as the loaders
would. It reads the header, the per-sample index and the allocation table, and one image:
milliseconds, even for ImageNet.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .writing import BetonInfo, read_classes

__all__ = ["DataFileError", "check_files", "read_info"]

_FIELDS = {"image": "RGBImageField", "label": "IntField"}


class DataFileError(ValueError):
    """A data file named by the spec is unusable; the message is one line."""


def _fail(path: Path, what: str) -> None:
    raise ValueError(f"{path}: {what}")


def _decode_first_image(path: Path, meta: np.ndarray, alloc: np.ndarray) -> None:
    """Decode sample 0's image from its bytes, as FFCV's decoders do (JPEG via OpenCV, raw
    pixels copied), so that a file whose data region is damaged fails here."""
    import cv2

    from ffcv.fields.rgb_image import IMAGE_MODES

    mode, width, height, ptr = (int(meta[k]) for k in ("mode", "width", "height", "data_ptr"))
    where = np.flatnonzero(alloc["ptr"] == ptr)
    if width == 0 or height == 0 or not len(where):
        _fail(path, f"field image: sample 0 has no stored pixels (size {width}x{height}, data at byte {ptr})")
    size = int(alloc["size"][where[0]])
    with open(path, "rb") as f:
        f.seek(ptr)
        data = np.frombuffer(f.read(size), np.uint8)
    if mode == IMAGE_MODES["raw"]:
        if size < width * height * 3:
            _fail(path, f"field image: sample 0 holds {size} bytes, a raw {width}x{height} RGB image needs "
                        f"{width * height * 3}")
    elif mode == IMAGE_MODES["jpg"]:
        image = cv2.imdecode(data, cv2.IMREAD_COLOR)
        if image is None or image.shape[:2] != (height, width):
            found = "nothing" if image is None else f"{image.shape[1]}x{image.shape[0]}"
            _fail(path, f"field image: sample 0 does not decode as a {width}x{height} JPEG (got {found})")
    else:
        _fail(path, f"field image: sample 0 has unknown storage mode {mode}")


def read_info(beton_path: str | os.PathLike) -> BetonInfo:
    """Check that a file is a whole tntsearch `.beton` and describe it.

    Checked in order: the FFCV header (format version), the field table (exactly `image`
    as `RGBImageField` and `label` as `IntField`), the sample count, the per-sample index
    and the allocation table against the file size, every sample's image inside the data
    region, the labels (integers >= 0, below the class count when the class list is
    there), and that the first image decodes. Raises FileNotFoundError or ValueError
    (`"<path>: <what is wrong>"`, one line).
    """
    path = Path(beton_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such .beton file")
    from . import ffcv_fixes  # noqa: F401 -- imports FFCV keeping the thread counts
    from ffcv.reader import Reader
    from ffcv.types import (ALLOC_TABLE_TYPE, CURRENT_VERSION, TYPE_ID_HANDLER, FieldDescType, HeaderType,
                            get_handlers, get_metadata_type)

    file_size = path.stat().st_size
    if file_size < HeaderType.itemsize:
        _fail(path, f"not an FFCV .beton file ({file_size} bytes, shorter than its {HeaderType.itemsize}-byte header)")
    header = np.fromfile(path, dtype=HeaderType, count=1)[0]
    if header["version"] != CURRENT_VERSION:
        _fail(path, f"not an FFCV .beton file (header format version {header['version']}, FFCV writes "
                    f"{CURRENT_VERSION})")
    num_fields, num_samples = int(header["num_fields"]), int(header["num_samples"])
    index_start = HeaderType.itemsize + num_fields * FieldDescType.itemsize
    if index_start > file_size:
        _fail(path, f"truncated: the header names {num_fields} fields, whose table ends at byte {index_start}, "
                    f"but the file has {file_size} bytes")
    descriptors = np.fromfile(path, dtype=FieldDescType, count=num_fields, offset=HeaderType.itemsize)
    kinds = {}
    for d in descriptors:
        name = bytes(d["name"]).split(b"\0", 1)[0].decode(errors="replace")
        handler = TYPE_ID_HANDLER.get(int(d["type_id"]))
        kinds[name] = handler.__name__ if handler is not None else f"unknown type {int(d['type_id'])}"
    if kinds != _FIELDS:
        found = ", ".join(f"{n} ({k})" for n, k in kinds.items())
        wrong = [n for n in _FIELDS if n in kinds and kinds[n] != _FIELDS[n]]
        what = f"field {wrong[0]} is {kinds[wrong[0]]}, not {_FIELDS[wrong[0]]}; " if wrong else ""
        _fail(path, f"{what}expected fields image (RGBImageField) and label (IntField), found {found}")
    if num_samples == 0:
        _fail(path, "holds no samples")

    index_end = index_start + num_samples * get_metadata_type(get_handlers(descriptors)).itemsize
    table_start = int(header["alloc_table_ptr"])
    for what, end in (("per-sample index", index_end), ("allocation table", table_start)):
        if end > file_size:
            _fail(path, f"truncated: the {what} of its {num_samples} samples reaches byte {end}, but the file "
                        f"has {file_size} bytes")
    if (file_size - table_start) % ALLOC_TABLE_TYPE.itemsize:
        _fail(path, f"allocation table: {file_size - table_start} bytes from byte {table_start} to the end, "
                    f"not a whole number of {ALLOC_TABLE_TYPE.itemsize}-byte entries (truncated or appended to)")

    reader = Reader(str(path))
    alloc = reader.alloc_table
    columns = reader.metadata.dtype.names
    images = reader.metadata[columns[reader.field_names.index("image")]]
    labels = reader.metadata[columns[reader.field_names.index("label")]]
    if np.any(alloc["ptr"] + alloc["size"] > table_start) or np.any(alloc["ptr"] < index_end):
        _fail(path, "allocation table: entries point outside the data region (the file is damaged)")
    stored = np.isin(images["data_ptr"], alloc["ptr"])
    if not stored.all():
        first = int(np.flatnonzero(~stored)[0])
        _fail(path, f"field image: {int((~stored).sum())} of {num_samples} samples point at no stored data "
                    f"(first: sample {first})")
    if labels.min() < 0:
        _fail(path, f"field label: labels must be class indices >= 0, found {int(labels.min())}")
    classes = _classes(path)
    if classes and labels.max() >= len(classes):
        _fail(path, f"field label: label {int(labels.max())} has no class ({len(classes)} classes in the class list)")
    _decode_first_image(path, images[0], alloc)
    return BetonInfo(path, num_samples, classes)


def _classes(path: Path) -> tuple[str, ...]:
    try:
        return tuple(read_classes(path))
    except FileNotFoundError:
        return ()


def check_files(data: Any) -> tuple[BetonInfo | None, BetonInfo | None]:
    """`read_info` of `data.train` and `data.val` (a `DataSpec`; and `data.search` when it names
    one), before Ray starts: raises FileNotFoundError or DataFileError naming the spec field
    and the path. Remote URIs (`s3://...`) are left to the loaders (None)."""
    infos = []
    for field in ("train", "val", "search"):
        path = getattr(data, field, None)
        if path is None:
            continue
        if "://" in path:
            infos.append(None)
            continue
        if not Path(path).is_file():
            raise FileNotFoundError(
                f"data.{field}: no such file {path} (write it with `python -m tntsearch.data convert`)")
        try:
            infos.append(read_info(path))
        except ValueError as e:
            raise DataFileError(f"data.{field}: {e}") from e
    return infos[0], infos[1]
