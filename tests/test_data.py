"""tntsearch.data: writing .beton files, the loaders, and the FFCV 1.0.2 defects.

Images are read back independently of FFCV's loader where possible (raw pixels straight
from the file at the offsets FFCV's metadata records). Loader tests share module-scoped
files and loaders: every FFCV loader pays a numba compile of its pipeline (seconds).
"""
from __future__ import annotations

import gc
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cluster_utils import free_port
from tntsearch.data import (
    PipelineError,
    SafeLoader,
    clone_batch,
    convert,
    make_loaders,
    read_classes,
    read_info,
)
from tntsearch.data.__main__ import main
from tntsearch.data.loaders import _image_pipeline, _label_pipeline, _ShardOrder
from tntsearch.spec import DataSpec

from ffcv.fields import FloatField, IntField, RGBImageField
from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder, SimpleRGBImageDecoder
from ffcv.loader import Loader, OrderOption
from ffcv.pipeline.operation import Operation
from ffcv.reader import Reader
from ffcv.transforms import RandomHorizontalFlip, ToTensor, View
from ffcv.writer import DatasetWriter

REPO = Path(__file__).resolve().parents[1]

# numba's dispatcher finaliser trips over FFCV compiling the same kernels once per loader
# (KeyError at garbage collection, harmless): not ours to fix.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <finalize object:pytest.PytestUnraisableExceptionWarning"
)


# --------------------------------------------------------------------------- helpers


def _read_raw(beton: Path) -> tuple[list[np.ndarray], np.ndarray]:
    """Images and labels of a raw-mode .beton, read from the file bytes (no loader)."""
    reader = Reader(str(beton))
    meta = reader.metadata
    images = []
    for row in meta["f0"]:
        assert row["mode"] == 1, "expected raw mode"
        h, w = int(row["height"]), int(row["width"])
        pixels = np.fromfile(beton, dtype=np.uint8, count=h * w * 3, offset=int(row["data_ptr"]))
        images.append(pixels.reshape(h, w, 3))
    return images, meta["f1"].astype(np.int64)


def _spec(train: Path, val: Path, **kw) -> DataSpec:
    return DataSpec(train=str(train), val=str(val), **{"batch_size": 32, "num_workers": 1, **kw})


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("digits")
    for split in ("train", "val"):
        convert("digits", root / f"digits_{split}.beton", split=split, num_workers=1)
    return root / "digits_train.beton", root / "digits_val.beton"


# Module-scoped loaders stay referenced until the interpreter exits, and each test's own
# loaders are collected in its teardown: collected later, numba's finaliser prints the
# KeyError above outside any test's warning filter.
_KEEP_ALIVE: list = []


@pytest.fixture(autouse=True)
def _collect_loaders():
    yield
    gc.collect()


@pytest.fixture(scope="module")
def digits_loaders(digits):
    """Train with Mixup/CutMix (soft targets), val plain: one numba compile of each kind."""
    loaders = make_loaders(_spec(*digits, mixup=0.8, cutmix=1.0), 32, device="cpu", label_smoothing=0.1)
    _KEEP_ALIVE.append(loaders)
    return loaders


@pytest.fixture(scope="module")
def unique(tmp_path_factory) -> Path:
    """64 synthetic images, one class each, so a label identifies its sample."""
    out = tmp_path_factory.mktemp("unique") / "unique.beton"
    convert("synthetic", out, num_samples=64, num_classes=64, num_workers=1)
    return out


# --------------------------------------------------------------------------- writing


def test_npz_round_trip_raw_is_exact(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, 20, 24, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, 12)
    np.savez(tmp_path / "a.npz", images=images, labels=labels, classes=np.array(["cat", "dog", "emu"]))

    info = convert(tmp_path / "a.npz", tmp_path / "a.beton", write_mode="raw", num_workers=2)

    got_images, got_labels = _read_raw(tmp_path / "a.beton")
    assert info.num_samples == 12 and info.classes == ("cat", "dog", "emu")
    np.testing.assert_array_equal(np.stack(got_images), images)
    np.testing.assert_array_equal(got_labels, labels)
    assert read_classes(tmp_path / "a.beton") == ["cat", "dog", "emu"]
    assert read_info(tmp_path / "a.beton").num_samples == 12


