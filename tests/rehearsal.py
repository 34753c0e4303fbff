"""The cluster path rehearsed on one machine (run by tests/test_multinode.py in a process of its own):
a Ray cluster of a head and two worker nodes on loopback (``ray.cluster_utils.Cluster``), each
worker node offering one ``rehearsal_worker`` resource, so the two training workers, which ask for
one each, land on different nodes. A 2-worker pre-training writes its checkpoints to a storage path
all nodes share; after three epochs one worker node is killed outright, and a fresh node joins as
an autoscaler would bring one. Prints what happened as JSON on its last line. (It is also the suite's
2-worker DDP run on CPU.)

    python tests/rehearsal.py CONFIG DATA_ROOT OUT
"""

import json
import os
import sys
import threading
import time
from pathlib import Path

import ray

EPOCHS, CHECKPOINT_EVERY, KILL_AFTER_EPOCHS = 4, 2, 3
WORKER_NODE = {"num_cpus": 2, "resources": {"rehearsal_worker": 1}}


def main(config: str, data_root: str, out: str) -> None:
    from ray.cluster_utils import Cluster

    # a dead node is noticed after 2 missed health checks of 1 s (Ray's defaults wait longer); Ray
    # Train's controller polls its workers every 0.2 s, as on mimir's local Ray (the nodes' processes
    # inherit this environment)
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.2"
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 2}})
    workers = [cluster.add_node(**WORKER_NODE) for _ in range(2)]
    cluster.wait_for_nodes()
    os.environ["RAY_ADDRESS"] = cluster.address  # mimir joins it as it joins any cluster

    from mimir.config import load_config
    from mimir.ray_env import init_ray
    from mimir.runner import run_pipeline

    storage = Path(out) / "shared"
    cfg = load_config(config, [
        f"output_dir={out}", f"data.root={data_root}", f"scaling.storage_path={storage}",
        "scaling.num_workers=2", "scaling.cpus_per_worker=1", "scaling.torch_threads=1",
        "scaling.resources_per_worker={rehearsal_worker: 1}", "scaling.max_failures=1",
        f"pretrain.epochs={EPOCHS}", "pretrain.warmup_epochs=0", f"pretrain.checkpoint_every={CHECKPOINT_EVERY}",
        # Eq. 29 HSIC at the paper's lambda: the 2-worker run measures that its penalty does nothing
        "pretrain.mi.estimator=hsic"])
    happened: dict = {}
    init_ray()  # here: Ray's signal handlers need the main thread, which kills and adds the nodes
    outcome: dict = {}
    training = threading.Thread(target=lambda: outcome.update(results=run_pipeline(cfg, ("pretrain",))))
    training.start()
    history = storage / "pretrain" / "metrics.jsonl"
    while not history.is_file() or len(history.read_text().splitlines()) < KILL_AFTER_EPOCHS:
        time.sleep(0.1)
    happened["killed_after_epochs"] = len(history.read_text().splitlines())
    cluster.remove_node(workers[1], allow_graceful=False)
    time.sleep(2)
    cluster.add_node(**WORKER_NODE)  # as an autoscaler replaces a lost node
    happened["replacement_joined"] = True
    training.join()
    results = outcome["results"]
    rows = [json.loads(line) for line in history.read_text().splitlines()]
    happened["epochs_in_history"] = [r["epoch"] for r in rows]
    happened["first_mi_share"] = rows[0]["mi_share"]
    happened["final_epoch"] = results["pretrain"]["metrics"]["epoch"]
    record = json.loads((storage / "pretrain" / "mimir_stage.json").read_text())
    state = json.loads((storage / record["checkpoint"] / "state.json").read_text())
    happened["checkpoint_num_workers"] = state["config"]["scaling"]["num_workers"]
    happened["checkpoint_every"] = CHECKPOINT_EVERY
    print(json.dumps(happened), flush=True)
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:4])
