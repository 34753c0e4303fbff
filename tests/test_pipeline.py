"""The Ray pipeline's parts: Ray Data pipelines, DDP on CPU, stage refusals, streaming evaluation
(`mimir run` end to end, resume and seeds: tests/test_determinism.py)."""

from pathlib import Path

import pytest
import torch

from conftest import quick_overrides
from mimir import errors, trainers
from mimir.config import load_config
from mimir.data.pipeline import eval_dataset, mix_batch, resolve_dataset, train_dataset

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"


def test_mix_batch_makes_soft_targets_that_sum_to_one():
    import numpy as np

    batch = {"image": np.random.default_rng(0).integers(0, 255, (6, 3, 8, 8), dtype=np.uint8),
             "label": np.arange(6) % 3, "index": np.arange(6)}
    outs = [mix_batch(batch, 3, 0.8, 1.0, seed) for seed in range(4)]
    for out in outs:
        assert out["target"].shape == (6, 3)
        assert np.allclose(out["target"].sum(1), 1.0)
        assert out["image"].dtype == np.uint8
    # seeded: the same seed mixes the same way, another seed differently
    assert np.array_equal(mix_batch(batch, 3, 0.8, 1.0, 0)["image"], outs[0]["image"])
    assert not all(np.array_equal(out["image"], outs[0]["image"]) for out in outs[1:])


def test_mixed_targets_are_float32_whether_mixup_or_cutmix_draws_them():
    """CutMix's label weight is the swapped area's ratio, a float64: its targets must still be float32
    like MixUp's, or Ray Data fails to join two batches' blocks (it did: "divergent scalar types")."""
    import numpy as np

    batch = {"image": np.zeros((4, 3, 8, 8), dtype=np.uint8), "label": np.arange(4) % 3, "index": np.arange(4)}
    for mixup_alpha, cutmix_alpha in ((0.8, 0.0), (0.0, 1.0)):
        assert mix_batch(batch, 3, mixup_alpha, cutmix_alpha, seed=0, epoch=0)["target"].dtype == np.float32


def test_ray_data_pipelines_deliver_tensors_in_order(ray_local, data_root):
    cfg = load_config(QUICKSTART, [f"data.root={data_root}"])
    path = resolve_dataset(cfg.data)
    batch = next(iter(train_dataset(path, cfg.data, finetune=False).iter_torch_batches(batch_size=16)))
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (16, 3, 16, 16)
    first = eval_dataset(path, cfg.data, num_images=40).take_batch(40)
    again = eval_dataset(path, cfg.data, num_images=40).take_batch(40)
    assert (first["label"] == again["label"]).all() and (first["image"] == again["image"]).all()
    # the workers' shares of an evaluation: each of the first 40 images in exactly one, in stored order
    parts = [eval_dataset(path, cfg.data, num_images=40, part=(k, 3)).take_all() for k in range(3)]
    assert all(parts) and sum(len(p) for p in parts) == 40
    whole = sorted((row["image"].tobytes(), row["label"]) for row in eval_dataset(path, cfg.data, 40).take_all())
    assert sorted((row["image"].tobytes(), row["label"]) for p in parts for row in p) == whole


def test_cached_split_is_read_once_and_still_augmented_anew_each_epoch(ray_local, data_root, tmp_path, monkeypatch):
    import shutil

    from ray.data.dataset import MaterializedDataset

    from mimir.data import pipeline

    copy = tmp_path / "digits"
    shutil.copytree(resolve_dataset(load_config(QUICKSTART, [f"data.root={data_root}"]).data), copy)
    cfg = load_config(QUICKSTART, [f"data.dataset={copy}"])
    cached = train_dataset(copy, cfg.data, finetune=False)  # cache_in_memory unset: the digits fit
    uncached = train_dataset(copy, cfg.data.model_copy(update={"cache_in_memory": False}), finetune=False)
    (copy / "train").rename(tmp_path / "moved")  # later epochs must not need the files
    epochs = [cached.take_batch(1347, batch_format="numpy") for _ in range(2)]
    assert (epochs[0]["label"] == epochs[1]["label"]).all()  # the same images, in the same order
    assert (epochs[0]["image"] != epochs[1]["image"]).any()  # with fresh random crops
    with pytest.raises(Exception, match="part-00000.parquet"):
        uncached.take_batch(16)
    (tmp_path / "moved").rename(copy / "train")
    monkeypatch.setattr(pipeline, "CACHE_FRACTION", 0.0)  # unset and too large for the object store
    assert not isinstance(pipeline.read_split(copy, "train"), MaterializedDataset)
    assert isinstance(pipeline.read_split(copy, "train", True), MaterializedDataset)


