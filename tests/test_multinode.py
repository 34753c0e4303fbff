"""A multi-node rehearsal on one machine (tests/rehearsal.py): 2 training workers (DDP) on two Ray
nodes, one node killed mid-run, the run finishing from its last checkpoint."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
QUICKSTART = TESTS.parent / "configs" / "quickstart.yaml"


@pytest.mark.slow
def test_a_killed_worker_node_costs_at_most_checkpoint_every_epochs(data_root, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # nothing of another cluster
    run = subprocess.run([sys.executable, str(TESTS / "rehearsal.py"), str(QUICKSTART), str(data_root),
                          str(tmp_path / "run")], capture_output=True, text=True, env=env, timeout=540)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-4000:]
    happened = json.loads(run.stdout.strip().splitlines()[-1])
    assert happened["replacement_joined"] and happened["final_epoch"] == 3
    # DDP across the two nodes: the checkpoint records both workers, and the first epoch's probe
    # (averaged over them) finds Eq. 29 HSIC at lambda = 1e-5 without effect on the encoder
    assert happened["checkpoint_num_workers"] == 2 and 0 < happened["first_mi_share"] < 1e-6
    # every epoch once in the history; the restart began at the last checkpoint before the kill
    assert happened["epochs_in_history"] == list(range(4))
    resumed = [int(m) for m in re.findall(r"\[pretrain\] resuming from epoch (\d+)", output)]
    assert len(resumed) == 1, output[-4000:]
    rerun = happened["killed_after_epochs"] - resumed[0]
    assert 0 <= rerun <= happened["checkpoint_every"]
