"""Typed run configuration: one YAML file (+ ``key=value`` overrides) -> a validated ``RunConfig``.

Every field is checked before Ray starts, so a typo or an impossible value fails at once with a
message that names the field (``pretrain.mask_ratio``, ``model.patch_size`` ...).
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from mimir.architectures import ARCHITECTURES
from mimir.errors import ConfigError


STAGES = ("pretrain", "finetune", "evaluate")  # a run's stages, in order
STAGE_RECORD = "mimir_stage.json"  # what a finished stage leaves in its run folder
FAILED = "failed.json"  # where a run's results.json would be: why it has none
TRIALS = "trials"  # <experiment>/trials/<trial id>/: each sweep trial's record
PRETRAIN_CACHE = "pretrain_cache"  # <sweep storage>/pretrain_cache/<pretrain hash>/: pre-trainings shared by trials


def _parse_fraction(value: Any) -> Any:
    """Accept budgets the way papers write them: ``8/255`` as well as ``0.0313``."""
    if isinstance(value, str) and "/" in value:
        numerator, _, denominator = value.partition("/")
        try:
            return float(numerator) / float(denominator)
        except (ValueError, ZeroDivisionError) as err:
            raise ValueError(f"cannot read {value!r} as a number or fraction") from err
    return value


Budget = Annotated[float, BeforeValidator(_parse_fraction), Field(ge=0.0)]


class Strict(BaseModel):
    """A config section: unknown fields are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Strict):
    dataset: str = "digits"  # a name under `root`, or a path to a prepared dataset folder
    root: str | None = None  # folder of prepared datasets; default $MIMIR_DATA_DIR or ~/.cache/mimir/datasets
    img_size: int = Field(16, gt=0)
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    crop_scale: tuple[float, float] = (0.2, 1.0)  # RandomResizedCrop area range (pre-training, Table 12)
    # fine-tuning's crop: "padded" (RandomCrop of the image zero-padded by crop_padding pixels, the
    # authors' CIFAR-10 / Tiny-ImageNet scripts) or "resized" (RandomResizedCrop at crop_scale, Table 13
    # and the authors' ImageNet-1K code). The paper says both; its authors' code decides (fidelity table)
    finetune_crop: Literal["padded", "resized"] = "padded"
    crop_padding: int = Field(4, ge=0)
    hflip: bool = True
    # test and validation images: resized (bicubic) so the shorter side is img_size / eval_crop_pct,
    # then centre-cropped to img_size (the authors' util/loader.py, 224 / 256 for every dataset);
    # 1.0: resized to img_size only where the stored size differs
    eval_crop_pct: float = Field(0.875, gt=0.0, le=1.0)
    augment: Literal["weak", "mix", "randaug"] = "weak"  # fine-tuning: weak, +MixUp/CutMix, +RandAugment
    mixup_alpha: float = Field(0.8, ge=0.0)
    cutmix_alpha: float = Field(1.0, ge=0.0)
    generated: str | None = None  # prepared EDM-style generated data mixed into fine-tuning batches
    generated_fraction: float = Field(0.7, ge=0.0, lt=1.0)
    # keep the training split's raw rows in Ray's object store, so later epochs skip listing and
    # reading the files; None: when the split takes at most a quarter of the object store
    cache_in_memory: bool | None = None
    # rows in each worker's local shuffle buffer (0: none). Rows arrive in blocks of a few files'
    # worth; the buffer mixes them across blocks. Costs shuffle_buffer decoded images of memory
    shuffle_buffer: int = Field(4096, ge=0)

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {self.crop_scale}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}")
        return self


