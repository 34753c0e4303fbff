"""Dataset sources and the prepared format: real round trips through small fixture datasets built in tmp_path."""

from __future__ import annotations

import io
import json
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mimir.data.format import load_manifest, read_split_arrays, stored_order, verify_dataset
from mimir.errors import DatasetError
from mimir.data.sources import DATASETS, prepare_dataset
from mimir.data.sources import cifar10
from mimir.data.sources.digits import digits_arrays, ensure_digits

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR_PER_BATCH = 4
JPEG = {"format": "JPEG", "quality": 95, "subsampling": 0}  # keeps lossy round trips close


# --------------------------------------------------------------------------- fixture builders


def make_cifar_folder(root: Path) -> tuple[Path, dict[str, tuple[np.ndarray, list[int]]]]:
    """A cifar-10-batches-py folder with tiny random batches; returns it and the raw batch contents."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = {}
    for index, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        data = rng.integers(0, 256, size=(CIFAR_PER_BATCH, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=CIFAR_PER_BATCH)]
        batches[name] = (data, labels)
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data,
                 b"filenames": [f"{name}_{i}.png".encode() for i in range(CIFAR_PER_BATCH)]}
        # Vary the protocol: the official files are old protocol-2 pickles.
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2 if index % 2 else 5))
    meta = {b"label_names": [c.encode() for c in CIFAR_CLASSES], b"num_cases_per_batch": CIFAR_PER_BATCH}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return folder, batches


def make_cifar_archive(root: Path) -> tuple[Path, dict[str, tuple[np.ndarray, list[int]]]]:
    folder, batches = make_cifar_folder(root / "extract")
    archive = root / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    return archive, batches


def gradient_image(seed: int, size: int = 64) -> np.ndarray:
    """A smooth RGB image, so JPEG round trips stay close to the original."""
    y, x = np.mgrid[0:size, 0:size] * 64 // size
    channels = [x * 2 + seed * 9, y * 2 + seed * 9, 255 - (x + y) - seed * 9]
    return np.stack(channels, axis=-1).astype(np.uint8)


def make_tiny_imagenet(root: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """A tiny-imagenet-200-style folder: 3 classes x 2 train images, 3 val images, one grayscale."""
    root = root / "tiny-imagenet-200"
    wnids = ["n01443537", "n01629819", "n01641577"]
    root.mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (root / "words.txt").write_text("n01443537\tgoldfish, Carassius auratus\n"
                                    "n01629819\tEuropean fire salamander\n"
                                    "n99999999\tunused\n")
    originals = {}
    for label, wnid in enumerate(wnids):
        images = root / "train" / wnid / "images"
        images.mkdir(parents=True)
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("")  # real folders have these; not images
        for i in range(2):
            array = gradient_image(label * 2 + i)
            name = f"{wnid}_{i}.JPEG"
            if label == 1 and i == 0:
                Image.fromarray(array[..., 0]).save(images / name, **JPEG)  # grayscale
                array = np.repeat(array[..., :1], 3, axis=-1)
            else:
                Image.fromarray(array).save(images / name, **JPEG)
            originals[f"train/{wnid}/{name}"] = array
    (root / "val" / "images").mkdir(parents=True)
    lines = []
    for i, wnid in enumerate([wnids[2], wnids[0], wnids[1]]):
        array = gradient_image(10 + i)
        Image.fromarray(array).save(root / "val" / "images" / f"val_{i}.JPEG", **JPEG)
        originals[f"val/val_{i}.JPEG"] = array
        lines.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return root, originals


def encode(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def make_imagenet(root: Path) -> tuple[Path, dict[str, list[bytes]]]:
    """train/<wnid>/ and val/<wnid>/ folders with JPEG and PNG files of different sizes."""
    root = root / "imagenet"
    files: dict[str, list[bytes]] = {"train": [], "test": []}
    layout = {"train": {"n02": 2, "n01": 2, "n03": 1}, "val": {"n01": 1, "n03": 1}}
    for split, classes in layout.items():
        for wnid in sorted(classes):
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for i in range(classes[wnid]):
                fmt, suffix = ("PNG", "png") if i % 2 else ("JPEG", "JPEG")
                data = encode(gradient_image(i, size=24 + 8 * i), fmt)
                (folder / f"{wnid}_{i}.{suffix}").write_bytes(data)
                files["train" if split == "train" else "test"].append(data)
    return root, files


def assert_nothing_left(out_dir: Path) -> None:
    """A failed conversion leaves neither the dataset folder nor its temporary build folder."""
    assert not out_dir.exists() or sorted(p.name for p in out_dir.iterdir()) == []


def shard_column(dataset: Path, split: str, column: str) -> list:
    files = load_manifest(dataset)["splits"][split]["files"]
    return [value for rel in files for value in pq.read_table(dataset / rel).column(column).to_pylist()]


# --------------------------------------------------------------------------- CIFAR-10


def check_cifar(dataset: Path, batches: dict[str, tuple[np.ndarray, list[int]]]) -> None:
    manifest = load_manifest(dataset)
    assert manifest["encoding"] == "raw" and manifest["image_shape"] == [32, 32, 3]
    assert manifest["classes"] == CIFAR_CLASSES and manifest["num_classes"] == 10
    verify_dataset(dataset)
    train_x, train_y = read_split_arrays(dataset, "train")
    test_x, test_y = read_split_arrays(dataset, "test")
    assert train_x.shape == (5 * CIFAR_PER_BATCH, 32, 32, 3) and test_x.shape == (CIFAR_PER_BATCH, 32, 32, 3)
    data = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)])
    labels = sum((batches[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    # rows are stored in the seeded order: stored row i is source row stored_order(n)[i]
    train_order, test_order = stored_order(len(labels)), stored_order(CIFAR_PER_BATCH)
    np.testing.assert_array_equal(train_x, data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)[train_order])
    np.testing.assert_array_equal(train_y, np.array(labels)[train_order])
    np.testing.assert_array_equal(test_y, np.array(batches["test_batch"][1])[test_order])
    # One known pixel: source row 3 of test, y=5, x=7; the batch stores R, G, B planes of 1024 values.
    test_data = batches["test_batch"][0]
    stored = int(np.flatnonzero(test_order == 3)[0])
    for c in range(3):
        assert test_x[stored, 5, 7, c] == test_data[3, c * 1024 + 5 * 32 + 7]


def test_cifar_folder_round_trip(tmp_path: Path) -> None:
    folder, batches = make_cifar_folder(tmp_path / "src")
    check_cifar(prepare_dataset("cifar10", folder, tmp_path / "out"), batches)
    # A folder that contains cifar-10-batches-py works too.
    check_cifar(prepare_dataset("cifar10", tmp_path / "src", tmp_path / "out", name_as="cifar-b"), batches)


def test_cifar_archive_round_trip_and_sharding(tmp_path: Path) -> None:
    archive, batches = make_cifar_archive(tmp_path)
    dataset = prepare_dataset("cifar10", archive, tmp_path / "out", rows_per_shard=3)
    check_cifar(dataset, batches)
    manifest = load_manifest(dataset)
    assert manifest["name"] == "cifar10" and manifest["source"] == str(archive)
    train = manifest["splits"]["train"]
    assert train["num_rows"] == 20
    assert train["files"] == [f"train/part-{i:05d}.parquet" for i in range(7)]
    assert [pq.read_metadata(dataset / f).num_rows for f in train["files"]] == [3] * 6 + [2]
    schema = pq.read_schema(dataset / train["files"][0])
    assert str(schema.field("image").type) == "binary" and str(schema.field("label").type) == "int64"


def test_cifar_download_uses_urllib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive, batches = make_cifar_archive(tmp_path / "mirror")
    requested = []

    def fake_urlopen(url: str, timeout: float) -> io.BufferedReader:
        requested.append(url)
        return open(archive, "rb")

    monkeypatch.setattr(cifar10.urllib.request, "urlopen", fake_urlopen)
    dataset = prepare_dataset("cifar10", None, tmp_path / "out", download=True)
    assert requested == [cifar10.CIFAR10_URL]
    assert (tmp_path / "out" / "cifar-10-python.tar.gz").read_bytes() == archive.read_bytes()
    check_cifar(dataset, batches)
    # The archive is reused rather than fetched again.
    prepare_dataset("cifar10", None, tmp_path / "out", download=True, overwrite=True)
    assert len(requested) == 1


def test_cifar_download_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(url: str, timeout: float) -> None:
        raise cifar10.urllib.error.URLError("no network")

    monkeypatch.setattr(cifar10.urllib.request, "urlopen", offline)
    with pytest.raises(DatasetError, match="no network") as info:
        prepare_dataset("cifar10", tmp_path / "downloads", tmp_path / "out", download=True)
    assert str(tmp_path / "downloads" / "cifar-10-python.tar.gz") in str(info.value)
    assert list((tmp_path / "downloads").iterdir()) == []  # no half-written archive is kept
    assert_nothing_left(tmp_path / "out")


def test_truncated_archive(tmp_path: Path) -> None:
    archive, _ = make_cifar_archive(tmp_path)
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    out = tmp_path / "out"
    with pytest.raises(DatasetError, match="truncated or corrupt archive") as info:
        prepare_dataset("cifar10", archive, out)
    assert str(archive) in str(info.value)
    assert_nothing_left(out)


def test_cifar_pickle_with_wrong_shape_or_code(tmp_path: Path) -> None:
    folder, _ = make_cifar_folder(tmp_path / "src")
    bad = {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}
    (folder / "data_batch_3").write_bytes(pickle.dumps(bad))
    with pytest.raises(DatasetError, match="uint8 array") as info:
        prepare_dataset("cifar10", folder, tmp_path / "out")
    assert str(folder / "data_batch_3") in str(info.value)
    # Pickles that reference anything beyond numpy arrays are refused, not executed.
    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": os.getcwd}))
    with pytest.raises(DatasetError, match="not a readable CIFAR-10 pickle"):
        prepare_dataset("cifar10", folder, tmp_path / "out")
    assert_nothing_left(tmp_path / "out")


# --------------------------------------------------------------------------- Tiny-ImageNet


def test_tiny_imagenet_round_trip(tmp_path: Path) -> None:
    root, originals = make_tiny_imagenet(tmp_path)
    dataset = prepare_dataset("tiny-imagenet", root, tmp_path / "out")
    manifest = load_manifest(dataset)
    assert manifest["image_shape"] == [64, 64, 3] and manifest["encoding"] == "raw"
    assert manifest["classes"] == ["goldfish, Carassius auratus", "European fire salamander", "n01641577"]
    verify_dataset(dataset)

    train_x, train_y = read_split_arrays(dataset, "train")
    test_x, test_y = read_split_arrays(dataset, "test")
    assert train_x.shape == (6, 64, 64, 3) and test_x.shape == (3, 64, 64, 3)
    train_order, test_order = stored_order(6), stored_order(3)
    assert train_y.tolist() == [[0, 0, 1, 1, 2, 2][i] for i in train_order]
    assert test_y.tolist() == [[2, 0, 1][i] for i in test_order]  # annotation order, then stored order
    train_keys = sorted(k for k in originals if k.startswith("train/"))
    val_keys = [f"val/val_{i}.JPEG" for i in range(3)]
    keys = [train_keys[i] for i in train_order] + [val_keys[i] for i in test_order]
    for stored, key in zip([*train_x, *test_x], keys):
        # JPEG is lossy: compare closely, not exactly.
        assert np.abs(stored.astype(int) - originals[key].astype(int)).mean() < 2, key
    gray = train_x[int(np.flatnonzero(train_order == 2)[0])]  # n01629819_0, saved as single-channel JPEG
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()


def test_tiny_imagenet_missing_wnids(tmp_path: Path) -> None:
    root, _ = make_tiny_imagenet(tmp_path)
    (root / "wnids.txt").unlink()
    with pytest.raises(DatasetError, match="missing 'wnids.txt'") as info:
        prepare_dataset("tiny-imagenet", root, tmp_path / "out")
    assert str(root) in str(info.value)
    assert_nothing_left(tmp_path / "out")


def test_tiny_imagenet_wrong_size_and_unreadable(tmp_path: Path) -> None:
    root, _ = make_tiny_imagenet(tmp_path)
    wrong = root / "val" / "images" / "val_1.JPEG"
    Image.fromarray(gradient_image(0, size=32)).save(wrong, format="JPEG")
    with pytest.raises(DatasetError, match="expected 64x64") as info:
        prepare_dataset("tiny-imagenet", root, tmp_path / "out")
    assert str(wrong) in str(info.value)

    broken = root / "train" / "n01629819" / "images" / "n01629819_1.JPEG"
    broken.write_bytes(b"not a jpeg at all")
    with pytest.raises(DatasetError, match="unreadable image") as info:
        prepare_dataset("tiny-imagenet", root, tmp_path / "out")
    assert str(broken) in str(info.value)
    assert_nothing_left(tmp_path / "out")


# --------------------------------------------------------------------------- ImageNet-1K


def test_imagenet_stores_file_bytes_unchanged(tmp_path: Path) -> None:
    root, files = make_imagenet(tmp_path)
    dataset = prepare_dataset("imagenet", root, tmp_path / "out")
    manifest = load_manifest(dataset)
    assert manifest["encoding"] == "encoded" and manifest["image_shape"] is None
    assert manifest["classes"] == ["n01", "n02", "n03"]
    verify_dataset(dataset)
    train_order, test_order = stored_order(5), stored_order(2)
    assert shard_column(dataset, "train", "image") == [files["train"][i] for i in train_order]
    assert shard_column(dataset, "train", "label") == [[0, 0, 1, 1, 2][i] for i in train_order]
    assert shard_column(dataset, "test", "image") == [files["test"][i] for i in test_order]
    assert shard_column(dataset, "test", "label") == [[0, 2][i] for i in test_order]
    with pytest.raises(DatasetError, match="encoded"):
        read_split_arrays(dataset, "train")


def test_imagenet_unreadable_image(tmp_path: Path) -> None:
    root, _ = make_imagenet(tmp_path)
    broken = root / "train" / "n02" / "x.JPEG"
    broken.write_bytes(b"\x00" * 100)
    with pytest.raises(DatasetError, match="unreadable image") as info:
        prepare_dataset("imagenet", root, tmp_path / "out")
    assert str(broken) in str(info.value)
    assert_nothing_left(tmp_path / "out")


def test_imagenet_val_class_must_exist_in_train(tmp_path: Path) -> None:
    root, _ = make_imagenet(tmp_path)
    extra = root / "val" / "n09"
    extra.mkdir()
    (extra / "a.png").write_bytes(encode(gradient_image(0, 8), "PNG"))
    with pytest.raises(DatasetError, match="not present") as info:
        prepare_dataset("imagenet", root, tmp_path / "out")
    assert str(extra) in str(info.value)


# --------------------------------------------------------------------------- generated npz


def test_generated_npz_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(7, 8, 6, 3), dtype=np.uint8)
    labels = np.array([0, 3, 1, 3, 2, 0, 1], dtype=np.int32)
    source = tmp_path / "gen.npz"
    np.savez(source, image=images, label=labels)
    dataset = prepare_dataset("generated", source, tmp_path / "out")
    assert dataset == tmp_path / "out" / "generated"
    manifest = load_manifest(dataset)
    assert list(manifest["splits"]) == ["train"]
    assert manifest["classes"] == ["0", "1", "2", "3"] and manifest["image_shape"] == [8, 6, 3]
    x, y = read_split_arrays(dataset, "train")
    np.testing.assert_array_equal(x, images[stored_order(7)])
    assert y.dtype == np.int64 and y.tolist() == labels[stored_order(7)].tolist()


def test_generated_npz_wrong_keys_or_dtype(tmp_path: Path) -> None:
    source = tmp_path / "gen.npz"
    np.savez(source, images=np.zeros((2, 4, 4, 3), np.uint8), label=np.zeros(2, np.int64))
    with pytest.raises(DatasetError, match="missing array") as info:
        prepare_dataset("generated", source, tmp_path / "out")
    assert str(source) in str(info.value)
    np.savez(source, image=np.zeros((2, 4, 4, 3), np.float32), label=np.zeros(2, np.int64))
    with pytest.raises(DatasetError, match="uint8") as info:
        prepare_dataset("generated", source, tmp_path / "out")
    assert str(source) in str(info.value)
    assert_nothing_left(tmp_path / "out")


# --------------------------------------------------------------------------- digits


def test_digits_split_shape_and_determinism(tmp_path: Path) -> None:
    first = prepare_dataset("digits", None, tmp_path / "a")
    second = prepare_dataset("digits", None, tmp_path / "b")
    manifest = load_manifest(first)
    assert manifest["classes"] == [str(i) for i in range(10)] and manifest["image_shape"] == [16, 16, 3]
    assert manifest["splits"]["train"]["num_rows"] == 1347 and manifest["splits"]["test"]["num_rows"] == 450
    # Byte-identical shards: the conversion is deterministic.
    assert manifest["splits"] == load_manifest(second)["splits"]

    train_x, train_y = read_split_arrays(first, "train")
    test_x, test_y = read_split_arrays(first, "test")
    assert train_x.shape == (1347, 16, 16, 3) and train_x.dtype == np.uint8
    assert (train_x[..., 0] == train_x[..., 2]).all() and train_x.max() == 255 and train_x.min() == 0
    # Stratified: every class keeps about a quarter of its images in test.
    for digit in range(10):
        share = (test_y == digit).sum() / ((test_y == digit).sum() + (train_y == digit).sum())
        assert 0.23 < share < 0.27
    arrays = digits_arrays()
    np.testing.assert_array_equal(arrays["test"][0][stored_order(450)], test_x)
    np.testing.assert_array_equal(arrays["test"][1][stored_order(450)], test_y)


def test_ensure_digits_caches_and_uses_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MIMIR_DATA_DIR", str(tmp_path / "cache"))
    dataset = ensure_digits()
    assert dataset == tmp_path / "cache" / "digits"
    stamp = (dataset / "manifest.json").stat().st_mtime_ns
    assert ensure_digits(tmp_path / "cache") == dataset
    assert (dataset / "manifest.json").stat().st_mtime_ns == stamp  # reused, not rebuilt


def test_ensure_digits_loses_race_gracefully(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process finishing first (between our check and our rename) is not an error."""
    cache = tmp_path / "cache"
    target = cache / "digits"
    real_replace = os.replace
    raced = []

    def replace_after_rival(src: str | Path, dst: str | Path) -> None:
        if Path(dst) == target and not raced:
            raced.append(True)
            prepare_dataset("digits", None, cache)  # the rival wins the rename
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_after_rival)
    assert ensure_digits(cache) == target
    assert raced
    verify_dataset(target)
    assert [p.name for p in cache.iterdir()] == ["digits"]  # our partial copy was discarded