def test_cifar_batches_keep_label_indices_and_names(tmp_path):
    rng = np.random.default_rng(1)
    batches = {}
    for name, n in (("data_batch_1", 4), ("data_batch_2", 3), ("test_batch", 2)):
        batches[name] = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         b"labels": list(rng.integers(0, 3, n))}
        (tmp_path / name).write_bytes(pickle.dumps(batches[name], protocol=2))
    (tmp_path / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"plane", b"car", b"bird"]}, protocol=2))

    convert(tmp_path, tmp_path / "train.beton", split="train", num_workers=1)
    convert(tmp_path, tmp_path / "val.beton", split="val", num_workers=1)

    for split, names in (("train", ["data_batch_1", "data_batch_2"]), ("val", ["test_batch"])):
        images, labels = _read_raw(tmp_path / f"{split}.beton")
        data = np.concatenate([batches[n][b"data"] for n in names])
        # CIFAR rows are 1024 red, then 1024 green, then 1024 blue values, row-major.
        np.testing.assert_array_equal(np.stack(images), data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        np.testing.assert_array_equal(labels, np.concatenate([batches[n][b"labels"] for n in names]))
        assert read_classes(tmp_path / f"{split}.beton") == ["plane", "car", "bird"]


def test_cifar_pickle_with_foreign_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo owned",))

    (tmp_path / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"a"]}))
    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": Evil(), b"labels": [0]}))
    with pytest.raises(ValueError, match="test_batch"):
        convert(tmp_path, tmp_path / "v.beton", split="val")


