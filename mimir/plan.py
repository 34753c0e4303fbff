"""``mimir sweep SPEC --plan``: what a sweep will run and what it will cost, before anything runs.

The trials are the spec's grid points. Trials whose pre-training configs hash alike share one
pre-training (the sweep's cache), and evaluation-only rows train nothing, so the plan counts the
pre-trainings, fine-tunings and evaluations that will really run. Each trial's resources are checked
against a cluster: a Ray cluster launcher YAML or a KubeRay RayCluster / RayJob given with
``--cluster FILE``, or, with RAY_ADDRESS set, the cluster it names (a plan never starts Ray). The
device-hours and wall time come from ``mimir.costs``, each trial priced on the device it runs on: a
``mimir bench --out`` report of that trial's model on that device (``--costs``), else for GPU trials
the paper's Table 10 (RTX A6000s); CPU trials without a report are not priced (Table 10 says
nothing of CPUs). Wall times add each stage's fixed start-up (``mimir.costs.stage_overhead``).
"""

from __future__ import annotations

import math
import os
import sys
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mimir.config import RunConfig, find_file
from mimir.costs import (PAPER, Device, StageCosts, bench_device, differences, run_costs, stage_overhead,
                         surface_seconds)
from mimir.errors import ConfigError
from mimir.spec import (GROUP, LABEL_SEPARATOR, ROW, SweepSpec, experiment_dir, find_sources, load_command_spec,
                        trial_config, trial_label)

Bundle = dict[str, float]  # Ray resources: CPU, GPU, custom
TRAINING_KEYS = ("seed", "data.", "model.", "pretrain.")  # a sampled key among these changes the pre-training


@dataclass
class TrialPlan:
    label: str
    config: RunConfig
    pretrain_hash: str | None  # None: no pre-training (disabled, or an evaluation-only row)
    trains_pretrain: bool  # the first trial of its hash: it pre-trains, the others reuse it
    finetunes: bool
    costs: StageCosts  # device-seconds of computation (zeros when not priced)
    overhead: StageCosts  # wall seconds of each stage's start-up and data waits
    device: Device | None  # what it is priced on; None: not priced (a CPU trial without a bench report)
    worker: Bundle  # one training worker's bundle
    workers: int
    evaluates: str | None = None  # the source an evaluation-only row evaluates, and whether it is there

    def wall(self, stage: str) -> float:
        """Wall seconds of one stage of this trial on its own devices."""
        return getattr(self.costs, stage) / self.devices(stage) + getattr(self.overhead, stage)

    def devices(self, stage: str) -> float:
        """Devices a stage runs on: the workers' GPUs (or, on CPUs, the workers), one task's in evaluation."""
        per_worker = self.worker.get("GPU", 0.0) or 1.0
        return per_worker if stage == "evaluate" else per_worker * self.workers


@dataclass
class ClusterCheck:
    source: str
    nodes: list[tuple[str, Bundle, int]]  # node type, resources per node, most nodes of it
    notes: list[str] = field(default_factory=list)


@dataclass
class Plan:
    spec: SweepSpec
    spec_path: str
    trials: list[TrialPlan]
    quoted: int
    cluster: ClusterCheck | None
    fits: dict[str, int]  # trial label -> copies the cluster runs at once (0: never)
    wall_seconds: float
    notes: list[str]

    @property
    def pretrainings(self) -> int:
        return sum(t.trains_pretrain for t in self.trials) * self.spec.seeds

    @property
    def finetunings(self) -> int:
        return sum(t.finetunes for t in self.trials) * self.spec.seeds

    @property
    def evaluations(self) -> int:
        return len(self.trials) * self.spec.seeds

    @property
    def device_hours(self) -> float:
        """Device-hours of the priced trials."""
        seconds = sum((t.costs.pretrain if t.trains_pretrain else 0.0) + t.costs.finetune + t.costs.evaluate
                      for t in self.trials)
        return seconds * self.spec.seeds / 3600

    @property
    def devices(self) -> list[Device]:
        """The devices the trials are priced on, each once."""
        return list({id(t.device): t.device for t in self.trials if t.device is not None}.values())

    @property
    def unpriced(self) -> list[str]:
        return [t.label for t in self.trials if t.device is None]

    @property
    def infeasible(self) -> list[str]:
        return [label for label, n in self.fits.items() if n == 0]


