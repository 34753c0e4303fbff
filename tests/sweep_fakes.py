"""A stand-in trial runner for the sweep tests: Tune, Optuna, failures, retries and resume, without
training. Registered with Ray's cloudpickle by value, so Tune's trial actors need not import it."""

import time

import ray

from mimir.errors import DatasetError, NonFiniteRun

SECONDS_PER_TRIAL = 2.0  # long enough for an interrupt to land between two trials
REPORT_DRAIN_SECONDS = 1.0


def _report_epochs(callbacks, epochs):
    for epoch in range(epochs):
        for callback in callbacks:
            callback.after_report(None, [{"epoch": epoch, "val_pgd": 30.0, "val_natural": 60.0}], None)


def fake_trial(cfg, experiment, trial_dir, callbacks=(), finetuned=None):
    """Fail like the real pipeline on a missing dataset or a diverging lr; otherwise an accuracy
    that is a fixed function of the config. ``finetuned``: an evaluation-only trial of that model."""
    if cfg.data.dataset == "no-such-dataset":
        raise DatasetError("dataset 'no-such-dataset' not found")
    if cfg.finetune.blr > 1e5:
        raise NonFiniteRun("finetune", "ended with loss nan (100% of steps skipped as non-finite)")
    time.sleep(SECONDS_PER_TRIAL)
    score = 50.0 + 1000.0 * cfg.finetune.blr + 1e5 * cfg.pretrain.mi.weight + cfg.seed
    if callbacks:  # from another process, as Ray Train's controller calls them
        ray.get(ray.remote(num_cpus=0)(_report_epochs).remote(list(callbacks), cfg.finetune.epochs))
        # a real trial's fit() returns seconds after its last epoch report (the evaluation, the
        # controller's shutdown); Tune's session must take that report before the trial's final one
        time.sleep(REPORT_DRAIN_SECONDS)
    return {"config": cfg.model_dump(mode="json"), "accuracy": {m: score for m in cfg.evaluate.attacks},
            "num_images": 32, "seconds": {"finetune": SECONDS_PER_TRIAL},
            "evaluated_checkpoint": finetuned or str(trial_dir / "finetune" / "checkpoint_best")}
