"""The sweep's pre-training cache: trials whose pre-training configs hash alike share one
pre-training under ``<cache>/<pretrain hash>``; a lease says which trial is training it, so the
others wait for it instead of training it twice."""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Iterator

import ray


class PretrainLeases:
    """Who is pre-training which cached pre-training, for every trial of a sweep on any node (the
    cache may be a URI, where no file lock exists). A lease lapses when its holder stops renewing it
    (a trial process or node that died), so a crash never blocks the other trials for good."""

    def __init__(self, lease_seconds: float):
        self.lease_seconds = lease_seconds
        self.leases: dict[str, tuple[str, float]] = {}

    def lease(self) -> float:
        return self.lease_seconds

    def try_acquire(self, key: str, holder: str) -> bool:
        now = time.monotonic()
        current = self.leases.get(key)
        if current is None or current[0] == holder or now - current[1] > self.lease_seconds:
            self.leases[key] = (holder, now)
            return True
        return False

    def renew(self, key: str, holder: str) -> None:
        if self.leases.get(key, ("",))[0] == holder:
            self.leases[key] = (holder, time.monotonic())

    def release(self, key: str, holder: str) -> None:
        if self.leases.get(key, ("",))[0] == holder:
            del self.leases[key]


LEASE_SECONDS = 60.0
LEASE_POLL_SECONDS = 2.0


_leases: dict[str, ray.actor.ActorHandle] = {}  # held for the process's life: Ray ends an actor with its owner's last handle
_leases_lock = threading.Lock()


def pretrain_leases(cache: str, lease_seconds: float = LEASE_SECONDS) -> ray.actor.ActorHandle:
    """The leases actor of one pre-training cache (created by the first caller: the sweep driver
    creates it before any trial, so it lives as long as the sweep)."""
    with _leases_lock:
        if cache not in _leases:
            _leases[cache] = ray.remote(num_cpus=0)(PretrainLeases).options(
                name=f"mimir-pretrain-leases:{cache}", get_if_exists=True).remote(lease_seconds)
        return _leases[cache]


def release_pretrain_leases(leases: ray.actor.ActorHandle) -> None:
    """End a sweep's leases actor (its trials are done)."""
    for cache, handle in list(_leases.items()):
        if handle == leases:
            del _leases[cache]
    ray.kill(leases)


@contextlib.contextmanager
def cache_lease(cache: str | None, key: str) -> Iterator[None]:
    """Hold the lease on one cached pre-training while checking and filling it (nothing to hold
    without a cache); renewed from a thread every third of the lease."""
    if cache is None:
        yield
        return
    leases = pretrain_leases(cache)
    holder = uuid.uuid4().hex
    lease_seconds = ray.get(leases.lease.remote())
    while not ray.get(leases.try_acquire.remote(key, holder)):
        time.sleep(LEASE_POLL_SECONDS)
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(lease_seconds / 3):
            ray.get(leases.renew.remote(key, holder))

    renewer = threading.Thread(target=renew, daemon=True, name=f"lease {key}")
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join()
        ray.get(leases.release.remote(key, holder))
