"""``mimir submit``: run a mimir command on a Ray cluster as a Ray job and follow it to the end.

``mimir submit -- mimir run configs/quickstart.yaml pretrain.epochs=1`` does what
``ray job submit --runtime-env cluster/runtime_env.yaml -- mimir run ...`` does, and its exit code is
the job's outcome (0 when it succeeded). Submit from the repository root: the runtime_env's relative
working_dir is read from the current folder, as the ``ray`` CLI reads it.

Token authentication is Ray's own: with ``RAY_AUTH_MODE=token`` in the environment, the job client
sends the token Ray finds in ``RAY_AUTH_TOKEN``, the file named by ``RAY_AUTH_TOKEN_PATH``, or
``~/.ray/auth_token`` (``ray get-auth-token --generate`` makes one). Without it no token is sent.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from ray.job_submission import JobStatus, JobSubmissionClient

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
DEFAULT_RUNTIME_ENV = "cluster/runtime_env.yaml"
# Ray's job client uses these over any address it is given; the first one set wins
ADDRESS_VARIABLES = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
# a head that has just started answers this until its dashboard agent registers
AGENT_NOT_READY = "No available agent to submit job"
AGENT_WAIT_SECONDS = 120.0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``submit`` subcommand; its ``handler`` runs the submission."""
    p = subparsers.add_parser("submit", help="run a mimir command on a Ray cluster as a Ray job",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS", DEFAULT_ADDRESS),
                   help=f"job server of the cluster (default $RAY_ADDRESS or {DEFAULT_ADDRESS}, the port "
                        "that `ray dashboard cluster/aws-gpu.yaml` forwards)")
    p.add_argument("--runtime-env", default=DEFAULT_RUNTIME_ENV,
                   help="runtime_env YAML (default %(default)s)")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return at once")
    p.add_argument("entrypoint", nargs=argparse.REMAINDER, metavar="-- COMMAND ...",
                   help="the command the job runs, e.g. -- mimir run configs/quickstart.yaml")
    p.set_defaults(handler=submit)


def load_runtime_env(path: str | Path) -> dict[str, Any]:
    """A runtime_env YAML, with a local working_dir made absolute (relative to the current folder)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"runtime_env file not found: {path}")
    runtime_env = yaml.safe_load(path.read_text()) or {}
    working_dir = runtime_env.get("working_dir")
    if working_dir and "://" not in working_dir:
        resolved = Path(working_dir).expanduser().resolve()
        if not resolved.is_dir():
            raise FileNotFoundError(f"{path}: working_dir {resolved} is not a folder")
        runtime_env["working_dir"] = str(resolved)
    return runtime_env


async def _print_logs(client: JobSubmissionClient, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        print(lines, end="", flush=True)


def _follow(client: JobSubmissionClient, job_id: str) -> JobStatus:
    """Print the job's output as it comes; return its final status."""
    try:
        asyncio.run(_print_logs(client, job_id))
    except RuntimeError as err:  # the log stream broke; the server still knows how the job ends
        print(f"mimir submit: lost the log stream ({err}); waiting for the job to end", file=sys.stderr)
    status = client.get_job_status(job_id)
    while not status.is_terminal():
        time.sleep(1.0)
        status = client.get_job_status(job_id)
    return status


def submit_job(client: JobSubmissionClient, entrypoint: str, runtime_env: dict[str, Any],
               wait_seconds: float = AGENT_WAIT_SECONDS) -> str:
    """Submit, retrying while a freshly started head has no job agent yet; returns the job id."""
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
        except RuntimeError as err:
            if AGENT_NOT_READY not in str(err) or time.monotonic() > deadline:
                raise
            print("mimir submit: the head's job agent is not up yet; retrying", file=sys.stderr, flush=True)
            time.sleep(2.0)


def submit(args: argparse.Namespace) -> int:
    """Submit ``args.entrypoint`` as a Ray job; 0 when it succeeded (or was only submitted), else 1."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobStatus, JobSubmissionClient

    command = args.entrypoint[1:] if args.entrypoint[:1] == ["--"] else args.entrypoint
    if not command:
        print("mimir submit: error: give the command after --, e.g. -- mimir run configs/quickstart.yaml",
              file=sys.stderr)
        return 1
    env_name = next((name for name in ADDRESS_VARIABLES if os.environ.get(name)), None)
    if env_name and os.environ[env_name] != args.address:
        print(f"mimir submit: error: --address {args.address} differs from {env_name}={os.environ[env_name]}, "
              "which Ray's job client would use instead; unset it or pass the same address", file=sys.stderr)
        return 1
    runtime_env = load_runtime_env(args.runtime_env)
    try:
        client = JobSubmissionClient(args.address)
        job_id = submit_job(client, shlex.join(command), runtime_env)
    except (ConnectionError, RuntimeError, AuthenticationError) as err:  # unreachable, refused, no ray[default]
        print(f"mimir submit: error: {err}", file=sys.stderr)
        return 1
    print(f"submitted Ray job {job_id} to {args.address}", flush=True)
    if args.no_wait:
        print(f"follow it with: ray job logs --follow --address {args.address} {job_id}")
        return 0
    try:
        status = _follow(client, job_id)
    except KeyboardInterrupt:
        print(f"\nstopped following; the job goes on (ray job stop --address {args.address} {job_id})",
              file=sys.stderr)
        return 1
    print(f"Ray job {job_id}: {status.value}")
    return 0 if status == JobStatus.SUCCEEDED else 1