def test_a_small_split_read_by_the_driver_gives_what_ray_data_reads(ray_local, data_root, monkeypatch):
    """The digits are read by the driver (no Ray Data job to start); every dataset a run builds from
    them holds, to the byte and in order, what Ray Data's read of the same files gives."""
    import numpy as np

    from mimir.data import pipeline

    cfg = load_config(QUICKSTART, [f"data.root={data_root}"])
    path = resolve_dataset(cfg.data)
    holdout = pipeline.holdout_indices(path, 30, seed=0)

    def datasets() -> list[dict]:
        train = train_dataset(path, cfg.data, finetune=True, seed=0, start_epoch=2, holdout=holdout)
        built = [train.take_batch(2000), train.take_batch(2000)]  # two epochs
        parts = [pipeline.validation_parts(path, cfg.data, holdout, workers)[rank] for rank, workers in ((0, 1), (1, 2))]
        built += [part.rows if isinstance(part, pipeline.InMemoryRows) else part.take_batch(2000) for part in parts]
        built += [eval_dataset(path, cfg.data, 50, part=part).take_batch(2000) for part in ((0, 1), (2, 3))]
        return built

    assert pipeline.small_split(path, "train") is not None
    by_driver = datasets()
    monkeypatch.setattr(pipeline, "DRIVER_READ_BYTES", 0)
    assert pipeline.small_split(path, "train") is None
    by_ray_data = datasets()
    odd_rows = int((holdout % 2 == 1).sum())  # validation part (1, 2)
    assert [len(batch["label"]) for batch in by_driver] == [1317, 1317, 30, odd_rows, 50, 16]
    for ours, theirs in zip(by_driver, by_ray_data):
        assert np.array_equal(ours["label"], theirs["label"]) and np.array_equal(ours["image"], theirs["image"])
    assert not np.array_equal(by_driver[0]["image"], by_driver[1]["image"])  # each epoch crops anew


@pytest.mark.parametrize("stage, changes", [("pretrain", {}), ("finetune", {}), ("finetune", {"augment": "mix"}),
                                           ("finetune", {"shuffle_buffer": 0})])
def test_a_lone_worker_augments_a_small_split_itself_into_the_batches_ray_data_gives(ray_local, data_root, stage,
                                                                                      changes):
    """A one-worker stage on the digits gets its training epochs from the split in memory, augmented in
    the worker (no Ray Data execution): to the byte and in order the batches of the Ray Data pipeline,
    its seeded local shuffle buffer (or none) and MixUp / CutMix included; and the test split's rows
    in memory batch as Ray Data's dataset of them does."""
    from mimir.data import pipeline

    cfg = load_config(QUICKSTART, [f"data.root={data_root}"])
    data = cfg.data.model_copy(update=changes)
    path = resolve_dataset(data)
    finetune, batch = stage == "finetune", 32 if stage == "finetune" else 128
    holdout = pipeline.holdout_indices(path, 150, seed=0) if finetune else None
    kwargs = dict(finetune=finetune, seed=4, holdout=holdout, batch_size=batch)
    local = pipeline.local_train_split(path, data, **kwargs)
    assert local is not None
    ray_data = train_dataset(path, data, start_epoch=2, **kwargs)  # a resumed run's: its first epoch is 2
    epochs = {}
    for epoch in (2, 3):
        ours, theirs = (list(pipeline.epoch_batches(split, batch_size=batch, data=data, seed=4, epoch=epoch, rank=0))
                        for split in (local, ray_data))
        assert len(ours) == len(theirs) == (1347 - (150 if finetune else 0)) // batch
        for a, b in zip(ours, theirs):
            assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
        epochs[epoch] = ours
    assert not torch.equal(epochs[2][0]["image"], epochs[3][0]["image"])  # each epoch anew
    if changes.get("augment") == "mix":
        assert epochs[2][0]["target"].dtype == torch.float32
    rows = pipeline.small_test_rows(path, data, 70, part=(1, 2))
    ours = list(rows.iter_torch_batches(batch_size=16, device="cpu"))
    theirs = list(eval_dataset(path, data, 70, part=(1, 2)).iter_torch_batches(batch_size=16))
    assert [len(b["label"]) for b in ours] == [len(b["label"]) for b in theirs] == [16, 16, 3]
    for a, b in zip(ours, theirs):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])