def test_image_folder_classes_are_sorted_names(tmp_path):
    from PIL import Image

    root = tmp_path / "folder"
    rng = np.random.default_rng(2)
    for name, count in (("b", 1), ("a", 2), ("c10", 1), ("c2", 1)):
        (root / name / "sub").mkdir(parents=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (10, 14, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    (root / "a" / "notes.txt").write_text("not an image")
    Image.fromarray(rng.integers(0, 256, (10, 14), dtype=np.uint8)).save(root / "b" / "sub" / "grey.PNG")

    info = convert(root, tmp_path / "f.beton", write_mode="raw", num_workers=1)

    assert info.classes == ("a", "b", "c10", "c2")  # sorted, not numeric, not creation order
    images, labels = _read_raw(tmp_path / "f.beton")
    # files sorted within a class (b/0.png before b/sub/grey.PNG); grey is stored as RGB
    assert labels.tolist() == [0, 0, 1, 1, 2, 3]
    expected = np.asarray(Image.open(root / "b" / "sub" / "grey.PNG").convert("RGB"))
    np.testing.assert_array_equal(images[3], expected)


def test_synthetic_labels_are_learnable(tmp_path):
    for split in ("train", "val"):
        convert("synthetic", tmp_path / f"{split}.beton", split=split, num_samples=120, num_classes=6,
                img_size=16, num_workers=1)
    (train_x, train_y), (val_x, val_y) = (_read_raw(tmp_path / f"{s}.beton") for s in ("train", "val"))
    features = lambda xs: np.stack(xs).reshape(len(xs), -1).astype(np.float64)  # noqa: E731
    centroids = np.stack([features(train_x)[train_y == k].mean(0) for k in range(6)])
    dists = ((features(val_x)[:, None, :] - centroids[None]) ** 2).sum(-1)
    assert (dists.argmin(1) == val_y).mean() >= 0.9  # a nearest-centroid classifier suffices
    assert not np.array_equal(np.stack(train_x), np.stack(val_x))  # train and val are different draws
    assert read_classes(tmp_path / "train.beton")[:2] == ["class_0", "class_1"]


def test_digits_split_is_stratified_and_complete(digits):
    train, val = digits
    _, train_y = _read_raw(train)
    _, val_y = _read_raw(val)
    assert (len(train_y), len(val_y)) == (1437, 360)  # scikit-learn's 1,797 digits, 80/20
    assert read_classes(train) == [str(d) for d in range(10)]
    # stratified: every class holds ~20% of its images in val
    from sklearn.datasets import load_digits

    totals = np.bincount(load_digits().target)
    np.testing.assert_allclose(np.bincount(val_y) / totals, 0.2, atol=0.01)


def test_writer_failure_in_a_worker_is_raised_not_hung(tmp_path):
    """Defect 6: an unreadable image kills a writer process; FFCV's writer waits forever."""
    from PIL import Image

    (tmp_path / "src" / "a").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "src" / "a" / "ok.png")
    (tmp_path / "src" / "a" / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="broken.jpg: cannot read image"):
        convert(tmp_path / "src", tmp_path / "out.beton", num_workers=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no half-written file left


def test_damaged_jpeg_in_a_folder_names_the_file(tmp_path):
    """A JPEG cut short (a failed copy): its header reads, its pixels do not."""
    from PIL import Image

    (tmp_path / "src" / "a").mkdir(parents=True)
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(tmp_path / "src" / "a" / "ok.jpg")
    whole = (tmp_path / "src" / "a" / "ok.jpg").read_bytes()
    (tmp_path / "src" / "a" / "cut.jpg").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match=r"cut.jpg: cannot read image \(.*[Tt]runcated"):
        convert(tmp_path / "src", tmp_path / "out.beton", num_workers=1)
    assert not (tmp_path / "out.beton").exists()


@pytest.mark.parametrize(
    "source, error, match",
    [
        ("missing", FileNotFoundError, "missing: no such file"),
        ("empty", ValueError, "empty: no class folders"),
        ("emptyclass", ValueError, "class folders without images"),
        ("text.txt", ValueError, "text.txt: unsupported file"),
    ],
)
def test_bad_sources_name_the_path(tmp_path, source, error, match):
    (tmp_path / "empty").mkdir()
    (tmp_path / "emptyclass" / "cls").mkdir(parents=True)
    (tmp_path / "text.txt").write_text("x")
    with pytest.raises(error, match=match):
        convert(tmp_path / source, tmp_path / "out.beton")


def test_bad_options_name_the_option(tmp_path):
    with pytest.raises(ValueError, match="write_mode"):
        convert("digits", tmp_path / "o.beton", write_mode="png")
    with pytest.raises(ValueError, match="must end in .beton"):
        convert("digits", tmp_path / "o.ffcv")
    with pytest.raises(ValueError, match="img_size applies"):
        convert(tmp_path, tmp_path / "o.beton", img_size=32)


def test_wrong_or_foreign_beton_is_refused(tmp_path, unique):
    wrong = tmp_path / "wrong.beton"
    DatasetWriter(str(wrong), {"image": RGBImageField(), "y": IntField()}, num_workers=1).from_indexed_dataset(
        [(np.zeros((4, 4, 3), np.uint8), 0)]
    )
    junk = tmp_path / "junk.beton"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match=r"wrong.beton: expected fields image .* found image \(RGBImageField\), y"):
        read_info(wrong)
    with pytest.raises(ValueError, match="junk.beton: not an FFCV .beton"):
        read_info(junk)
    with pytest.raises(FileNotFoundError, match="nope.beton"):
        make_loaders(_spec(tmp_path / "nope.beton", unique), 32, device="cpu")
    with pytest.raises(ValueError, match="wrong.beton"):
        make_loaders(_spec(unique, wrong), 32, device="cpu")


def _damage(good: Path, out: Path, how: str) -> None:
    if how == "truncated":  # a copy that stopped after its first 5,000 bytes
        out.write_bytes(good.read_bytes()[:5000])
    elif how == "foreign":  # another format's header on FFCV's data (a zip's magic number)
        out.write_bytes(b"PK\x03\x04" + good.read_bytes()[4:])
    elif how == "float_labels":
        DatasetWriter(str(out), {"image": RGBImageField(), "label": FloatField()}, num_workers=1).from_indexed_dataset(
            [(np.zeros((8, 8, 3), np.uint8), 0.5)])


