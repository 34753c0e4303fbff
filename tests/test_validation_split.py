"""The stored row index (format 2), what it keys: each image's augmentation draws and the validation
hold-out (stratified, seeded, disjoint from training). Fast tier: no Ray."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mimir.config import DataConfig
from mimir.data.format import load_manifest
from mimir.errors import DatasetError
from mimir.data.pipeline import _held_out, holdout_indices, split_files, train_transform
from mimir.data.sources.digits import ensure_digits


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return ensure_digits(tmp_path_factory.mktemp("data"))


def _train_rows(digits):
    table = pa.concat_tables([pq.read_table(f) for f in split_files(digits, "train")])
    return {"image": np.array(table.column("image").to_pylist(), dtype=object),
            "label": table.column("label").to_numpy(), "index": table.column("index").to_numpy()}


def test_rows_carry_their_position_in_the_split(digits):
    assert load_manifest(digits)["format_version"] == 2
    rows = _train_rows(digits)
    assert rows["index"].tolist() == list(range(len(rows["index"])))


def test_an_older_format_is_named_and_the_digits_cache_is_rebuilt(tmp_path):
    target = ensure_digits(tmp_path)
    manifest = json.loads((target / "manifest.json").read_text())
    (target / "manifest.json").write_text(json.dumps({**manifest, "format_version": 1}))
    with pytest.raises(DatasetError, match="prepared by an earlier mimir: prepare it again"):
        load_manifest(target)
    assert load_manifest(ensure_digits(tmp_path))["format_version"] == 2


def test_the_holdout_is_stratified_seeded_and_sized(digits):
    rows = _train_rows(digits)
    holdout = holdout_indices(digits, 150, seed=0)
    assert len(holdout) == 150 and len(set(holdout)) == 150
    assert np.array_equal(holdout, holdout_indices(digits, 150, seed=0))
    assert not np.array_equal(holdout, holdout_indices(digits, 150, seed=1))
    labels = rows["label"]
    share = np.bincount(labels, minlength=10) / len(labels)
    held = np.bincount(labels[np.isin(rows["index"], holdout)], minlength=10)
    assert np.all(np.abs(held - 150 * share) < 1)  # each class in proportion, to the image
    assert len(holdout_indices(digits, 0, seed=0)) == 0
    with pytest.raises(DatasetError, match="finetune.validation.images 5000 leaves no training rows"):
        holdout_indices(digits, 5000, seed=0)


def test_training_never_sees_the_holdout_and_validation_sees_only_it(digits):
    rows = _train_rows(digits)
    manifest, data = load_manifest(digits), DataConfig(img_size=16)
    holdout = holdout_indices(digits, 100, seed=0)
    trained = train_transform(rows, manifest, data, randaugment=False, seed=0, holdout=holdout)
    validated = _held_out(rows, manifest, 16, 1.0, holdout)
    assert not np.isin(trained["index"], holdout).any()
    assert len(trained["label"]) + len(validated["label"]) == len(rows["label"])
    assert validated["image"].shape == (100, 3, 16, 16)


def test_an_images_draws_follow_its_index_not_its_batch(digits):
    """The same row gets the same crop wherever it lands (any block, any batch position), and a new
    crop in the next epoch or with another seed."""
    rows = _train_rows(digits)
    manifest, data = load_manifest(digits), DataConfig(img_size=16, crop_scale=(0.2, 0.5))
    first = train_transform({k: v[:64] for k, v in rows.items()}, manifest, data, False, seed=0)
    shifted = train_transform({k: v[32:96] for k, v in rows.items()}, manifest, data, False, seed=0)
    assert np.array_equal(first["image"][32:], shifted["image"][:32])
    reseeded = train_transform({k: v[:64] for k, v in rows.items()}, manifest, data, False, seed=1)
    assert not np.array_equal(first["image"], reseeded["image"])
