"""Faults a long run meets, each injected on a short real run: damaged dataset shards and checkpoints,
two writers in one folder, signals, a full disk or unwritable storage, transient remote errors.
Each test checks the three things that matter: the exit code and the message naming the problem,
no traceback on the console, and the state on disk (what finished is still finished and loadable;
what did not is not reported as a result). The signals' resume-to-the-same-numbers is in
tests/test_determinism.py, the run that is interrupted there."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import quick_overrides
from mimir import cli, stages, storage
from mimir.data.pipeline import ensure_digits
from mimir.errors import CheckpointError, StorageError
from mimir.folder_lock import LOCK_NAME, folder_lock
from mimir.train.checkpoint import OPTIMIZER, WEIGHTS, load_weights, save_checkpoint, verify_checkpoint

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")


def _flip_byte(path: Path) -> None:
    """One byte in the middle (image bytes, weights) changed: the size stays, the content does not."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _fails_with(capfd, argv: list[str], *named: str, code: int = 2) -> str:
    """Run the CLI; it must end with ``code``, a message holding every ``named``, and no traceback."""
    assert cli.main(argv) == code
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err, out + err
    for text in named:
        assert text in err, err
    return err


@pytest.fixture
def own_digits(tmp_path):
    """A private copy of the digits, free to damage."""
    ensure_digits(tmp_path / "data")
    return tmp_path / "data"


# --- damaged files -------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage, what", [(_truncate, "truncated"), (_flip_byte, "altered since it was written")])
def test_a_damaged_shard_stops_a_run_before_anything_starts_naming_the_file(own_digits, tmp_path, capfd, damage, what):
    shard = own_digits / "digits" / "test" / "part-00000.parquet"
    damage(shard)
    out = tmp_path / "run"
    _fails_with(capfd, ["run", QUICKSTART, f"data.root={own_digits}", f"output_dir={out}"], str(shard), what)
    assert not out.exists()  # nothing written, not even the folder
    _fails_with(capfd, ["data", "verify", "digits", "--root", str(own_digits)], str(shard), what)


def test_data_verify_passes_a_whole_dataset(own_digits, capfd):
    assert cli.main(["data", "verify", "digits", "--root", str(own_digits)]) == 0
    assert "every shard is whole" in capfd.readouterr().out


def _checkpoint(directory: Path) -> Path:
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    return save_checkpoint(directory, model, {"epoch": 0, "stage": "finetune"}, optimizer)


@pytest.mark.parametrize("name", [WEIGHTS, OPTIMIZER])
@pytest.mark.parametrize("damage, what", [(_truncate, "truncated"), (_flip_byte, "altered since it was written")])
def test_a_damaged_checkpoint_file_is_named_when_read(tmp_path, name, damage, what):
    directory = _checkpoint(tmp_path / "ckpt")
    verify_checkpoint(directory)
    damage(directory / name)
    with pytest.raises(CheckpointError, match=what) as caught:
        verify_checkpoint(directory)
    assert str(directory / name) in str(caught.value)
    if name == WEIGHTS:
        with pytest.raises(CheckpointError, match=what):
            load_weights(directory)


def test_a_damaged_checkpoint_given_on_the_command_line_stops_before_ray(tmp_path, capfd, data_root):
    directory = _checkpoint(tmp_path / "ckpt")
    _flip_byte(directory / WEIGHTS)
    _fails_with(capfd, ["evaluate", QUICKSTART, f"data.root={data_root}", f"output_dir={tmp_path / 'run'}",
                        "--checkpoint", str(directory)], "--checkpoint", str(directory / WEIGHTS), "altered")


# --- one writer per folder ---------------------------------------------------------------------------------