class ModelConfig(Strict):
    arch: str = "vit_tiny"
    # encoder initialization before pre-training: "mae" (xavier-uniform linears and patch embedding,
    # N(0, 0.02) class token, as MAE and the authors' code) or "timm" (timm's own scheme)
    init: Literal["mae", "timm"] = "mae"
    patch_size: int = Field(2, gt=0)
    decoder_dim: int = Field(128, gt=0)
    decoder_depth: int = Field(2, ge=1)
    decoder_heads: int = Field(16, ge=1)
    mlp_ratio: float = Field(4.0, gt=0)
    embed_dim: int | None = Field(None, gt=0)  # override the architecture's width (small experiments)
    depth: int | None = Field(None, gt=0)
    num_heads: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.arch!r}; choose one of {sorted(ARCHITECTURES)}")
        ARCHITECTURES[self.arch].check_size(self.embed_dim, self.num_heads)
        if self.decoder_dim % self.decoder_heads:
            raise ValueError(f"decoder_dim {self.decoder_dim} is not divisible by decoder_heads {self.decoder_heads}")
        return self


class AttackConfig(Strict):
    steps: int = Field(1, ge=0)  # 0: no attack
    eps: Budget = 8 / 255
    step_size: Budget = 10 / 255
    random_start: bool = True


class EstimatorConfig(Strict):
    """An MI estimator and its weight lambda (see ``mimir.mi`` for the scale of each estimator)."""

    # hsic_cca: the normalized-CCA HSIC of the authors' code, with which the paper's lambdas were
    # tuned; hsic: Eq. 29; renyi: matrix-based I_alpha, Eq. 25-27
    estimator: Literal["none", "hsic", "hsic_cca", "renyi"] = "hsic_cca"
    weight: float = Field(1e-5, ge=0.0)  # lambda in Eq. 8
    alpha: float = Field(1.01, gt=0.0)  # Renyi order
    # kernel width: a number, "median" (median pairwise distance), "authors" (I_alpha width rule of
    # the authors' code), or None for the estimator's own default (hsic_cca 5.0 on the sigma^2 d
    # scale, hsic "median", renyi "authors")
    sigma: float | Literal["median", "authors"] | None = None

    @model_validator(mode="after")
    def _check(self) -> "EstimatorConfig":
        if self.estimator == "renyi" and self.alpha == 1.0:
            raise ValueError("alpha must differ from 1 for the Renyi estimator")
        if isinstance(self.sigma, float) and self.sigma <= 0:
            raise ValueError(f"sigma must be positive, got {self.sigma}")
        if isinstance(self.sigma, str) and self.estimator == "hsic_cca":
            raise ValueError(f"sigma {self.sigma!r} is not available for hsic_cca, which takes a fixed width")
        return self


class MIConfig(EstimatorConfig):
    # the first argument of I(., z): "adversarial" x + delta (Eq. 8) or "clean" x (the authors'
    # I_alpha code)
    input: Literal["adversarial", "clean"] = "adversarial"


class OptimConfig(Strict):
    epochs: int = Field(..., ge=1)
    warmup_epochs: float = Field(0, ge=0)
    batch_size: int = Field(..., ge=2)  # total over all workers
    blr: float = Field(..., gt=0)  # lr = blr * batch_size / 256
    min_lr: float = Field(0.0, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    clip_grad: float | None = Field(None, gt=0)
    checkpoint_every: int = Field(1, ge=1)  # epochs between checkpoints (and always the last)

    @model_validator(mode="after")
    def _check(self) -> "OptimConfig":
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"warmup_epochs {self.warmup_epochs} exceeds epochs {self.epochs}")
        return self

    @property
    def lr(self) -> float:
        return self.blr * self.batch_size / 256