# -- resources and clusters ----------------------------------------------------------------------
def worker_bundle(cfg: RunConfig) -> Bundle:
    """What Ray Train reserves per worker of this config."""
    s = cfg.scaling
    bundle = {"CPU": s.cpus_per_worker, **s.resources_per_worker}
    if s.use_gpu:
        bundle["GPU"] = s.gpus_per_worker
    return bundle


def _quantity(text: Any) -> float:
    """A Kubernetes quantity: ``8``, ``500m``, ``16Gi``."""
    text = str(text)
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    for unit, scale in sorted(units.items(), key=lambda u: -len(u[0])):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * scale
    return float(text)


def _kuberay_group(name: str, group: dict[str, Any], count: int) -> tuple[str, Bundle, int]:
    params = group.get("rayStartParams") or {}
    containers = group.get("template", {}).get("spec", {}).get("containers", [])
    limits = (containers[0].get("resources", {}).get("limits") or containers[0].get("resources", {}).get("requests")
              or {}) if containers else {}
    resources: Bundle = {}
    cpu, gpu = params.get("num-cpus", limits.get("cpu")), params.get("num-gpus", limits.get("nvidia.com/gpu"))
    if cpu is not None:
        resources["CPU"] = _quantity(cpu)
    if gpu is not None and _quantity(gpu) > 0:
        resources["GPU"] = _quantity(gpu)
    if "resources" in params:  # rayStartParams resources: '"{\"spot\": 1}"'
        resources.update(yaml.safe_load(str(params["resources"]).strip("'\"").replace('\\"', '"')))
    return name, resources, count


def cluster_from_file(path: str | Path) -> ClusterCheck:
    """Node types of a Ray cluster launcher YAML (``available_node_types``) or a KubeRay RayCluster /
    RayJob (``headGroupSpec``, ``workerGroupSpecs``), each with the most nodes the cluster may have."""
    try:
        docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if isinstance(d, dict)]
    except FileNotFoundError:
        raise ConfigError(f"--cluster {path}: no such file") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"--cluster {path}: not valid YAML: {err}") from None
    for doc in docs:
        if "available_node_types" in doc:
            return _launcher_cluster(str(path), doc)
        if doc.get("kind") in ("RayCluster", "RayJob", "RayService"):
            spec = doc.get("spec", {})
            spec = spec.get("rayClusterSpec", spec) if doc["kind"] == "RayJob" else spec
            spec = spec.get("rayClusterConfig", spec) if doc["kind"] == "RayService" else spec
            groups = [_kuberay_group("head", spec.get("headGroupSpec", {}), 1)]
            autoscaling = spec.get("enableInTreeAutoscaling", False)
            for g in spec.get("workerGroupSpecs", []):
                count = g.get("maxReplicas", g.get("replicas", 0)) if autoscaling else g.get("replicas", 0)
                groups.append(_kuberay_group(g.get("groupName", "workers"), g, int(count)))
            return ClusterCheck(f"{path} ({doc['kind']})", groups)
    raise ConfigError(f"--cluster {path}: neither a Ray cluster launcher config (available_node_types) nor a "
                      "KubeRay RayCluster / RayJob")


def _launcher_cluster(path: str, doc: dict[str, Any]) -> ClusterCheck:
    head = doc.get("head_node_type")
    most = doc.get("max_workers", 2)
    nodes, notes = [], []
    for name, node_type in doc["available_node_types"].items():
        resources = {k: float(v) for k, v in (node_type.get("resources") or {}).items()}
        if not resources:
            notes.append(f"node type {name} states no resources (Ray detects them from the instance type): "
                         "counted as none")
        # the head node's type adds worker nodes only when it says so; a worker type up to the cluster's cap
        count = 1 + node_type.get("max_workers", 0) if name == head else min(node_type.get("max_workers", most), most)
        nodes.append((name, resources, count))
    return ClusterCheck(f"{path} (Ray cluster launcher, at most {most} worker nodes)", nodes, notes)


