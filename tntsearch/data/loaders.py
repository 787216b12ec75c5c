"""FFCV train/val loaders for a `DataSpec`: DeiT-style augmentation, CPU or GPU, DDP-aware.

Train: RandomResizedCrop (scale `crop_scale`, ratio 3/4..4/3) -> horizontal flip (unless
`flip: false`) -> normalisation [-> timm Mixup/CutMix on the batch]. Val: center crop of
`val_crop_ratio` (DeiT's 224/256 by default) of the shorter side, resized to `img_size` -> normalisation. Images arrive as float32 NCHW tensors
in channels-last memory format on `device`; labels as int64 (N,) tensors, or, when mixup or
cutmix is on, the train loader yields soft float32 (N, num_classes) targets from timm's
`Mixup` (label smoothing folded in), to be used with `SoftTargetCrossEntropy`.

Pipeline order (docs/design.md): on CPU decoder -> flip -> NormalizeImage (JIT) -> ToTensor ->
ToDevice -> ToTorchImage; on CUDA the uint8 batch is copied (4x fewer bytes than float32)
and normalised on the GPU after ToTorchImage. Batches are reused buffers: `clone_batch`
what you keep.
"""
from __future__ import annotations

import functools
from dataclasses import replace
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .checking import read_info
from .writing import read_classes
from .ffcv_fixes import SafeLoader

from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder, RandomResizedCropRGBImageDecoder
from ffcv.loader import OrderOption
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.operation import Operation
from ffcv.pipeline.state import State
from ffcv.traversal_order.base import TraversalOrder
from ffcv.transforms import NormalizeImage, RandomHorizontalFlip, Squeeze, ToDevice, ToTensor, ToTorchImage

__all__ = ["make_loaders", "make_eval_loader"]

_CROP_ASPECT = (3 / 4, 4 / 3)  # RandomResizedCrop's default aspect-ratio range