class PretrainConfig(OptimConfig):
    enabled: bool = True  # False: fine-tune from scratch (the "no pre-training" baseline)
    epochs: int = Field(800, ge=1)
    warmup_epochs: float = Field(40, ge=0)
    batch_size: int = Field(512, ge=2)
    blr: float = Field(1.5e-4, gt=0)
    mask_ratio: float = Field(0.75, gt=0.0, lt=1.0)
    # "uniform": a uniformly random subset of patches per sample (the paper, Sec. 3.3); "grid": one
    # random patch per k x k cell, so ConViT's and XCiT's visible tokens keep image neighbours
    mask_sampling: Literal["uniform", "grid"] = "uniform"
    norm_pix_loss: bool = True
    attack: AttackConfig = AttackConfig()
    # "shared": the attack uses the update's mask and perturbs only visible patches (the paper);
    # "fresh": a new random mask at every attack step, the whole image perturbed (authors' code)
    attack_mask: Literal["shared", "fresh"] = "shared"
    # what the attack's reconstruction is compared with: the clean x (Eq. 9) or its own input
    # x + delta (Algorithm 1 line 5 and the authors' code)
    attack_target: Literal["clean", "adversarial"] = "clean"
    mi: MIConfig = MIConfig()


class ValidationConfig(Strict):
    """The robust-overfitting guard: a held-out part of the training split, measured while
    fine-tuning; the checkpoint with the best robust accuracy on it is what evaluation uses."""

    # held-out training images (stratified, seeded by the run's seed; 0: no validation)
    images: int = Field(1000, ge=0)
    every: int = Field(1, ge=1)  # epochs between measurements (and always the last epoch)
    attack_steps: int = Field(10, ge=1)  # PGD-k at evaluate.eps / evaluate.step_size