@pytest.mark.parametrize("how, field, what", [
    ("truncated", "train", r"truncated: the per-sample index of its 1437 samples reaches byte \d+, but the file has 5000 bytes"),
    ("foreign", "val", r"not an FFCV .beton file \(header format version 19280, FFCV writes 2\)"),
    ("float_labels", "train", r"field label is FloatField, not IntField"),
])
def test_damaged_beton_stops_the_search_before_ray_with_one_line(digits, tmp_path, capsys, how, field, what):
    """`python -m tntsearch.run` refuses a damaged file at spec load: exit 2, one line naming
    the spec field, the path and what is wrong, and no Ray started."""
    import ray

    from search_utils import demo_spec
    from tntsearch.run import main as run_main

    files = tmp_path / "data"
    files.mkdir()
    for split, good in zip(("train", "val"), digits):
        shutil.copy(good, files / f"{split}.beton")
        shutil.copy(good.with_suffix(".classes.json"), files / f"{split}.classes.json")
    damaged = files / f"{field}.beton"
    _damage(digits[0], damaged, how)
    spec = demo_spec(tmp_path, files, "damaged", num_samples=1, epochs=1)
    capsys.readouterr()  # FFCV's progress bar from writing the float labels
    assert run_main([str(spec)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert re.fullmatch(rf"error: data\.{field}: {re.escape(str(damaged))}: {what}.*\n", err), err
    assert not ray.is_initialized()


def test_damaged_data_region_is_found_by_decoding_the_first_image(tmp_path):
    convert("synthetic", tmp_path / "j.beton", num_samples=4, num_classes=2, write_mode="jpg", num_workers=1)
    reader = Reader(str(tmp_path / "j.beton"))
    ptr = int(reader.metadata["f0"]["data_ptr"][0])
    damaged = bytearray((tmp_path / "j.beton").read_bytes())
    damaged[ptr:ptr + 64] = bytes(64)  # the JPEG's header zeroed: sizes and index still agree
    (tmp_path / "bad.beton").write_bytes(damaged)
    assert read_info(tmp_path / "j.beton").num_samples == 4
    with pytest.raises(ValueError, match=r"bad.beton: field image: sample 0 does not decode as a 32x32 JPEG"):
        read_info(tmp_path / "bad.beton")


def test_trainer_cli_checks_the_same_way(digits, tmp_path, capsys):
    """`python -m tntsearch.train` uses the same check (tntsearch.data.check_files)."""
    from tntsearch.spec import SearchSpec
    from tntsearch.trainer import main as train_main

    _damage(digits[0], tmp_path / "cut.beton", "truncated")
    spec = tmp_path / "spec.yaml"
    spec.write_text(SearchSpec.model_validate({
        "name": "cut", "space": {"img_size": 32, "patch_size": 8, "num_classes": 10},
        "objectives": [{"metric": "val_top1", "mode": "max", "ref": 0.0}],
        "data": {"train": str(tmp_path / "cut.beton"), "val": str(digits[1])},
    }).model_dump_json())
    assert train_main([str(spec), "--arch", "tnt_ti"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: data.train: {tmp_path / 'cut.beton'}: truncated") and err.count("\n") == 1, err


def test_cli_writes_with_progress_bar(tmp_path, capsys):
    assert main(["convert", "synthetic", str(tmp_path / "s.beton"), "--num-samples", "20", "--num-workers", "1"]) == 0
    out, err = capsys.readouterr()
    assert "20/20" in err  # FFCV's tqdm bar on stderr
    assert out.startswith(f"wrote {tmp_path / 's.beton'}: 20 images, 10 classes")


def test_cli_bad_input_exits_2_with_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "tntsearch.data", "convert", str(tmp_path / "nowhere"), str(tmp_path / "o.beton")],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and str(tmp_path / "nowhere") in result.stderr
    assert result.stderr.startswith("error: ")


# --------------------------------------------------------------------------- loaders


def test_digits_loaders_yield_channels_last_float_batches(digits, digits_loaders):
    train, val = digits_loaders
    images, targets = next(iter(train))
    assert images.shape == (32, 3, 32, 32) and images.dtype == torch.float32
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert len(train) == 1437 // 32  # drop_last
    # Mixup/CutMix on: timm's soft targets, off-value smoothing/num_classes everywhere and
    # the rest shared by the two mixed classes.
    assert targets.shape == (32, 10) and targets.dtype == torch.float32
    torch.testing.assert_close(targets.sum(1), torch.ones(32))
    assert targets.min() >= 0.1 / 10 - 1e-6 and targets.max() <= 1 - 0.1 + 0.1 / 10 + 1e-6
    assert (targets > 0.1 / 10 + 1e-6).sum(1).le(2).all()

    labels = next(iter(val))[1]
    assert labels.shape == (32,) and labels.dtype == torch.int64
    seen = torch.cat([y.clone() for _, y in val])
    _, stored = _read_raw(digits[1])
    np.testing.assert_array_equal(seen.numpy(), stored)  # val: every sample, file order

    # Normalised with ImageNet statistics: the digits' black background maps to -mean/std.
    x, _ = next(iter(val))
    background = (0 - torch.tensor(DataSpec.model_fields["mean"].default)) / torch.tensor(
        DataSpec.model_fields["std"].default
    )
    torch.testing.assert_close(x[:, :, 0, 0].amin(0), background, atol=1e-4, rtol=0)


def test_gpu_normalisation_path_matches_cpu_pipeline(digits, digits_loaders):
    """The CUDA pipeline (uint8 copy, normalise after ToTorchImage) checked on the CPU."""
    spec = _spec(*digits)
    decoder = CenterCropRGBImageDecoder((32, 32), ratio=224 / 256)
    cpu = torch.device("cpu")
    loader = SafeLoader(str(digits[1]), batch_size=32, num_workers=1, order=OrderOption.SEQUENTIAL,
                        pipelines={"image": _image_pipeline(decoder, cpu, spec.mean, spec.std, False, True),
                                   "label": _label_pipeline(cpu)})
    got, _ = next(iter(loader))
    want, _ = next(iter(digits_loaders[1]))
    assert got.is_contiguous(memory_format=torch.channels_last) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"mixup": 0.8, "batch_size": 31}, "batch_size must be even"),
        ({"crop_scale": (0.5, 0.2)}, "crop_scale"),
        ({"mean": (124.0, 116.0, 104.0)}, "0-1 floats"),
    ],
)
def test_bad_data_spec_names_the_field(digits, change, match):
    with pytest.raises(ValueError, match=match):
        make_loaders(_spec(*digits, **change), 32, device="cpu")
    with pytest.raises(ValueError, match="initialised torch.distributed"):
        make_loaders(_spec(*digits), 32, device="cpu", distributed=True)