def connected_cluster() -> ClusterCheck | None:
    """The nodes of the Ray cluster this process is connected to, or that RAY_ADDRESS names; None
    without either (a plan never starts Ray, nor imports it without a cluster to ask)."""
    if not os.environ.get("RAY_ADDRESS") and "ray" not in sys.modules:
        return None
    import ray

    if not ray.is_initialized() and not os.environ.get("RAY_ADDRESS"):
        return None
    connected_here = not ray.is_initialized()
    if connected_here:
        try:
            ray.init(address=os.environ["RAY_ADDRESS"], logging_level="ERROR", log_to_driver=False)
        except Exception as err:  # any failure to connect: the plan says so and goes on without a cluster
            raise ConfigError(f"cannot connect to RAY_ADDRESS={os.environ['RAY_ADDRESS']} to check the plan against "
                              f"it ({type(err).__name__}: {err}); pass --cluster FILE instead") from None
    try:
        nodes = [(n["NodeManagerAddress"], {k: float(v) for k, v in n["Resources"].items()
                                            if not k.startswith("node:") and k != "object_store_memory"}, 1)
                 for n in ray.nodes() if n["Alive"]]
    finally:
        if connected_here:
            ray.shutdown()  # this driver's connection only; the cluster runs on
    return ClusterCheck(f"the connected Ray cluster ({len(nodes)} nodes now; an autoscaler may add more)", nodes)


def _place(bundles: list[Bundle], free: list[Bundle]) -> bool:
    """First-fit of the bundles (largest first) onto the nodes' free resources, taking what fits."""
    for bundle in sorted(bundles, key=lambda b: (-b.get("GPU", 0), -b.get("CPU", 0))):
        node = next((n for n in free if all(n.get(k, 0.0) + 1e-9 >= v for k, v in bundle.items())), None)
        if node is None:
            return False
        for k, v in bundle.items():
            node[k] = node.get(k, 0.0) - v
    return True


def copies_that_fit(cluster: ClusterCheck, bundles: list[Bundle], most: int) -> int:
    """How many trials asking for these bundles the cluster runs at once (0: it never can), up to ``most``."""
    free = [dict(resources) for _, resources, count in cluster.nodes for _ in range(count)]
    copies = 0
    while copies < most and _place(bundles, free):
        copies += 1
    return copies


# -- the plan ------------------------------------------------------------------------------------
def pricing_device(cfg: RunConfig, benches: list[Device], label: str) -> Device | None:
    """The device a trial is priced on: the bench report measured for its model on its kind of device,
    else Table 10 for a GPU trial and nothing for a CPU one. A report of the trial's kind of device
    that was measured for another model, image size or precision is refused, with what differs."""
    kind = "cuda" if cfg.scaling.use_gpu else "cpu"
    of_kind = [b for b in benches if b.kind == kind]
    for bench in of_kind:
        if not differences(bench, cfg):
            return bench
    if of_kind:
        raise ConfigError(f"--costs: {of_kind[0].source} was measured for another run than trial {label!r}: "
                          f"{'; '.join(differences(of_kind[0], cfg))}. Measure that config "
                          "(`mimir bench --config CONFIG --out FILE`, the trial's model overrides after it) "
                          "and pass both reports")
    return PAPER if kind == "cuda" else None


def _trials(spec: SweepSpec, base: dict[str, Any], benches: list[Device],
            experiment: Path) -> tuple[list[TrialPlan], list[str]]:
    notes = []
    if spec.sampler == "tpe":
        sampled = [k for k in spec.space if k.startswith(TRAINING_KEYS)]
        notes.append(f"TPE: {spec.num_samples} sampled trials, each priced at the base config"
                     + (f"; sampling {sampled} gives each its own pre-training" if sampled else ""))
        points = [{} for _ in range(spec.num_samples)]
    else:
        points = spec.grid_points()
        sampled = []
    sources = find_sources(base, spec, experiment)
    seen: dict[str, str] = {}
    trials = []
    for index, point in enumerate(points):
        cfg = trial_config(base, spec, point)
        label = trial_label(spec, point, index)
        row = spec.rows[point[ROW]] if ROW in point else None
        evaluates = None
        if row is not None and row.evaluates is not None:
            source = sources[f"{point[ROW]}/{point.get(GROUP, '')}"]
            evaluates = (f"{row.evaluates.name}: {row.evaluates.row.replace(LABEL_SEPARATOR, ' · ')}"
                         + (" (finished)" if isinstance(source, dict) else " (not there yet: this trial would fail)"))
        trains = evaluates is None
        key = cfg.pretrain_hash() + (f"#{index}" if sampled else "") if trains and cfg.pretrain.enabled else None
        first = key is not None and key not in seen
        if first:
            seen[key] = label
        device = pricing_device(cfg, benches, label)
        costs = run_costs(cfg, device or PAPER, pretrain=first, finetune=trains)
        if spec.surface is not None and trains:  # each trained trial also computes its loss surface
            costs = dataclasses.replace(costs, evaluate=costs.evaluate + surface_seconds(cfg, spec.surface,
                                                                                         device or PAPER))
        if device is None:
            costs = StageCosts(0.0, 0.0, 0.0)
        overhead = stage_overhead(cfg, pretrain=first, finetune=trains)
        trials.append(TrialPlan(label, cfg, key, first, trains, costs, overhead, device, worker_bundle(cfg),
                                cfg.scaling.num_workers, evaluates))
    return trials, notes