class FinetuneConfig(OptimConfig):
    method: Literal["clean", "pgd", "fast", "trades", "mart"] = "pgd"
    epochs: int = Field(100, ge=1)
    warmup_epochs: float = Field(10, ge=0)
    batch_size: int = Field(128, ge=2)
    blr: float = Field(5e-2, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    layer_decay: float = Field(0.65, gt=0.0, le=1.0)
    min_lr: float = Field(1e-6, ge=0)  # the authors' fine-tuning floor
    drop_path: float = Field(0.1, ge=0.0, lt=1.0)
    label_smoothing: float = Field(0.1, ge=0.0, lt=1.0)  # the authors' fine-tuning default
    # the classifier's pooling: "avg" of the patch tokens (the authors' fine-tuning) or the class "token"
    global_pool: Literal["avg", "token"] = "avg"
    attack: AttackConfig = AttackConfig(steps=10, eps=8 / 255, step_size=2 / 255)
    beta: float = Field(6.0, ge=0.0)  # TRADES / MART regularization weight
    # where MART's PGD starts: "gaussian" x + 0.001 N(0, I) (the authors' code) or "uniform" in the ball
    mart_start: Literal["gaussian", "uniform"] = "gaussian"
    clip_grad: float | None = Field(None, gt=0)
    validation: ValidationConfig = ValidationConfig()

    @model_validator(mode="after")
    def _check_attack(self) -> "FinetuneConfig":
        if self.method != "clean" and self.attack.steps < 1:
            raise ValueError(f"method {self.method!r} needs attack.steps >= 1")
        return self


EvalAttack = Literal["natural", "pgd10", "pgd20", "pgd100", "autoattack", "pgd_mi", "pgd_feature"]


class EvaluateConfig(Strict):
    attacks: list[EvalAttack] = ["natural", "pgd20"]
    # which fine-tuning checkpoint is evaluated: the one with the best robust validation accuracy
    # ("best"; the last one when validation is off) or the last one
    checkpoint: Literal["best", "last"] = "best"
    num_images: int | None = Field(None, ge=1)  # None: the whole test split
    batch_size: int = Field(256, ge=1)
    eps: Budget = 8 / 255
    step_size: Budget = 2 / 255
    adaptive_steps: int = Field(100, ge=1)  # PGD-MI and PGD-feature
    # PGD-MI's lambda * I(x + delta, z): the authors' estimator and lambda, whatever the model was
    # pre-trained with (also lambda = 0 rows), so it stays an adaptive attack
    pgd_mi: EstimatorConfig = EstimatorConfig()

    @model_validator(mode="after")
    def _check_pgd_mi(self) -> "EvaluateConfig":
        if "pgd_mi" in self.attacks and (self.pgd_mi.estimator == "none" or self.pgd_mi.weight == 0):
            raise ValueError("pgd_mi needs an estimator and a weight > 0 in evaluate.pgd_mi; "
                             "without them it is plain PGD")
        return self


class ScalingConfig(Strict):
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    gpus_per_worker: float = Field(1.0, gt=0)  # fractions share a GPU between workers
    cpus_per_worker: float = Field(1.0, gt=0)
    # custom Ray resources each worker also asks for, e.g. {"spot": 1} or {"accelerator_type:A100": 0.001}:
    # places workers on the nodes that offer them
    resources_per_worker: dict[str, float] = {}
    torch_threads: int | None = Field(None, ge=1)  # intra-op threads per worker; default cpus_per_worker
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    max_failures: int = Field(0, ge=-1)  # Ray Train restarts from the last checkpoint; -1 = forever
    # node preemptions (spot instances taken back) are counted apart from max_failures; -1 = forever
    max_preemption_failures: int = Field(-1, ge=-1)
    storage_path: str | None = None  # local path or URI (s3://, gs://); default: output_dir
    # torch's deterministic algorithms (and no cuDNN autotuning): on GPUs, same seed -> same weights,
    # at some speed; CPU runs are deterministic without it
    deterministic: bool = False
    # torch.compile the encoder (and decoder) forward and backward, the attacks' included: the first
    # steps pay the compilation; eager is the default until compiled steps are proven on CUDA too
    compile: bool = False

    @field_validator("resources_per_worker")
    @classmethod
    def _custom_only(cls, resources: dict[str, float]) -> dict[str, float]:
        standard = sorted(set(resources) & {"CPU", "GPU", "memory"})
        if standard:
            raise ValueError(f"{standard} belong in cpus_per_worker / gpus_per_worker; only custom resources here")
        if any(value <= 0 for value in resources.values()):
            raise ValueError("every custom resource amount must be > 0")
        return resources


class MLflowConfig(Strict):
    tracking_uri: str | None = None  # default: MLflow's own (MLFLOW_TRACKING_URI or ./mlruns)
    experiment: str = "mimir"


class WandbConfig(Strict):
    project: str = "mimir"
    mode: Literal["online", "offline"] = "online"  # offline: files under ./wandb, `wandb sync` later


class LogConfig(Strict):
    """Console progress inside long epochs and evaluations (mimir.console.Progress) and optional
    experiment trackers (mimir.metrics); not part of any stage's identity."""
    progress_percent: int = Field(10, ge=0, le=100)  # a line every this % of an epoch; 0 = none
    progress_after_seconds: float = Field(60.0, ge=0)  # only once an epoch has run this long
    # the per-epoch metrics and test accuracies also go to MLflow / Weights & Biases (through Ray's
    # integrations) when set; each needs its package installed
    mlflow: MLflowConfig | None = None
    wandb: WandbConfig | None = None


class RunConfig(Strict):
    name: str = "mimir"
    output_dir: str = "results/mimir"
    seed: int = Field(0, ge=0)  # every random stream derives from it (mimir.seeding)
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    pretrain: PretrainConfig = PretrainConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    scaling: ScalingConfig = ScalingConfig()
    log: LogConfig = LogConfig()

    @model_validator(mode="after")
    def _check_shapes(self) -> "RunConfig":
        size, patch = self.data.img_size, self.model.patch_size
        if size % patch:
            raise ValueError(f"model.patch_size {patch} does not divide data.img_size {size}")
        ARCHITECTURES[self.model.arch].check(size // patch, self.pretrain.mask_ratio, patch,
                                             self.pretrain.mask_sampling)
        for stage in ("pretrain", "finetune"):
            batch = getattr(self, stage).batch_size
            if batch % self.scaling.num_workers:
                raise ValueError(
                    f"{stage}.batch_size {batch} is not divisible by scaling.num_workers "
                    f"{self.scaling.num_workers}")
        return self

    def stage_config(self, stage: str) -> dict[str, Any]:
        """What determines a training stage's weights: the fields its reuse is keyed on."""
        dumped = self.model_dump(mode="json")
        if stage == "pretrain":
            keep = {k: dumped[k] for k in ("seed", "data", "model", "pretrain")}
            keep["data"] = {k: v for k, v in keep["data"].items()
                            if k in ("dataset", "img_size", "mean", "std", "crop_scale", "hflip")}
        elif stage == "finetune":
            keep = {k: dumped[k] for k in ("seed", "data", "model", "pretrain", "finetune")}
        else:
            raise ValueError(f"unknown training stage {stage!r}")
        keep["scaling"] = {"num_workers": self.scaling.num_workers}
        return keep

    def stage_hash(self, stage: str) -> str:
        return _digest(self.stage_config(stage))

    def pretrain_hash(self) -> str:
        """Hash of everything that determines the pre-trained weights (cache key for sweeps)."""
        return self.stage_hash("pretrain")

    def config_hash(self) -> str:
        return _digest(self.model_dump(mode="json"))


def config_changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """``["pretrain.mask_ratio: 0.75 -> 0.5", ...]``: the leaves that differ between two config dicts."""
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "(unset)"), new.get(key, "(unset)")
        if isinstance(a, dict) and isinstance(b, dict):
            changes += config_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            changes.append(f"{prefix}{key}: {json.dumps(a)} -> {json.dumps(b)}")
    return changes


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        lines.append(f"  {field}: {msg}")
    return f"invalid config {source}:\n" + "\n".join(lines)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["pretrain.epochs=2", "model.arch=vit_small"]`` -> nested dict; values are parsed as YAML."""
    dotted: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        dotted[key] = yaml.safe_load(raw)
    return nest(dotted)


def nest(dotted: dict[str, Any]) -> dict[str, Any]:
    """``{"pretrain.epochs": 2}`` -> ``{"pretrain": {"epochs": 2}}``: overrides as data."""
    nested: dict[str, Any] = {}
    for key, value in dotted.items():
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r} conflicts with an earlier override")
        node[leaf] = value
    return nested


def flatten(nested: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The inverse of :func:`nest`."""
    flat: dict[str, Any] = {}
    for key, value in nested.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def build_config(raw: dict[str, Any], overrides: list[str] | dict[str, Any] | None = None,
                 source: str = "") -> RunConfig:
    """Validate a raw dict (plus overrides) into a RunConfig, or raise ConfigError naming the fields."""
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    merged = deep_merge(raw, overrides or {})
    try:
        return RunConfig.model_validate(merged)
    except ValidationError as err:
        raise ConfigError(format_errors(err, source or "(in memory)")) from None


