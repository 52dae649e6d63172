"""One settings tree for every command: defaults < YAML (--config) < env (BINCOUNT_...) < CLI flags.

Env vars use `__` between levels: `BINCOUNT_TRAIN__EPOCHS=3`, `BINCOUNT_WORKDIR=/data/run1`.
Unknown keys and bad values are errors that name the key.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bincount.errors import BincountError

ENV_PREFIX = "BINCOUNT_"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def parse_int_set(spec: str) -> list[int]:
    """Parse `0-5`, `1,2,4` or `1-3,5` into a sorted list of distinct non-negative integers."""
    values: set[int] = set()
    for part in str(spec).replace(" ", "").split(","):
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            start, end = (int(lo), int(hi)) if sep else (int(lo), int(lo))
        except ValueError:
            raise ValueError(f"{spec!r} is not a list of integers or ranges like 0-5 or 1,2,3") from None
        if start < 0 or end < start:
            raise ValueError(f"bad range {part!r} in {spec!r}")
        values.update(range(start, end + 1))
    if not values:
        raise ValueError(f"{spec!r} selects nothing")
    return sorted(values)


class DataSettings(Section):
    """Where the bin images come from and which ones to take."""

    source: str = "s3://aft-vbi-pds"  # s3://bucket[/prefix] in the bucket layout, or a local folder
    endpoint_url: str | None = None  # any S3-compatible endpoint (e.g. http://127.0.0.1:9000)
    region: str = "us-east-1"
    unsigned: bool = True  # anonymous requests (the public ABID bucket needs no account)
    max_count: int = Field(5, ge=1, le=100)  # classes are counts 0..max_count
    counts: str | None = None  # keep only these counts, e.g. "1-5"; default 0..max_count
    limit: int | None = Field(None, ge=1)  # at most this many usable items
    ids: str | None = None  # an id range or list, e.g. "1-5000" or "4,9915,100313"
    id_file: Path | None = None  # plain ids (one a line) or the capstone JSON {"1": ["data/metadata/100313.json", ...]}
    balanced: bool = False  # equal numbers per count (labels are read first, then images fetched)
    workers: int = Field(32, ge=1, le=512)  # concurrent requests: sized for network latency, not CPU
    retries: int = Field(8, ge=1, le=50)  # attempts per request, with backoff on throttling/connection errors
    seed: int = 0  # which items --balanced picks when a count has more than needed (--limit takes the lowest ids)

    @field_validator("counts", "ids")
    @classmethod
    def _int_set(cls, value: str | None) -> str | None:
        if value is not None:
            parse_int_set(value)
        return value

    def count_set(self) -> list[int]:
        counts = parse_int_set(self.counts) if self.counts else list(range(self.max_count + 1))
        if counts[-1] > self.max_count:
            raise BincountError(f"data.counts: {self.counts!r} goes beyond data.max_count={self.max_count}")
        return counts


class SplitSettings(Section):
    """Stratified, seeded train/val/test split."""

    train: float = Field(0.6, gt=0, lt=1)
    val: float = Field(0.2, ge=0, lt=1)
    test: float = Field(0.2, ge=0, lt=1)
    seed: int = 42

    @model_validator(mode="after")
    def _sum_to_one(self) -> SplitSettings:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"split ratios must sum to 1 (train+val+test = {total:g})")
        return self


class S3Settings(Section):
    """Where `upload` puts the training channels."""

    bucket: str | None = None  # required by upload and the sagemaker backend
    prefix: str = "bincount"
    endpoint_url: str | None = None
    region: str = "us-east-1"
    workers: int = Field(16, ge=1, le=256)


class TrainSettings(Section):
    """Hyperparameters of container/train.py (passed as --name value, as SageMaker does)."""

    arch: Literal["resnet18", "resnet34", "resnet50", "mobilenet_v3_small", "mobilenet_v3_large"] = "resnet18"
    pretrained: str = "none"  # imagenet | none | path to a local weights file
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    momentum: float = Field(0.9, ge=0, lt=1)
    warmup_epochs: int = Field(1, ge=0)
    label_smoothing: float = Field(0.05, ge=0, lt=1)
    class_weighting: bool = False
    image_size: int = Field(224, ge=32, le=1024)
    patience: int = Field(5, ge=0)  # early stopping: epochs without a better val metric (0 = never stop)
    num_workers: int | None = Field(None, ge=0)  # DataLoader workers; default sized to the machine
    seed: int = 0
    amp: bool = True  # mixed precision (CUDA only)
    use_best: bool = False  # train with the best hyperparameters recorded by `bincount tune`
    wait: bool = True  # sagemaker backend: stream logs until the job ends

    @field_validator("pretrained")
    @classmethod
    def _pretrained(cls, value: str) -> str:
        if value not in {"imagenet", "none"} and not value.endswith((".pth", ".pt")):
            raise ValueError("must be imagenet, none, or a path to a .pth/.pt weights file")
        return value

    def hyperparameters(self, max_count: int) -> dict[str, Any]:
        """The arguments train.py takes, as SageMaker passes them."""
        hp = self.model_dump(exclude={"num_workers", "use_best", "wait"})
        hp["num_classes"] = max_count + 1
        if self.num_workers is not None:
            hp["num_workers"] = self.num_workers
        return hp


class ContinuousRange(Section):
    min: float
    max: float
    scale: Literal["log", "linear"] = "log"

    @model_validator(mode="after")
    def _bounds(self) -> ContinuousRange:
        if self.min >= self.max:
            raise ValueError(f"min ({self.min:g}) must be below max ({self.max:g})")
        if self.scale == "log" and self.min <= 0:
            raise ValueError("a log-scale range needs min > 0")
        return self


class TuneSettings(Section):
    """Hyperparameter search: SageMaker HyperparameterTuner, or Optuna locally."""

    objective: Literal["val_acc", "val_rmse"] = "val_acc"  # val_acc is maximised, val_rmse minimised
    max_jobs: int = Field(8, ge=1)
    max_parallel_jobs: int = Field(2, ge=1)
    strategy: Literal["Bayesian", "Random", "Hyperband", "Grid"] = "Bayesian"
    early_stopping: Literal["Auto", "Off"] = "Auto"
    warm_start: bool = True  # start from the previous tuning job recorded in state.json
    lr: ContinuousRange = ContinuousRange(min=1e-4, max=1e-1, scale="log")
    weight_decay: ContinuousRange = ContinuousRange(min=1e-6, max=1e-2, scale="log")
    batch_size: list[int] = Field([32, 64, 128, 256, 512], min_length=1)  # categorical choices
    epochs: int | None = Field(None, ge=1)  # epochs per trial; default train.epochs
    wait: bool = True

    @field_validator("lr", "weight_decay", mode="before")
    @classmethod
    def _range_defaults(cls, value: Any, info: Any) -> Any:
        """`--set tune.lr.max=0.01` keeps the default min and scale."""
        if isinstance(value, dict):
            return {**cls.model_fields[info.field_name].default.model_dump(), **value}
        return value


class DeploySettings(Section):
    """Endpoint settings: the local server, or a SageMaker real-time or serverless endpoint."""

    mode: Literal["realtime", "serverless"] = "realtime"
    endpoint_name: str | None = None  # default: bincount-<timestamp>
    instance_type: str = "ml.m5.large"
    instance_count: int = Field(1, ge=1)
    memory_size_mb: int = Field(4096, ge=1024, le=6144)  # serverless: 1024..6144 in steps of 1024
    max_concurrency: int = Field(5, ge=1, le=200)  # serverless
    framework_version: str = "2.6.0"  # SageMaker PyTorch inference container
    py_version: str = "py312"
    host: str = "127.0.0.1"  # local server
    port: int = Field(8080, ge=0, le=65535)  # 0 picks a free port
    model_data: str | None = None  # model.tar.gz (path or s3:// URI); default: the one in state.json
    workers: int = Field(8, ge=1, le=128)  # concurrent predict requests

    @field_validator("memory_size_mb")
    @classmethod
    def _memory_step(cls, value: int) -> int:
        if value % 1024:
            raise ValueError("must be a multiple of 1024 (1024..6144)")
        return value


class RuleSettings(Section):
    """SageMaker Debugger built-in rules (each can be switched off)."""

    vanishing_gradient: bool = True
    overfit: bool = True
    overtraining: bool = True
    poor_weight_initialization: bool = True
    loss_not_decreasing: bool = True
    profiler_report: bool = True
    stop_training_on_failure: bool = False  # rule action: stop the job when a rule fires


class SageMakerSettings(Section):
    """The SageMaker backend: training jobs, tuning jobs, endpoints."""

    role: str | None = None  # an IAM role ARN SageMaker can assume
    region: str = "us-east-1"
    instance_type: str = "ml.g4dn.xlarge"
    instance_count: int = Field(1, ge=1)  # >1 runs torch_distributed (DDP)
    volume_size_gb: int = Field(30, ge=1)
    max_run_s: int = Field(24 * 3600, ge=60)
    framework_version: str = "2.8.0"  # SageMaker PyTorch training container
    py_version: str = "py312"
    output_path: str | None = None  # default s3://<s3.bucket>/<s3.prefix>/output
    base_job_name: str = "bincount"
    tags: dict[str, str] = {}
    subnets: list[str] | None = None
    security_group_ids: list[str] | None = None
    volume_kms_key: str | None = None
    output_kms_key: str | None = None
    enable_network_isolation: bool = False
    use_spot_instances: bool = False
    max_wait_s: int | None = Field(None, ge=60)  # spot: >= max_run_s
    checkpoint_s3_uri: str | None = None  # default s3://<s3.bucket>/<s3.prefix>/checkpoints when spot
    rules: RuleSettings = RuleSettings()
    telemetry_opt_out: bool = True  # no SDK telemetry calls

    @field_validator("role")
    @classmethod
    def _role_arn(cls, value: str | None) -> str | None:
        import re

        if value is not None and not re.fullmatch(r"arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]+", value):
            raise ValueError("must be an IAM role ARN like arn:aws:iam::123456789012:role/SageMakerRole")
        return value


class Settings(Section):
    """Everything bincount needs, in one tree."""

    workdir: Path = Path("bincount-work")
    backend: Literal["local", "sagemaker"] = "local"
    data: DataSettings = DataSettings()
    split: SplitSettings = SplitSettings()
    s3: S3Settings = S3Settings()
    train: TrainSettings = TrainSettings()
    tune: TuneSettings = TuneSettings()
    deploy: DeploySettings = DeploySettings()
    sagemaker: SageMakerSettings = SageMakerSettings()


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def nest(dotted: dict[str, Any]) -> dict[str, Any]:
    """{"train.epochs": 3} -> {"train": {"epochs": 3}}; None values (flags not given) are dropped."""
    out: dict[str, Any] = {}
    for key, value in dotted.items():
        if value is None:
            continue
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def _env_layer(environ: dict[str, str]) -> dict[str, Any]:
    dotted = {}
    for name, raw in environ.items():
        if name.startswith(ENV_PREFIX) and len(name) > len(ENV_PREFIX):
            key = name[len(ENV_PREFIX):].lower().replace("__", ".")
            try:
                dotted[key] = yaml.safe_load(raw) if raw.strip() else None
            except yaml.YAMLError:
                dotted[key] = raw
            if dotted[key] is None:
                dotted[key] = raw
    return nest(dotted)


def _yaml_layer(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise BincountError(f"config file {path} not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise BincountError(f"config file {path}: invalid YAML{where}") from None
    if not isinstance(data, dict):
        raise BincountError(f"config file {path}: expected a mapping of sections at the top level")
    return data


def describe_validation_error(exc: ValidationError, origin: str = "") -> str:
    """One line: the first bad key and what is wrong with it (and how many more problems there are)."""
    errors = exc.errors()
    first = errors[0]
    key = ".".join(str(p) for p in first["loc"]) or "config"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    return f"invalid setting {key}: {msg}{origin}{more}"


def load_settings(
    config: Path | None = None,
    overrides: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
) -> Settings:
    """Build the settings: defaults < YAML file < BINCOUNT_* env vars < `overrides` (dotted keys)."""
    layers: dict[str, Any] = {}
    if config is not None:
        layers = deep_merge(layers, _yaml_layer(config))
    layers = deep_merge(layers, _env_layer(dict(os.environ if environ is None else environ)))
    layers = deep_merge(layers, nest(overrides or {}))
    try:
        return Settings.model_validate(layers)
    except ValidationError as exc:
        raise BincountError(describe_validation_error(exc)) from None


def parse_set_option(items: list[str]) -> dict[str, Any]:
    """`--set train.epochs=3` pairs as dotted overrides; values are read as YAML scalars."""
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise BincountError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.epochs=3")
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            out[key.strip()] = raw
    return out


def show(settings: Settings) -> Any:
    """The effective settings as a result (YAML in the terminal, JSON with --json)."""
    from bincount.results import Result

    class ConfigResult(Result):
        settings: dict[str, Any]

        def rich(self) -> Any:
            from rich.syntax import Syntax

            return Syntax(yaml.safe_dump(self.settings, sort_keys=False), "yaml")

    return ConfigResult(settings=settings.model_dump(mode="json"))
