"""The console: Ray's noise filtered precisely (its warnings and errors kept), progress lines."""

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from mimir import console

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


def test_ray_data_in_a_ray_process_keeps_warnings_and_drops_the_notices(tmp_path):
    """A process that imports Ray Data with the config mimir gives Ray's processes (as a
    SplitCoordinator or evaluation task does): INFO banners and the progress-bar notice are gone,
    other warnings and errors still print."""
    config = tmp_path / "ray-data-logging.json"
    config.write_text(json.dumps(console.ray_data_logging_config()))
    code = ("import logging, ray.data\n"
            "log = logging.getLogger('ray.data._internal.execution.streaming_executor')\n"
            "log.info('Dataset train_1 execution finished in 0.3 seconds')\n"
            "logging.getLogger('ray.data._internal.progress').warning("
            "'Progress bars disabled. To enable, set `ray.data.DataContext...`')\n"
            "log.warning('a warning a user must see')\n"
            "log.error('an error a user must see')\n")
    env = {"RAY_DATA_LOGGING_CONFIG": str(config), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    console_out = result.stdout + result.stderr
    assert "execution finished" not in console_out and "Progress bars disabled" not in console_out
    assert "a warning a user must see" in console_out and "an error a user must see" in console_out


def test_this_process_drops_the_token_notice_only(caplog):
    console.quiet_this_process()
    logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    with caplog.at_level(logging.WARNING):
        logger.warning("Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled ...")
        logger.warning("token file unreadable")
    assert [r.getMessage() for r in caplog.records] == ["token file unreadable"]


def test_ray_processes_get_the_quiet_env_only_on_a_local_ray(monkeypatch):
    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    local = console.ray_process_env(local=True)
    assert local["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
    assert json.loads(open(local["RAY_DATA_LOGGING_CONFIG"]).read())["handlers"]["console"]["level"] == "WARNING"
    assert console.ray_process_env(local=False) == {}  # a cluster's nodes can be drained; the file is not there
    console.set_verbose(True)
    assert console.ray_process_env(local=True) == {console.VERBOSE_ENV: "1"}


def test_progress_lines_every_percent_after_a_while(monkeypatch):
    clock = iter(float(t) for t in range(0, 1000, 10))  # 10 s per call of the clock
    monkeypatch.setattr(console.time, "perf_counter", lambda: next(clock))
    progress = console.Progress("[finetune] epoch 1/3", total=100, unit="steps", percent=25, after_seconds=15,
                                queued=200)
    lines = [(step, progress.line(step)) for step in range(1, 101) if progress.due(step)]
    # due at 25, 50, 75 (never at the end: the epoch line says it); the first after 15 s only
    assert [step for step, _ in lines] == [50, 75]
    assert lines[0][1].startswith("[finetune] epoch 1/3 50% 50/100 steps, ETA ")


@pytest.mark.parametrize("seconds, text", [(5, "5s"), (125, "2m 05s"), (7300, "2h 01m")])
def test_durations(seconds, text):
    assert console.format_duration(seconds) == text


def test_progress_off():
    progress = console.Progress("[evaluate]", total=10, unit="images", percent=0, after_seconds=0)
    assert not any(progress.due(n) for n in range(11))


def test_a_terminal_gets_a_bar_through_ray(monkeypatch):
    """On a terminal (the driver's, as Ray workers learn from MIMIR_TERMINAL) the progress is one
    tqdm_ray bar, refreshed at most once a second, closed before the epoch's own line."""
    import ray.experimental.tqdm_ray

    bars = []

    class Bar:
        def __init__(self, total, desc, unit):
            self.total, self.desc, self.unit, self.n, self.closed = total, desc, unit, 0, False
            bars.append(self)

        def set_description(self, desc):
            self.desc = desc

        def close(self):
            self.closed = True

    monkeypatch.setattr(ray.experimental.tqdm_ray, "tqdm", Bar)
    monkeypatch.setenv(console.TERMINAL_ENV, "1")
    clock = iter(float(t) for t in range(0, 1000))  # 1 s per call of the clock
    monkeypatch.setattr(console.time, "perf_counter", lambda: next(clock))
    progress = console.Progress("[pretrain] epoch 2/5", total=50, unit="steps", percent=10, after_seconds=3)
    for step in range(1, 51):
        if progress.due(step):
            progress.report(step, f" loss {1 / step:.3f}")
    (bar,) = bars
    assert bar.total == 50 and bar.unit == "steps" and 40 <= bar.n < 50
    assert bar.desc.startswith("[pretrain] epoch 2/5 loss 0.0") and ", ETA " in bar.desc
    progress.close()
    assert bar.closed and progress.bar is None


def test_the_local_rays_processes_poll_ray_train_workers_often(ray_local):
    """Ray Train's controller reads its poll interval from its process's environment: every process
    of the local Ray gets the short one (each TorchTrainer start and stop waits on those polls)."""
    from mimir.ray_env import LOCAL_POLL_SECONDS

    @ray_local.remote(num_cpus=0)
    def interval() -> str | None:
        import os

        return os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")

    assert ray_local.get(interval.remote()) == str(LOCAL_POLL_SECONDS)


def test_the_local_rays_processes_ask_this_ray_for_its_state_not_any_ray_on_the_machine(ray_local):
    """Ray Train's placement-group cleaner asks the State API of "the" Ray on the machine, which fails
    with a traceback every stage where a second local Ray runs (two mimir runs side by side): the
    processes of ours are pointed at our own dashboard, and its State API answers them."""
    webui = ray_local._private.worker.global_worker.node.address_info["webui_url"]

    @ray_local.remote(num_cpus=0)
    def state_api() -> tuple[str | None, str, int]:
        import os

        from ray.dashboard.utils import get_address_for_submission_client
        from ray.util.state import list_actors

        return os.environ.get("RAY_API_SERVER_ADDRESS"), get_address_for_submission_client(None), len(list_actors())

    told, asked, actors = ray_local.get(state_api.remote())
    assert told == asked == f"http://{webui}" and told.startswith("http://127.0.0.1:") and actors >= 0


def test_a_local_rays_trainers_leave_out_only_the_placement_group_cleaner():
    """Ray Train's placement-group cleaner (a detached actor per stage, which the controller waits for
    before training) guards a cluster against a controller dying with its placement group reserved;
    a local Ray ends with its command, so its trainers drop that callback and keep every other."""
    import ray.train
    import ray.train.torch
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    from mimir.ray_private import local_torch_trainer

    def callbacks(trainer_class: type) -> list[type]:
        trainer = trainer_class(lambda: None, scaling_config=ray.train.ScalingConfig(num_workers=1))
        return [type(callback) for callback in trainer._create_default_callbacks()]

    ray_trains = callbacks(ray.train.torch.TorchTrainer)
    assert PlacementGroupCleanerCallback in ray_trains
    assert callbacks(local_torch_trainer()) == [c for c in ray_trains if c is not PlacementGroupCleanerCallback]


def test_a_local_rays_trainer_gives_its_controller_nothing_that_imports_torch(tmp_path):
    """Ray Train's controller unpickles its run context and callbacks before it starts a worker; with
    Ray's ``TorchConfig`` among them it imports torch first (about a second of each stage's start on
    2 cores). A local Ray's trainer hands it a backend config from a module without torch."""
    import ray.cloudpickle
    import ray.train
    import ray.train.torch

    from mimir.ray_private import ProcessGroupConfig, local_torch_trainer

    def controller_imports_torch(trainer_class: type) -> bool:
        trainer = trainer_class(lambda: None, train_loop_config={"run_folder": str(tmp_path)},
                                scaling_config=ray.train.ScalingConfig(num_workers=2),
                                run_config=ray.train.RunConfig(name="stage", storage_path=str(tmp_path)))
        handed = tmp_path / f"{trainer_class.__name__}.pkl"
        handed.write_bytes(ray.cloudpickle.dumps((trainer.train_run_context, trainer._create_default_callbacks())))
        code = "import pickle, sys; pickle.loads(open(sys.argv[1], 'rb').read()); print('torch' in sys.modules)"
        result = subprocess.run([sys.executable, "-c", code, str(handed)], capture_output=True, text=True, check=True)
        return result.stdout.strip() == "True"

    assert controller_imports_torch(ray.train.torch.TorchTrainer)
    assert not controller_imports_torch(local_torch_trainer())
    # the rest of TorchConfig's interface: its context manager in the workers, torch as the framework
    config = ProcessGroupConfig()
    assert config.train_func_context is ray.train.torch.TorchConfig().train_func_context
    assert config.framework == ray.train.torch.TorchConfig().framework


def test_a_driver_whose_local_ray_has_shut_down_is_no_longer_on_it(monkeypatch):
    """``MIMIR_LOCAL_RAY`` outlives ``ray.shutdown()``; a caller that then joins a cluster with its own
    ``ray.init`` must get the cluster's trainers (placement-group cleaner and all). Processes that Ray
    started (Tune trials, workers) go by the variable alone: they live and die with their Ray."""
    from mimir import ray_env

    monkeypatch.setenv(ray_env.LOCAL_RAY_ENV, "1")
    monkeypatch.setattr(ray_env, "_local_gcs_address", None)
    assert ray_env.on_local_ray()
    monkeypatch.setattr(ray_env, "_local_gcs_address", "127.0.0.1:1")  # a Ray this process started, now gone
    assert not ray_env.on_local_ray()
    monkeypatch.setenv(ray_env.LOCAL_RAY_ENV, "0")
    monkeypatch.setattr(ray_env, "_local_gcs_address", None)
    assert not ray_env.on_local_ray()


def test_a_stage_on_the_local_ray_starts_no_placement_group_cleaner(ray_local, data_root, tmp_path):
    """Every process of the local Ray knows it is one (the trainers are created in the driver or a
    Tune trial), and a real stage there runs its controller without a cleaner actor, and without
    importing torch or mimir's data classes: the loop's config (the digits in memory among it) never
    reaches it."""
    import ray.train
    from ray.util.state import list_actors

    from conftest import quick_overrides
    from mimir import trainers
    from mimir.config import load_config
    from mimir.ray_env import LOCAL_RAY_ENV, on_local_ray

    @ray_local.remote(num_cpus=0)
    def local() -> str | None:
        import os

        return os.environ.get(LOCAL_RAY_ENV)

    assert on_local_ray() and ray_local.get(local.remote()) == "1"
    seen = tmp_path / "controller_modules.json"

    class ControllerModules(ray.train.UserCallback):  # runs in the controller
        def after_report(self, run_context, metrics, checkpoint) -> None:
            import sys

            seen.write_text(json.dumps(sorted(name for name in sys.modules
                                              if name.split(".")[0] in ("torch", "mimir"))))

    cfg = load_config(QUICKSTART, quick_overrides(tmp_path, data_root, pretrain_epochs=1))
    trainers.run_pretrain(cfg, callbacks=[ControllerModules()])
    controller_has = json.loads(seen.read_text())
    assert "torch" not in controller_has and not [name for name in controller_has if name.startswith("mimir.data")]
    assert list_actors(filters=[("class_name", "=", "TrainController")])
    assert not list_actors(filters=[("class_name", "=", "PlacementGroupCleaner")])