BUNDLED = Path(__file__).resolve().parent  # the run configs (configs/) and sweep specs (tune/) shipped inside


def bundled_names(kind: str) -> list[str]:
    """The names of the bundled run configs (``kind`` "configs") or sweep specs ("tune")."""
    return sorted(p.stem for p in (BUNDLED / kind).glob("*.yaml"))


def find_file(kind: str, name_or_path: str | Path) -> Path:
    """A YAML file as given, else the bundled run config or sweep spec of that name (``quickstart``,
    ``digits_table7``; ``.yaml`` optional), so the commands work from any folder and from an
    installed package; a ConfigError naming both places otherwise."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    bundled = BUNDLED / kind / (path.name if path.suffix == ".yaml" else f"{path.name}.yaml")
    if path.parent == Path(".") and bundled.is_file():
        return bundled
    what = "config" if kind == "configs" else "sweep spec"
    raise ConfigError(f"{what} file not found: {name_or_path} (nor a bundled {what} of that name; the bundled "
                      f"ones: {', '.join(bundled_names(kind))})")


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not a UTF-8 text file ({err.reason} at byte {err.start})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """The run config in a YAML file, or the bundled one of that name (:func:`find_file`)."""
    path = find_file("configs", path)
    return build_config(load_yaml(path), overrides, source=str(path))