# --------------------------------------------------------------------------- common behaviour


def test_existing_dataset_needs_overwrite(tmp_path: Path) -> None:
    source = tmp_path / "gen.npz"
    np.savez(source, image=np.zeros((2, 4, 4, 3), np.uint8), label=np.array([0, 1]))
    dataset = prepare_dataset("generated", source, tmp_path / "out")
    with pytest.raises(DatasetError, match="already prepared") as info:
        prepare_dataset("generated", source, tmp_path / "out")
    assert str(dataset) in str(info.value)

    np.savez(source, image=np.full((3, 4, 4, 3), 9, np.uint8), label=np.array([0, 1, 2]))
    assert prepare_dataset("generated", source, tmp_path / "out", overwrite=True) == dataset
    x, y = read_split_arrays(dataset, "train")
    assert x.shape == (3, 4, 4, 3) and (x == 9).all() and sorted(y.tolist()) == [0, 1, 2]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["generated"]


def test_folder_without_manifest_is_not_a_dataset(tmp_path: Path) -> None:
    leftover = tmp_path / "out" / "generated"
    (leftover / "train").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no manifest.json"):
        load_manifest(leftover)
    source = tmp_path / "gen.npz"
    np.savez(source, image=np.zeros((1, 4, 4, 3), np.uint8), label=np.array([0]))
    with pytest.raises(DatasetError, match="not a prepared dataset"):
        prepare_dataset("generated", source, tmp_path / "out")