@pytest.mark.parametrize("n, world", [(64, 2), (10, 3), (7, 4)])
def test_shard_order_is_disjoint_and_covering(n, world):
    loader = SimpleNamespace(indices=np.arange(100, 100 + n), seed=5, distributed=True)
    for epoch in range(2):
        train = [_ShardOrder(loader, shuffle=True, rank=r, world_size=world).sample_order(epoch) for r in range(world)]
        assert len({len(t) for t in train}) == 1  # equal batch counts on every rank (DDP needs it)
        flat = np.concatenate(train)
        assert len(set(flat.tolist())) == len(flat) == n - n % world  # disjoint, <= world-1 left out
        val = [_ShardOrder(loader, shuffle=False, rank=r, world_size=world).sample_order(epoch) for r in range(world)]
        assert sorted(np.concatenate(val).tolist()) == list(range(100, 100 + n))  # every sample once
    a, b = (_ShardOrder(loader, shuffle=True, rank=0, world_size=world).sample_order(e) for e in (0, 1))
    assert not np.array_equal(a, b)  # reshuffled each epoch


def _ddp_worker(rank: int, port: int, beton: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        spec = DataSpec(train=beton, val=beton, batch_size=8, num_workers=1)
        train, _ = make_loaders(spec, 16, device="cpu", distributed=True, seed=3)
        seen = {"train": [[int(v) for _, y in train for v in y] for _epoch in range(2)], "batches": len(train)}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(seen))
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_see_disjoint_shards_covering_every_sample(unique, tmp_path):
    torch.multiprocessing.spawn(_ddp_worker, args=(free_port(), str(unique), str(tmp_path)), nprocs=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for epoch in range(2):
        shards = [r["train"][epoch] for r in ranks]
        assert len(shards[0]) == len(shards[1]) == 32  # same number of batches on every rank
        assert sorted(shards[0] + shards[1]) == list(range(64))  # labels are sample ids
    assert ranks[0]["train"][0] != ranks[0]["train"][1]  # reshuffled each epoch
    assert ranks[0]["batches"] == ranks[1]["batches"] == 4


# --------------------------------------------------------------------------- FFCV defects

_HANG_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    from ffcv.fields.decoders import SimpleRGBImageDecoder
    from ffcv.loader import Loader
    from ffcv.transforms import RandomHorizontalFlip, View
    print("building", flush=True)
    Loader(sys.argv[1], batch_size=8, num_workers=1,
           pipelines={"image": [SimpleRGBImageDecoder(), View(np.uint8), RandomHorizontalFlip()]})
    print("built", flush=True)
    """
)


def test_defect_jit_nonjit_jit_pipeline(unique, tmp_path):
    """Defect 1 (libffcv/ffcv#396): FFCV's Loader.__init__ never returns; SafeLoader works."""
    script = tmp_path / "hang.py"
    script.write_text(_HANG_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), str(unique)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "building"  # imports done
        result: list[str] = []
        reader = threading.Thread(target=lambda: result.append(proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout=10)  # building the graph takes well under a second when it works
        assert reader.is_alive() and not result, "FFCV 1.0.2 no longer hangs: drop the workaround"
    finally:
        proc.kill()
        proc.wait()

    loader = SafeLoader(str(unique), batch_size=16, num_workers=1, order=OrderOption.SEQUENTIAL,
                        pipelines={"image": [SimpleRGBImageDecoder(), View(np.uint8), RandomHorizontalFlip(0.0)]})
    images = np.concatenate([np.array(x) for x, _ in loader])  # numpy: no ToTensor here
    np.testing.assert_array_equal(images, np.stack(_read_raw(unique)[0]))  # exact round trip


class _Boom(Operation):
    """A pipeline step that fails on the second batch."""

    def generate_code(self):
        calls = []

        def boom(labels, _dst):
            calls.append(1)
            if len(calls) == 2:
                raise ArithmeticError("boom in the pipeline")
            return labels

        return boom

    def declare_state_and_memory(self, previous_state):
        return previous_state, None


def _label_only(loader_cls, beton: Path, **kw):
    return loader_cls(str(beton), batch_size=8, num_workers=1, order=OrderOption.SEQUENTIAL,
                      pipelines={"image": None, "label": [IntDecoder(), ToTensor(), _Boom()]}, **kw)


def _drain(loader, outcome: list) -> None:
    try:
        for _ in loader:
            pass
        outcome.append(None)
    except Exception as exc:  # noqa: BLE001
        outcome.append(exc)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # FFCV's dying thread
def test_defect_pipeline_exception_reaches_the_caller(unique):
    """Defect 2: FFCV's caller waits forever; SafeLoader re-raises within seconds."""
    plain: list = []
    stuck = threading.Thread(target=_drain, args=(_label_only(Loader, unique), plain), daemon=True)
    stuck.start()
    stuck.join(timeout=5)  # the epoch takes milliseconds when it works
    assert stuck.is_alive() and not plain, "FFCV 1.0.2 no longer hangs: drop the workaround"

    safe: list = []
    worker = threading.Thread(target=_drain, args=(_label_only(SafeLoader, unique), safe), daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive()
    assert isinstance(safe[0], PipelineError) and "boom in the pipeline" in str(safe[0])
    assert isinstance(safe[0].__cause__, ArithmeticError)


def test_defect_batches_are_reused_buffers(digits, digits_loaders):
    """Defect 3: a kept batch is overwritten by later ones; clone_batch keeps it intact."""
    _, val = digits_loaders
    _, stored = _read_raw(digits[1])
    epoch = iter(val)
    kept = next(epoch)
    copy = clone_batch(kept)
    for _ in epoch:
        pass
    np.testing.assert_array_equal(copy[1].numpy(), stored[:32])
    assert not torch.equal(kept[1], copy[1])  # the buffer now holds a later batch's labels
    fresh = next(iter(val))
    torch.testing.assert_close(copy[0], fresh[0])  # val is deterministic: same first batch


def test_defect_thread_counts_are_kept(unique):
    """Defect 4: FFCV's Loader sets the caller's torch thread count to num_workers."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        plain = Loader(str(unique), batch_size=8, num_workers=1, pipelines={"image": None})
        assert torch.get_num_threads() == 1
        torch.set_num_threads(3)
        safe = SafeLoader(str(unique), batch_size=8, num_workers=1, pipelines={"image": None})
        for _ in safe:
            pass
        assert torch.get_num_threads() == 3
        del plain
        with pytest.raises(ValueError, match="num_workers must be an integer >= 1"):
            SafeLoader(str(unique), batch_size=8, num_workers=-1)
    finally:
        torch.set_num_threads(before)
