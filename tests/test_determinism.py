"""Same seed, same run: through the whole Ray pipeline (Ray Data reads and augmentations, Ray Train
workers, validation, evaluation), a seed fixes every per-epoch loss and accuracy; another seed
changes them; a run stopped after an epoch and resumed ends exactly as the uninterrupted one.
"""

import json
import sys
from pathlib import Path

import pytest
import ray.cloudpickle
import ray.train

from mimir.config import load_config
from mimir.runner import STAGES, run_stages

from conftest import quick_overrides

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


class EpochLog(ray.train.UserCallback):
    """Appends every report's metrics to a JSON-lines file (callbacks run in Ray Train's controller);
    with ``stop_after`` set, the controller fails after that epoch's report, as a killed driver would."""

    def __init__(self, path: Path, stop_after: int | None = None):
        self.path, self.stop_after = path, stop_after

    def after_report(self, run_context, metrics, checkpoint):
        report = {k: v for k, v in metrics[0].items() if k not in ("seconds", "images_per_second",
                                                                   "validation_seconds")}
        with open(self.path, "a") as log:
            log.write(json.dumps(report) + "\n")
        if self.stop_after is not None and report["epoch"] == self.stop_after:
            raise RuntimeError("stopped on purpose")


ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's controller can't import tests/


def _config(tmp_path: Path, data_root: Path, name: str, seed: int = 0):
    overrides = quick_overrides(tmp_path / name, data_root, pretrain_epochs=1, finetune_epochs=2)
    return load_config(QUICKSTART, overrides + [f"seed={seed}", "finetune.validation.every=1",
                                                "finetune.checkpoint_every=1", "evaluate.num_images=32"])


def _run(tmp_path: Path, data_root: Path, name: str, seed: int = 0, stop_after: int | None = None,
         resume: bool = False, stages: tuple[str, ...] = STAGES) -> tuple[dict, list[dict]]:
    cfg = _config(tmp_path, data_root, name, seed)
    log = tmp_path / f"{name}.jsonl"
    results = run_stages(cfg, stages, storage=str(tmp_path / name), resume=resume,
                         callbacks=[EpochLog(log, stop_after)])
    return results, [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_a_seed_fixes_the_run_and_a_resumed_run_continues_it(ray_local, data_root, tmp_path):
    first, epochs = _run(tmp_path, data_root, "a")
    assert [e["epoch"] for e in epochs] == [0, 1] and all("val_pgd" in e for e in epochs)
    # the best robust-validation checkpoint is kept and evaluated (the later one on a tie)
    best = max(reversed(epochs), key=lambda e: e["val_pgd"])
    assert first["finetune"]["best_metrics"]["epoch"] == best["epoch"]
    assert first["evaluated_checkpoint"].endswith(first["finetune"]["best_checkpoint"])

    # the same seed again, stopped after fine-tuning epoch 0 (as a killed driver), then resumed:
    # every epoch, the best checkpoint and the test accuracies as in the uninterrupted run
    with pytest.raises(Exception, match="stopped on purpose"):
        _run(tmp_path, data_root, "b", stop_after=0)
    resumed, resumed_epochs = _run(tmp_path, data_root, "b", resume=True)
    assert [e["epoch"] for e in resumed_epochs] == [0, 1]  # the log holds both attempts
    assert resumed_epochs == epochs
    assert resumed["pretrain"]["metrics"]["loss"] == first["pretrain"]["metrics"]["loss"]
    assert resumed["accuracy"] == first["accuracy"]
    assert resumed["validation"] == first["validation"]
    assert resumed["finetune"]["best_metrics"]["epoch"] == first["finetune"]["best_metrics"]["epoch"]

    other, _ = _run(tmp_path, data_root, "c", seed=1, stages=("pretrain",))
    assert other["pretrain"]["metrics"]["loss"] != first["pretrain"]["metrics"]["loss"]