def test_verify_detects_corrupt_and_missing_shards(tmp_path: Path) -> None:
    source = tmp_path / "gen.npz"
    np.savez(source, image=np.zeros((6, 4, 4, 3), np.uint8), label=np.arange(6))
    dataset = prepare_dataset("generated", source, tmp_path / "out", rows_per_shard=2)
    verify_dataset(dataset)
    shard = dataset / "train" / "part-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match="altered since it was written") as info:
        verify_dataset(dataset)
    assert str(shard) in str(info.value)
    shard.unlink()
    with pytest.raises(DatasetError, match="missing shard") as info:
        verify_dataset(dataset)
    assert str(shard) in str(info.value)


def test_manifest_is_validated(tmp_path: Path) -> None:
    source = tmp_path / "gen.npz"
    np.savez(source, image=np.zeros((1, 4, 4, 3), np.uint8), label=np.array([0]))
    dataset = prepare_dataset("generated", source, tmp_path / "out")
    manifest = json.loads((dataset / "manifest.json").read_text())
    manifest["splits"]["train"]["files"] = ["../../etc/passwd"]
    (dataset / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match="invalid manifest"):
        load_manifest(dataset)


def test_bad_requests(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as info:
        prepare_dataset("mnist", tmp_path, tmp_path / "out")
    assert all(name in str(info.value) for name in DATASETS)
    with pytest.raises(DatasetError, match="only CIFAR-10 can be downloaded"):
        prepare_dataset("tiny-imagenet", tmp_path, tmp_path / "out", download=True)
    with pytest.raises(DatasetError, match="not found") as info:
        prepare_dataset("imagenet", tmp_path / "nowhere", tmp_path / "out")
    assert str(tmp_path / "nowhere") in str(info.value)


def test_long_conversions_print_progress(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    from mimir.data import format as data_format

    monkeypatch.setattr(data_format, "PROGRESS_AFTER_SECONDS", 0.0)  # as if every row took long
    monkeypatch.setattr(data_format, "_ROW_GROUP_ROWS", 10)
    spec = data_format.DatasetSpec.from_arrays(["a", "b"], {"train": (np.zeros((100, 4, 4, 3), np.uint8),
                                                                      np.arange(100) % 2)})
    data_format.write_dataset(spec, tmp_path / "toy", source="arrays", rows_per_shard=30)
    lines = capsys.readouterr().out.splitlines()
    # a line each 5 % of the split: the rows come 10 at a time, so at 10, 20, ... 90 (not at the end)
    assert [line.split()[4] for line in lines] == [f"{n}/100" for n in range(10, 100, 10)]
    assert lines[0].startswith("[prepare] toy train 10% 10/100 images, ETA ")