def _base_name(spec_path: str | Path, spec: SweepSpec) -> str:
    """How a user names the spec's base config: its bundled name, else its path."""
    base = (find_file("tune", spec_path).parent / spec.base).resolve()
    try:
        return base.stem if find_file("configs", base.stem).resolve() == base else str(base)
    except ConfigError:  # no bundled config of that name
        return str(base)


def _wall_seconds(trials: list[TrialPlan], slots: int) -> float:
    """Trials start in order as slots free; a trial whose pre-training another is training waits for it."""
    free_at = [0.0] * max(slots, 1)
    pretrained_at: dict[str, float] = {}
    for trial in trials:
        slot = min(range(len(free_at)), key=free_at.__getitem__)
        t = free_at[slot]
        if trial.pretrain_hash is not None:
            if trial.trains_pretrain:
                t += trial.wall("pretrain")
                pretrained_at[trial.pretrain_hash] = t
            else:
                t = max(t, pretrained_at.get(trial.pretrain_hash, t))
        t += trial.wall("finetune") + trial.wall("evaluate")
        free_at[slot] = t
    return max(free_at)


def plan_sweep(spec_path: str | Path, overrides: list[str] = (), *, out: str | None = None, tiny: bool = False,
               max_concurrent: int | None = None, costs: str | Path | list[str | Path] | None = None,
               cluster: str | Path | None = None) -> Plan:
    """The plan of ``mimir sweep SPEC``: its trials, what they share, their resources checked against
    the cluster (``cluster``: a file; else the connected one, if any) and their cost (``costs``: a
    ``mimir bench --out`` report; else Table 10)."""
    spec, base = load_command_spec(spec_path, overrides, tiny=tiny, max_concurrent=max_concurrent)
    benches = [bench_device(path) for path in ([costs] if isinstance(costs, (str, Path)) else costs or [])]
    trials, notes = _trials(spec, base, benches, experiment_dir(spec, out))
    unused = [b for b in benches if all(t.device is not b for t in trials)]
    if unused and trials:
        why = "; ".join(differences(unused[0], trials[0].config))
        raise ConfigError(f"--costs: {unused[0].source} prices none of this sweep's trials (against trial "
                          f"{trials[0].label!r}: {why})")
    check = cluster_from_file(cluster) if cluster else connected_cluster()
    fits = {}
    for t in trials:
        bundles = [dict(t.worker) for _ in range(t.workers)]
        fits[t.label] = copies_that_fit(check, bundles, spec.max_concurrent) if check else spec.max_concurrent
    slots = min(fits.values(), default=1) or 1
    if any(t.device is None for t in trials):
        notes.append("trials on CPUs are not priced: Table 10 has no CPU figures. Measure this machine on the "
                     f"spec's config (`mimir bench --config {_base_name(spec_path, spec)} --device cpu --out "
                     "bench-cpu.json`, about a minute) and pass --costs bench-cpu.json")
    quoted = sum(r.quoted is not None for r in spec.rows)
    return Plan(spec, str(spec_path), trials, quoted, check, fits, _wall_seconds(trials, slots) * spec.seeds,
                notes + (check.notes if check else []))


# -- printing ------------------------------------------------------------------------------------
def duration(seconds: float) -> str:
    """``3 d 4 h``, ``5 h 12 min``, ``12 min``, ``40 s``."""
    if seconds >= 86400 - 1800:
        hours = round(seconds / 3600)
        return f"{hours // 24} d {hours % 24} h"
    if seconds >= 3600 - 30:
        minutes = round(seconds / 60)
        return f"{minutes // 60} h {minutes % 60} min"
    return f"{round(seconds / 60)} min" if seconds >= 60 else f"{math.ceil(seconds)} s"


def _bundle(resources: Bundle) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in resources.items()) + "}"


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f}" if seconds >= 360 else f"{seconds / 3600:.2f}"