HOLD = """
import sys, time
from mimir.folder_lock import folder_lock
with folder_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def _holder(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_refused_naming_the_first_and_a_dead_ones_lock_is_taken(tmp_path, capfd, data_root):
    out = tmp_path / "run"
    holder = _holder(out)
    try:
        err = _fails_with(capfd, ["run", QUICKSTART, f"data.root={data_root}", f"output_dir={out}"],
                          str(out), f"pid {holder.pid} on {os.uname().nodename}", "being written by another run")
        assert "wait for it to end" in err
        # a sweep's experiment folder is held the same way
        _fails_with(capfd, ["sweep", str(REPO / "tune" / "quickstart.yaml"), "--out", str(out)],
                    f"pid {holder.pid}")
    finally:
        holder.kill()  # dies holding the lock: the kernel releases it
        holder.wait()
    with folder_lock(out):
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
    with folder_lock(tmp_path / "new"):
        pass
    assert not (tmp_path / "new").exists()  # created for nothing, removed again


# --- storage -------------------------------------------------------------------------------------------------


def test_a_full_disk_is_a_named_storage_error_and_leaves_the_file_as_it_was(tmp_path):
    target = tmp_path / "results.json"
    storage.write_json(target, {"accuracy": 1})
    os.symlink("/dev/full", tmp_path / "results.json.partial")  # the next write's bytes go to a full device
    with pytest.raises(StorageError, match="No space left on device") as caught:
        storage.write_json(target, {"accuracy": 2})
    assert str(target) in str(caught.value)
    assert json.loads(target.read_text()) == {"accuracy": 1}
    (tmp_path / "state").mkdir()
    os.symlink("/dev/full", tmp_path / "state" / WEIGHTS)
    with pytest.raises(StorageError, match=f"{tmp_path / 'state' / WEIGHTS}: No space left"):
        _checkpoint(tmp_path / "state")


def test_remote_errors_are_retried_with_backoff_and_permanent_ones_are_not(monkeypatch):
    waits = []
    monkeypatch.setattr(storage.time, "sleep", waits.append)
    attempts = []

    def flaky() -> str:
        attempts.append(1)
        if len(attempts) < 3:
            raise OSError("connection reset by peer")
        return "written"

    assert storage.with_retries("s3://bucket/run/results.json", flaky) == "written"
    assert waits == [1.0, 2.0]
    waits.clear()
    with pytest.raises(StorageError, match=r"s3://bucket/x: .*unreachable \(after 5 attempts\)"):
        storage.with_retries("s3://bucket/x", lambda: (_ for _ in ()).throw(OSError("unreachable")))
    assert waits == list(storage.REMOTE_RETRY_WAITS)
    waits.clear()
    with pytest.raises(StorageError, match="denied"):
        storage.with_retries("s3://bucket/x", lambda: (_ for _ in ()).throw(PermissionError("denied")))
    assert waits == []
    with pytest.raises(StorageError):  # a local disk is not retried
        storage.with_retries(str(Path("/x")), lambda: (_ for _ in ()).throw(OSError("no space")))
    assert waits == []


def test_an_unwritable_storage_path_stops_a_run_before_ray(tmp_path, capfd, data_root):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    _fails_with(capfd, ["run", QUICKSTART, f"data.root={data_root}", f"output_dir={tmp_path / 'run'}",
                        f"scaling.storage_path={blocker / 'runs'}"], "could not write", str(blocker / "runs"))


# --- signals -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_ends_a_command_within_seconds_with_a_message(tmp_path, signum, code):
    proc = subprocess.Popen([sys.executable, "-m", "mimir.cli", "bench", "--config", QUICKSTART, "--rounds", "50",
                             "--out", str(tmp_path / "bench.json")], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline()  # it has started timing
    proc.send_signal(signum)
    started = time.time()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code and f"stopped by {signal.Signals(signum).name}" in err, err
    assert time.time() - started < 30 and "Traceback" not in err
    assert not (tmp_path / "bench.json").exists()  # no report of a run that did not finish


SLOW_TO_STOP = """
import time
from mimir import cli

def command(args):
    try:
        print("working", flush=True)
        time.sleep(600)
    finally:  # what a run does after the first signal: Ray Train tears its workers down
        print("stopping", flush=True)
        time.sleep(600)

cli.load_handler = lambda target: command
raise SystemExit(cli.main(["bench"]))
"""


def test_a_second_signal_aborts_at_once_while_the_first_unwinds():
    proc = subprocess.Popen([sys.executable, "-c", SLOW_TO_STOP], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "working"
    proc.send_signal(signal.SIGINT)
    assert proc.stdout.readline().strip() == "stopping"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 130 and "SIGINT again: aborting at once" in err, err


# --- on real runs ------------------------------------------------------------------------------------------------


def test_a_full_disk_mid_run_and_damaged_checkpoints_end_named_and_keep_what_finished(ray_local, tmp_path, capfd,
                                                                                     data_root):
    out = tmp_path / "run"
    args = [QUICKSTART, *quick_overrides(out, data_root, pretrain_epochs=1, finetune_epochs=1)]
    assert cli.main(["pretrain", *args]) == 0
    pretrain = stages.read_stage_record(str(out), "pretrain")
    weights = Path(stages.stage_checkpoint(str(out), pretrain).path) / WEIGHTS
    # a pre-training checkpoint altered after it was written: fine-tuning refuses it before it starts
    _flip_byte(weights)
    _fails_with(capfd, ["finetune", *args], str(weights), "altered since it was written")
    _flip_byte(weights)
    assert not (out / "finetune").exists()
    # the disk fills while fine-tuning writes its first metrics: a named error, the pre-training intact
    (out / "finetune").mkdir()
    os.symlink("/dev/full", out / "finetune" / "metrics.jsonl.partial")
    _fails_with(capfd, ["run", *args, "--resume"], str(out / "finetune" / "metrics.jsonl"), "No space left on device")
    assert stages.read_stage_record(str(out), "pretrain") == pretrain and verify_checkpoint(weights.parent) is None
    assert stages.read_stage_record(str(out), "finetune") is None
    assert "accuracy" not in json.loads((out / "results.json").read_text())  # still `mimir pretrain`'s record
    # room again: --resume reuses the pre-training and finishes
    (out / "finetune" / "metrics.jsonl.partial").unlink(missing_ok=True)
    assert cli.main(["run", *args, "--resume"]) == 0
    capfd.readouterr()
    results = json.loads((out / "results.json").read_text())
    assert results["pretrain"] == pretrain
    # the fine-tuned checkpoint truncated: evaluation names it before it starts
    evaluated = Path(results["evaluated_checkpoint"]) / WEIGHTS
    _truncate(evaluated)
    _fails_with(capfd, ["evaluate", *args], str(evaluated), "truncated")
