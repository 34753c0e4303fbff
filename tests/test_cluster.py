"""cluster/: the launcher, KubeRay and runtime_env files, and `ray job submit` end to end on a real head.

The end-to-end tests start their own single-node Ray cluster through the `ray` CLI (subprocesses,
token authentication on, everything on 127.0.0.1) and never touch the in-process Ray of other tests.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from mimir.cli import build_parser
from mimir.config import load_config
from mimir.submit import DEFAULT_ADDRESS, add_parser, load_runtime_env, submit, submit_job

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
BIN = Path(sys.executable).parent  # the `ray` and `mimir` of this Python, nothing installed by hand
SECRET_PATTERNS = [
    re.compile(r"\b[0-9a-fA-F]{32,}\b"),  # Ray tokens are 64 hex digits
    re.compile(r"RAY_AUTH_TOKEN\s*[=:]\s*\S"),  # an inline token value
    re.compile(r"RAY_AUTH_MODE\s*[=:]\s*['\"]?disabled"),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"aws_secret_access_key|AKIA[0-9A-Z]{16}", re.IGNORECASE),
]


def _load(name: str) -> dict[str, Any]:
    return yaml.safe_load((CLUSTER / name).read_text())


def _mimir_argv(entrypoint: str) -> list[str]:
    """The arguments after `mimir` in a shell entrypoint such as `cd /app && FOO=1 mimir run ...`."""
    words = shlex.split(entrypoint)
    while words and words[0] != "mimir":
        if words[0] == "cd":
            words = words[2:]
        elif words[0] in ("&&", ";", "env") or re.fullmatch(r"[A-Za-z_]\w*=.*", words[0]):
            words = words[1:]
        else:
            break
    assert words[:1] == ["mimir"], f"entrypoint does not run mimir: {entrypoint}"
    return words[1:]


def _check_entrypoint(entrypoint: str) -> None:
    """The real parser accepts it, its files exist here, and a run config with its overrides validates."""
    argv = _mimir_argv(entrypoint)
    args = build_parser().parse_args(argv)
    for word in argv:
        if word.endswith((".yaml", ".yml")):
            assert (REPO / word).is_file(), f"{word} named in {entrypoint!r} does not exist"
    if hasattr(args, "config"):
        assert args.config.startswith("configs/")
        load_config(REPO / args.config, args.overrides)


# -- the files in cluster/ ----------------------------------------------------------------------
def test_every_cluster_yaml_parses():
    names = {path.name for path in CLUSTER.glob("*.yaml")}
    assert {"aws-gpu.yaml", "kuberay-rayjob.yaml", "runtime_env.yaml"} <= names
    for name in names:
        assert isinstance(_load(name), dict), name


def test_launcher_config_has_a_head_and_an_autoscaling_gpu_worker_type():
    import jsonschema
    import ray.autoscaler

    cfg = _load("aws-gpu.yaml")
    jsonschema.validate(cfg, json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text()))
    types = cfg["available_node_types"]
    assert cfg["cluster_name"] and cfg["provider"]["type"] == "aws" and cfg["head_node_type"] in types
    gpu_types = [t for name, t in types.items() if name != cfg["head_node_type"] and t["resources"].get("GPU", 0) >= 1]
    assert gpu_types and all(t["max_workers"] > t.get("min_workers", 0) for t in gpu_types)
    assert cfg["file_mounts"]["~/mimir"] == "." and any("pip install" in c and "~/mimir" in c
                                                        for c in cfg["setup_commands"])
    starts = [c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token" in c for c in starts)
    # the job server stays on the head's loopback (SSH port forwarding); no rule opens a port to the world
    assert "--dashboard-host=127.0.0.1" in " ".join(cfg["head_start_ray_commands"])
    assert "security_group" not in cfg["provider"] and "0.0.0.0/0" not in yaml.safe_dump(cfg)


def test_rayjob_runs_a_mimir_command_on_a_head_and_gpu_workers_with_the_token_from_a_secret():
    job = _load("kuberay-rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    _check_entrypoint(job["spec"]["entrypoint"])
    cluster = job["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"]
    workers = [c for group in cluster["workerGroupSpecs"] for c in group["template"]["spec"]["containers"]]
    assert head and any(c["resources"]["limits"].get("nvidia.com/gpu") for c in workers)
    for container in [*head, *workers, *job["spec"]["submitterPodTemplate"]["spec"]["containers"]]:
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert "value" not in env["RAY_AUTH_TOKEN"] and env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"]


def _quantity(value: str) -> float:
    """A Kubernetes CPU quantity: "8" or "500m"."""
    return float(value[:-1]) / 1000 if str(value).endswith("m") else float(value)


def _worker_types() -> dict[str, list[dict[str, float]]]:
    """Per cluster file, what one GPU worker node offers: {"CPU": .., "GPU": ..}."""
    aws = _load("aws-gpu.yaml")
    job = _load("kuberay-rayjob.yaml")
    kuberay = []
    for group in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        requests = group["template"]["spec"]["containers"][0]["resources"]["requests"]
        kuberay.append({"CPU": _quantity(requests["cpu"]), "GPU": float(requests.get("nvidia.com/gpu", 0))})
    return {"aws-gpu.yaml": [t["resources"] for name, t in aws["available_node_types"].items()
                             if name != aws["head_node_type"]],
            "kuberay-rayjob.yaml": kuberay}


def _asks() -> dict[str, dict[str, float]]:
    """What each GPU preset and sweep spec asks per worker."""
    from mimir.spec import load_spec

    asks = {}
    for path in sorted((REPO / "configs").glob("*.yaml")):
        s = load_config(path).scaling
        if s.use_gpu:
            asks[path.name] = {"CPU": s.cpus_per_worker, "GPU": s.gpus_per_worker}
    for path in sorted((REPO / "tune").glob("*.yaml")):
        r = load_spec(path)[0].resources
        if r.gpus_per_worker > 0:
            asks[path.name] = {"CPU": r.cpus_per_worker, "GPU": r.gpus_per_worker}
    return asks


def test_every_gpu_preset_and_spec_fits_a_worker_type_of_each_cluster_file():
    asks, offers = _asks(), _worker_types()
    assert len(asks) >= 12
    for file, types in offers.items():
        for name, ask in asks.items():
            assert any(all(t.get(k, 0) >= v for k, v in ask.items()) for t in types), (
                f"{name} asks {ask} per worker; no worker type of {file} offers it ({types})")
            # and leaves CPUs on the node for Ray Data's decoding and cropping
            assert any(t.get("CPU", 0) - ask["CPU"] >= 4 for t in types), f"{name} leaves {file} no data CPUs"


def test_kuberay_autoscaler_has_the_token_and_the_job_resumes_when_retried():
    job = _load("kuberay-rayjob.yaml")
    env = {e["name"]: e for e in job["spec"]["rayClusterSpec"]["autoscalerOptions"]["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "mimir-ray-token"
    assert "--resume" in job["spec"]["entrypoint"].split()


def test_runtime_env_uploads_the_code_but_not_results_data_or_caches():
    from ray._private.runtime_env.packaging import _get_excludes  # Ray's own matcher for `excludes`

    env = _load("runtime_env.yaml")
    assert env["working_dir"] == "."
    excluded = _get_excludes(REPO, env["excludes"])
    for path in ("results/quickstart/results.json", "data/cifar10/manifest.json", ".git/HEAD",
                 ".venv/bin/python", "mimir/__pycache__/cli.cpython-311.pyc", "mimir.egg-info/PKG-INFO"):
        assert excluded(REPO / path), path
    for path in ("mimir/data/pipeline.py", "mimir/cli.py", "configs/quickstart.yaml", "cluster/runtime_env.yaml"):
        assert not excluded(REPO / path), path


def test_load_runtime_env_resolves_working_dir_from_the_current_folder(monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    assert load_runtime_env("cluster/runtime_env.yaml")["working_dir"] == str(REPO)
    with pytest.raises(FileNotFoundError):
        load_runtime_env(tmp_path / "missing.yaml")


def test_no_file_in_cluster_holds_a_secret():
    for path in sorted(CLUSTER.rglob("*")):
        if path.is_file():
            text = path.read_text()
            for pattern in SECRET_PATTERNS:
                assert not pattern.search(text), f"{path.name}: {pattern.pattern}"


def test_submit_parser_takes_the_command_after_the_double_dash():
    parser = argparse.ArgumentParser(prog="mimir")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["submit", "--no-wait", "--", "mimir", "run", "configs/quickstart.yaml",
                              "pretrain.epochs=1", "--resume"])
    assert args.handler is submit and args.no_wait and args.runtime_env == "cluster/runtime_env.yaml"
    assert args.entrypoint == ["--", "mimir", "run", "configs/quickstart.yaml", "pretrain.epochs=1", "--resume"]
    assert args.address == os.environ.get("RAY_ADDRESS", DEFAULT_ADDRESS)


class _AgentStartingClient:
    """A job client whose head refuses the first submissions as a just-started Ray head does."""

    def __init__(self, refusals: int, error: str = "Request failed with status code 500: "
                                                    "No available agent to submit job, please try again later.."):
        self.refusals, self.error, self.calls = refusals, error, 0

    def submit_job(self, entrypoint: str, runtime_env: dict[str, Any]) -> str:
        self.calls += 1
        if self.calls <= self.refusals:
            raise RuntimeError(self.error)
        return "raysubmit_1"


def test_submit_waits_for_the_job_agent_of_a_fresh_head(monkeypatch):
    monkeypatch.setattr(time, "sleep", lambda seconds: None)
    client = _AgentStartingClient(refusals=2)
    assert submit_job(client, "mimir --help", {}) == "raysubmit_1" and client.calls == 3
    with pytest.raises(RuntimeError, match="No available agent"):
        submit_job(_AgentStartingClient(refusals=10**6), "mimir --help", {}, wait_seconds=0)
    other = _AgentStartingClient(refusals=1, error="Request failed with status code 400: bad runtime_env")
    with pytest.raises(RuntimeError, match="bad runtime_env"):  # only the agent's start-up is waited out
        submit_job(other, "mimir --help", {})
    assert other.calls == 1


# -- end to end on a real head node -------------------------------------------------------------
@dataclass
class Head:
    address: str  # the job server
    env: dict[str, str]  # for clients: token auth on, no RAY_ADDRESS of another cluster
    token: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, start time) of every process, from /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                table[int(entry)] = (int(fields[1]), fields[19])
    return table


def _descendants(pid: int) -> dict[int, str]:
    """pid -> start time of every process below ``pid`` (the start time guards against reused ids)."""
    table, found, todo = _processes(), {}, [pid]
    while todo:
        parent = todo.pop()
        for child, (ppid, start) in table.items():
            if ppid == parent and child not in found:
                found[child] = start
                todo.append(child)
    return found


def _stop_head(head: subprocess.Popen) -> None:
    """SIGTERM makes `ray start --block` shut its Ray processes down; whatever outlives a few seconds of
    that (its graceful shutdown takes ~30 s) is killed by id: the cluster's folder goes with the test."""
    family = _descendants(head.pid)
    head.terminate()
    try:
        head.wait(timeout=5)
    except subprocess.TimeoutExpired:
        head.kill()
        head.wait()
    alive = _processes()
    for pid, start in family.items():
        if pid in alive and alive[pid][1] == start:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _get(url: str, token: str | None) -> int:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def _wait_for_job_server(url: str, env: dict[str, str], head: subprocess.Popen, log: Path,
                         timeout: float = 120) -> None:
    """Until the job server answers and its agent has run a first job (``ray job submit`` is refused
    with "No available agent" before that; ``mimir submit`` waits it out)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert head.poll() is None, f"ray start exited with {head.returncode}:\n{log.read_text()[-3000:]}"
        with contextlib.suppress(OSError):
            if _get(f"{url}/api/version", env["RAY_AUTH_TOKEN"]) == 200:
                break
        time.sleep(1)
    else:
        pytest.fail(f"the job server at {url} did not come up in {timeout:.0f} s:\n{log.read_text()[-3000:]}")
    ready = _run([str(BIN / "mimir"), "submit", "--address", url, "--", "true"], env,
                 timeout=max(deadline - time.monotonic(), 60))
    assert ready.returncode == 0, f"a first job failed:\n{ready.stdout[-3000:]}{ready.stderr[-3000:]}"


@pytest.fixture(scope="module")
def ray_head() -> Iterator[Head]:
    """A single-node Ray cluster of this Python with token authentication, on 127.0.0.1 only."""
    # Ray's own test for whether the dashboard, and with it the job server, can start
    pytest.importorskip("ray.dashboard.optional_deps", reason="the Ray job server needs ray[default]")
    temp = Path(tempfile.mkdtemp(prefix="mimir-ray-"))  # short: Ray's socket paths must stay < 108 characters
    token = secrets.token_hex(32)  # this cluster's own token, only ever in the processes' environment
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # nothing of another cluster
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token,
               RAY_USAGE_STATS_ENABLED="0", RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.2",  # as mimir's local Ray
               # single-node mode: Ray keeps 127.0.0.1 as the node address instead of the machine's
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    port, dashboard_port = _free_port(), _free_port()
    # every port Ray would otherwise take at a fixed default (the agent's 52365, the client server's
    # 10001, ...) is a free one, so the head comes up beside the in-process Ray of the other tests
    own_ports = [f"--{name}-port={_free_port()}" for name in (
        "dashboard-agent-listen", "dashboard-agent-grpc", "metrics-export", "runtime-env-agent", "ray-client-server")]
    log = temp / "head.log"
    with log.open("w") as out:
        head = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", *own_ports, "--num-cpus=2",
             "--temp-dir", str(temp), "--disable-usage-stats"],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        address = f"http://127.0.0.1:{dashboard_port}"
        _wait_for_job_server(address, env, head, log)
        yield Head(address, env, token)
    finally:
        _stop_head(head)
        shutil.rmtree(temp, ignore_errors=True)


def _run(argv: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_job_server_refuses_requests_without_the_token(ray_head):
    assert _get(f"{ray_head.address}/api/jobs/", None) == 401
    assert _get(f"{ray_head.address}/api/jobs/", "0" * 64) == 403
    assert _get(f"{ray_head.address}/api/jobs/", ray_head.token) == 200


def test_ray_job_submit_runs_mimir_on_the_cluster(ray_head, tmp_path):
    out = tmp_path / "out"  # absolute: the job runs in a copy of the working dir
    result = _run([str(BIN / "ray"), "job", "submit", "--address", ray_head.address, "--working-dir", str(REPO),
                   "--runtime-env", str(CLUSTER / "runtime_env.yaml"), "--",
                   "mimir", "pretrain", "configs/quickstart.yaml", "pretrain.epochs=1", "pretrain.warmup_epochs=0",
                   f"data.root={tmp_path / 'data'}", f"output_dir={out}"],
                  ray_head.env, timeout=360)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "succeeded" in output, output[-6000:]
    # a Ray Train stage ran on the cluster and wrote its record, metrics and checkpoint where asked
    # (the whole pipeline on a Ray is the determinism test's; here the job path is what is tested)
    results = json.loads((out / "results.json").read_text())
    assert results["pretrain"]["metrics"]["epoch"] == 0 and "[pretrain] epoch 1/1" in output
    assert (out / "pretrain" / "mimir_stage.json").is_file() and (out / "pretrain" / "metrics.csv").is_file()


SUBMIT = ("import argparse, sys\n"
          "from mimir.submit import add_parser\n"
          "parser = argparse.ArgumentParser(prog='mimir')\n"
          "add_parser(parser.add_subparsers(dest='command', required=True))\n"
          "args = parser.parse_args(sys.argv[1:])\n"
          "sys.exit(args.handler(args))\n")


def test_mimir_submit_follows_the_job_and_returns_its_outcome(ray_head):
    def mimir_submit(*command: str, env: dict[str, str] = ray_head.env) -> subprocess.CompletedProcess:
        return _run([sys.executable, "-c", SUBMIT, "submit", "--address", ray_head.address, "--", *command],
                    env, timeout=120)

    done = mimir_submit("mimir", "--help")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "submitted Ray job" in done.stdout and "usage: mimir" in done.stdout and "SUCCEEDED" in done.stdout
    failed = mimir_submit("mimir", "run", "configs/no-such-config.yaml")
    assert failed.returncode == 1 and "config file not found" in failed.stdout and "FAILED" in failed.stdout
    refused = mimir_submit("mimir", "--help", env={**ray_head.env, "RAY_AUTH_TOKEN": "0" * 64})
    assert refused.returncode == 1 and "Authentication failed" in refused.stderr, refused.stderr[-3000:]