def format_plan(plan: Plan) -> str:
    spec = plan.spec
    lines = [f"Plan of {spec.title or spec.name} ({plan.spec_path})", "",
             f"trials: {len(plan.trials)}" + (f" × {spec.seeds} seeds" if spec.seeds > 1 else "")
             + (f", plus {plan.quoted} rows quoted from other papers (shown, not run)" if plan.quoted else ""),
             f"runs: {plan.pretrainings} pre-trainings, {plan.finetunings} fine-tunings, {plan.evaluations} "
             "evaluations"]
    shared: dict[str, list[str]] = {}
    for t in plan.trials:
        if t.pretrain_hash is not None:
            shared.setdefault(t.pretrain_hash, []).append(t.label)
    lines += [f"  one pre-training ({key.split('#')[0]}) for: {'; '.join(labels)}"
              for key, labels in shared.items() if len(labels) > 1]
    tags = {id(d): f"[{n}]" for n, d in enumerate(plan.devices, 1)}
    lines += ["", "costs in hours of the device each trial runs on (device-h); wall = on the trial's own devices, "
                  "with each stage's start-up:"]
    lines += [f"  {tags[id(d)]} {d.name}: {d.source}" for d in plan.devices]
    lines += ["", "| trial | workers × resources | pre-train ep | fine-tune ep | pre-train device-h "
                  "| fine-tune device-h | evaluate device-h | trial wall | priced on |", "|---|---|---|---|---|---|---|---|---|"]
    for t in plan.trials:
        priced = t.device is not None
        pre = (_hours(t.costs.pretrain) if t.trains_pretrain and priced else "shared" if t.pretrain_hash and
               not t.trains_pretrain else "—")
        stages = ("pretrain",) * t.trains_pretrain + ("finetune", "evaluate")
        cfg = t.config
        lines.append(f"| {t.label}{' ← ' + t.evaluates if t.evaluates else ''} | {t.workers} × {_bundle(t.worker)} "
                     f"| {cfg.pretrain.epochs if t.trains_pretrain else '—'} "
                     f"| {cfg.finetune.epochs if t.finetunes else '—'} | {pre} "
                     f"| {_hours(t.costs.finetune) if t.finetunes and priced else '—'} "
                     f"| {_hours(t.costs.evaluate) if priced else '—'} "
                     f"| {duration(sum(t.wall(s) for s in stages)) if priced else '—'} "
                     f"| {tags[id(t.device)] if priced else 'not priced'} |")
    wall = (f"wall not known ({len(plan.unpriced)} of {len(plan.trials)} trials not priced)" if plan.unpriced else
            f"wall ≈ {duration(plan.wall_seconds)}")
    lines += ["", f"total: {plan.device_hours:,.1f} device-h; {wall} with max_concurrent {spec.max_concurrent}"
                  + (f" (the cluster runs {min(plan.fits.values())} at once)" if plan.cluster and plan.trials else "")]
    if plan.cluster is None:
        lines.append("cluster: not checked (pass --cluster FILE, or set RAY_ADDRESS to check the connected one)")
    else:
        nodes = ", ".join(f"{count} × {name} {_bundle(r)}" for name, r, count in plan.cluster.nodes)
        lines.append(f"cluster: {plan.cluster.source}: {nodes}")
        lines.append("  every trial can be scheduled" if not plan.infeasible else
                     f"  CANNOT EVER BE SCHEDULED: {', '.join(plan.infeasible)}")
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def infeasible_message(plan: Plan) -> str:
    """Why the infeasible trials never run: what they ask for against the biggest node."""
    asks = {(t.workers, _bundle(t.worker)) for t in plan.trials if t.label in plan.infeasible}
    biggest = max(plan.cluster.nodes, key=lambda n: (n[1].get("GPU", 0), n[1].get("CPU", 0)))
    wanted = "; ".join(f"{n} workers × {b}" for n, b in sorted(asks))
    return (f"{len(plan.infeasible)} of {len(plan.trials)} trials ask for more than {plan.cluster.source} can ever "
            f"give ({wanted}; its biggest node type {biggest[0]} has {_bundle(biggest[1])}, at most {biggest[2]} "
            "of them): lower the spec's resources (num_workers, gpus_per_worker, cpus_per_worker) or add nodes")


def show_plan(spec_path: str | Path, overrides: list[str] = (), **options: Any) -> int:
    """``mimir sweep SPEC --plan`` (and ``mimir reproduce TABLE --plan``): print the plan; 2 when a trial
    can never be scheduled (with why, on stderr), else 0. ``options`` are :func:`plan_sweep`'s."""
    import sys

    plan = plan_sweep(spec_path, overrides, **options)
    print(format_plan(plan))
    if plan.infeasible:
        print(f"mimir: error: {infeasible_message(plan)}", file=sys.stderr)
        return 2
    return 0