def test_a_one_worker_stage_on_the_digits_gets_its_data_in_memory(data_root):
    """What makes the digits' stages skip Ray Data: with one worker the training split is a
    LocalTrainSplit and the validation and test parts are rows in memory (the workers' config), never
    Ray datasets; data.cache_in_memory=false asks for the Ray Data pipeline instead."""
    from mimir.data import pipeline

    cfg = load_config(QUICKSTART, [f"data.root={data_root}"])
    path = resolve_dataset(cfg.data)
    assert isinstance(trainers._training_split(cfg, path, finetune=False, start_epoch=0), pipeline.LocalTrainSplit)
    assert isinstance(trainers._test_part(cfg, path, (0, 1)), pipeline.InMemoryRows)
    holdout = pipeline.holdout_indices(path, 30, seed=0)
    assert all(isinstance(part, pipeline.InMemoryRows) for part in pipeline.validation_parts(path, cfg.data, holdout, 2))
    uncached = cfg.data.model_copy(update={"cache_in_memory": False})
    assert pipeline.local_train_split(path, uncached, finetune=True, holdout=holdout, batch_size=32) is None


def test_unfinished_run_needs_resume(ray_local, data_root, tmp_path):
    cfg = load_config(QUICKSTART, quick_overrides(tmp_path, data_root))
    (tmp_path / "pretrain").mkdir(parents=True)
    with pytest.raises(errors.StageExistsError, match="--resume"):
        trainers.run_pretrain(cfg)


def test_evaluation_streams_a_large_test_split_in_stored_order(ray_local, tmp_path):
    """6,000 test images of 3x64x64 are 295 MB as one float tensor (and twice that concatenated); the
    evaluation task must stay far below by holding one batch at a time."""
    import numpy as np
    import ray

    from mimir.data.format import DatasetSpec, stored_order, write_dataset
    from mimir.models import build_classifier
    from mimir.train.checkpoint import save_checkpoint

    rng = np.random.default_rng(0)
    n_test = 6000
    spec = DatasetSpec.from_arrays([str(i) for i in range(10)], {
        "train": (rng.integers(0, 255, (20, 64, 64, 3), dtype=np.uint8), np.arange(20) % 10),
        "test": (rng.integers(0, 255, (n_test, 64, 64, 3), dtype=np.uint8), (np.arange(n_test) * 7) % 10)})
    dataset = write_dataset(spec, tmp_path / "big", source="synthetic", rows_per_shard=1000)
    cfg = load_config(QUICKSTART, [f"data.dataset={dataset}", "data.img_size=64", "model.patch_size=16",
                                   "model.embed_dim=32", "model.depth=1", "model.num_heads=2",
                                   "evaluate.attacks=[natural]", "evaluate.batch_size=64"])
    checkpoint = tmp_path / "finetuned"
    save_checkpoint(checkpoint, build_classifier(cfg, 10), {"num_classes": 10, "epoch": 0})
    result = trainers.run_evaluate(cfg, ray.train.Checkpoint(str(checkpoint)))
    assert result["num_images"] == n_test
    # private memory (Ray's shared object store pages a worker touches are not the task's own)
    assert result["private_memory_mb"] is not None and result["private_memory_mb"] < 150, result["private_memory_mb"]
    # "the first N" are the stored first N in every run, and the process's own Ray Data context is untouched
    stored = ((np.arange(n_test) * 7) % 10)[stored_order(n_test)]
    for _ in range(2):
        first = eval_dataset(dataset, cfg.data, num_images=50).take_batch(50)
        assert first["label"].tolist() == stored[:50].tolist()
    assert not ray.data.DataContext.get_current().execution_options.preserve_order


def test_two_fine_tuning_workers_share_the_evaluation(ray_local, data_root, tmp_path):
    """A run's evaluation in its fine-tuning workers (2, DDP on CPU, half a CPU each so Ray Data keeps
    one): an odd number of test images split between them, each counted once, and the natural
    accuracy the evaluated (best-validated) checkpoint has on those images."""
    import mimir
    from mimir.evaluation import evaluate_classifier
    from mimir.runner import run_pipeline

    out = tmp_path / "two"
    cfg = load_config(QUICKSTART, [*quick_overrides(out, data_root), "pretrain.enabled=false",
                                   "scaling.num_workers=2", "scaling.cpus_per_worker=0.5", "scaling.torch_threads=1",
                                   "finetune.validation.every=1", "evaluate.checkpoint=best", "evaluate.num_images=65"])
    results = run_pipeline(cfg, ("finetune", "evaluate"))
    assert results["evaluated_by"] == "2 fine-tuning workers" and results["num_images"] == 65
    assert results["evaluated_checkpoint"].endswith(results["finetune"]["best_checkpoint"])
    test = eval_dataset(resolve_dataset(cfg.data), cfg.data, 65).take_batch(100)
    natural_only = cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(update={"attacks": ["natural"]})})
    alone = evaluate_classifier(mimir.load_classifier(results["evaluated_checkpoint"]),
                                torch.from_numpy(test["image"]).float() / 255, torch.from_numpy(test["label"]),
                                natural_only)
    assert alone["num_images"] == 65 and alone["accuracy"]["natural"] == results["accuracy"]["natural"]