class _NormalizeOnDevice(Operation):
    """uint8 channels-last NCHW batch on the device -> float32 (x - mean) / std, in place of
    FFCV's GPU NormalizeImage (which needs cupy). Writes into a preallocated buffer."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.mean = np.asarray(mean, dtype=np.float32) * 255
        self.std = np.asarray(std, dtype=np.float32) * 255

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, AllocationQuery]:
        c, h, w = previous_state.shape
        device = previous_state.device
        self._mean = torch.as_tensor(self.mean, device=device).view(1, c, 1, 1)
        self._std = torch.as_tensor(self.std, device=device).view(1, c, 1, 1)
        # NHWC storage, handed out as a channels-last NCHW view.
        return replace(previous_state, dtype=torch.float32), AllocationQuery((h, w, c), torch.float32, device)

    def generate_code(self) -> Callable:
        mean, std = self._mean, self._std

        def normalize(images: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
            out = dst[: images.shape[0]].permute(0, 3, 1, 2)
            out.copy_(images)
            return out.sub_(mean).div_(std)

        return normalize


class _ShardOrder(TraversalOrder):
    """This rank's share of the samples, disjoint from every other rank's.

    Train (`shuffle`): the same seeded permutation on every rank for each epoch, cut to a
    multiple of the world size (a different <= world-1 samples left out each epoch), rank r
    taking positions r, r+world, ... -- torch's DistributedSampler with drop_last=True, which
    FFCV cannot be asked for (it pads by repeating samples). Val: indices r, r+world, ...
    unpadded, so all ranks together see every sample exactly once.
    """

    def __init__(self, loader: Any, *, shuffle: bool, rank: int, world_size: int) -> None:
        super().__init__(loader)
        self.shuffle, self.rank, self.world_size = shuffle, rank, world_size

    def sample_order(self, epoch: int) -> np.ndarray:
        n = len(self.indices)
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(n)
            order = order[: n - n % self.world_size]
        else:
            order = np.arange(n)
        return self.indices[order[self.rank :: self.world_size]]


def _image_pipeline(decoder: Operation, device: torch.device, mean: Sequence[float], std: Sequence[float],
                    flip: bool, normalize_on_device: bool) -> list[Operation]:
    ops = [decoder] + ([RandomHorizontalFlip()] if flip else [])
    if normalize_on_device:
        return ops + [ToTensor(), ToDevice(device, non_blocking=True), ToTorchImage(channels_last=True),
                      _NormalizeOnDevice(mean, std)]
    table_mean, table_std = np.asarray(mean) * 255, np.asarray(std) * 255
    return ops + [NormalizeImage(table_mean, table_std, np.float32), ToTensor(),
                  ToDevice(device, non_blocking=True), ToTorchImage(channels_last=True)]


def _label_pipeline(device: torch.device) -> list[Operation]:
    return [IntDecoder(), ToTensor(), Squeeze(1), ToDevice(device, non_blocking=True)]


def _check_spec(data_spec: Any, img_size: int) -> None:
    """The DataSpec checks the loaders rely on (the spec validates most; duck-typed specs may not)."""
    if not isinstance(img_size, int) or img_size < 1:
        raise ValueError(f"img_size must be a positive integer, got {img_size!r}")
    if data_spec.batch_size < 1:
        raise ValueError(f"data.batch_size must be >= 1, got {data_spec.batch_size}")
    if data_spec.num_workers < 1:
        raise ValueError(f"data.num_workers must be >= 1 (FFCV's -1 would mean every host core), got {data_spec.num_workers}")
    lo, hi = data_spec.crop_scale
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"data.crop_scale must satisfy 0 < min <= max <= 1, got {tuple(data_spec.crop_scale)}")
    for name in ("mean", "std"):
        value = getattr(data_spec, name)
        if len(value) != 3:
            raise ValueError(f"data.{name} must have 3 values (R, G, B on a 0-1 scale), got {tuple(value)}")
    if min(data_spec.std) <= 0:
        raise ValueError(f"data.std must be > 0, got {tuple(data_spec.std)}")
    if max(data_spec.mean) > 1 or max(data_spec.std) > 1:
        raise ValueError("data.mean and data.std are 0-1 floats (e.g. 0.485), not 0-255 values")
    if data_spec.mixup < 0 or data_spec.cutmix < 0:
        raise ValueError("data.mixup and data.cutmix are Beta alphas >= 0 (0 = off)")


def make_loaders(
    data_spec: Any,
    img_size: int,
    *,
    device: str | torch.device,
    distributed: bool = False,
    seed: int = 0,
    num_classes: int | None = None,
    label_smoothing: float = 0.0,
    drop_last: bool = True,
    train_indices: Sequence[int] | None = None,
) -> tuple[SafeLoader, SafeLoader]:
    """(train_loader, val_loader) over `data_spec.train` / `data_spec.val`.

    Args:
        data_spec: a `tntsearch.spec.DataSpec` (or anything with its attributes).
        img_size: side of the square crops fed to the model.
        device: where batches land (`ray.train.torch.get_device()` under Ray Train).
        distributed: shard both loaders over the torch.distributed process group (Ray
            Train creates it): train shards are disjoint and reshuffled every epoch with
            the same number of batches on every rank; val shards cover every sample once.
        seed: order seed (identical on all ranks). Crop/flip randomness comes from numba's
            per-thread generators and is not seeded.
        num_classes: for Mixup/CutMix targets; default: the train file's class list.
        label_smoothing: folded into the Mixup targets (the train loop's loss must then be
            a soft-target cross-entropy without further smoothing).
        drop_last: drop the last incomplete train batch (val keeps every sample).
        train_indices: train on these samples of `data_spec.train` only (supernet mode's
            `data.search_fraction` holds the others out for scoring candidates).
    """
    _check_spec(data_spec, img_size)
    device = torch.device(device)
    train_info, val_info = read_info(data_spec.train), read_info(data_spec.val)
    mixup_fn = None
    if data_spec.mixup > 0 or data_spec.cutmix > 0:
        from timm.data import Mixup

        if data_spec.batch_size % 2:
            raise ValueError(
                f"data.batch_size must be even with mixup/cutmix (timm mixes each image with its mirror in the batch), got {data_spec.batch_size}"
            )
        if num_classes is None:
            num_classes = len(read_classes(train_info.path))
        mixup_fn = Mixup(mixup_alpha=data_spec.mixup, cutmix_alpha=data_spec.cutmix,
                         label_smoothing=label_smoothing, num_classes=num_classes)

    if distributed:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise ValueError("distributed=True needs an initialised torch.distributed process group (Ray Train's TorchTrainer creates one)")
        shard = functools.partial(_ShardOrder, rank=torch.distributed.get_rank(),
                                  world_size=torch.distributed.get_world_size())
        train_order: Any = functools.partial(shard, shuffle=True)
        val_order: Any = functools.partial(shard, shuffle=False)
    else:
        # FFCV's ImageNet recipe: QUASI_RANDOM reads page by page when the file is not cached.
        train_order = OrderOption.RANDOM if data_spec.in_memory else OrderOption.QUASI_RANDOM
        val_order = OrderOption.SEQUENTIAL

    on_device = device.type == "cuda"
    common = dict(batch_size=data_spec.batch_size, num_workers=data_spec.num_workers,
                  os_cache=data_spec.in_memory, seed=seed)
    crop = RandomResizedCropRGBImageDecoder((img_size, img_size), scale=tuple(data_spec.crop_scale), ratio=_CROP_ASPECT)
    if train_indices is not None:
        common_train = {"indices": np.asarray(train_indices, dtype=np.int64)}
    else:
        common_train = {}
    train = SafeLoader(
        str(train_info.path), order=train_order, drop_last=drop_last, batch_transform=mixup_fn, **common_train,
        pipelines={"image": _image_pipeline(crop, device, data_spec.mean, data_spec.std, data_spec.flip, on_device),
                   "label": _label_pipeline(device)},
        **common,
    )
    val = make_eval_loader(data_spec, str(val_info.path), img_size, device=device, order=val_order, seed=seed)
    return train, val


def make_eval_loader(data_spec: Any, path: str, img_size: int, *, device: str | torch.device,
                     indices: Sequence[int] | None = None, order: Any = OrderOption.SEQUENTIAL,
                     seed: int = 0) -> SafeLoader:
    """A validation-style loader (centre crop, no augmentation, every sample once) over
    `path`, or over `indices` of it: the val loader, and supernet mode's search slice."""
    device = torch.device(device)
    center = CenterCropRGBImageDecoder((img_size, img_size), ratio=data_spec.val_crop_ratio)
    extra = {} if indices is None else {"indices": np.asarray(indices, dtype=np.int64)}
    return SafeLoader(
        path, order=order, drop_last=False, batch_size=data_spec.batch_size, num_workers=data_spec.num_workers,
        os_cache=data_spec.in_memory, seed=seed,
        pipelines={"image": _image_pipeline(center, device, data_spec.mean, data_spec.std, False, device.type == "cuda"),
                   "label": _label_pipeline(device)},
        **extra,
    )

