"""One settings tree for every command: defaults < YAML (--config) < env (BINCOUNT_...) < CLI flags.

Env vars use `__` between levels: `BINCOUNT_TRAIN__EPOCHS=3`, `BINCOUNT_WORKDIR=/data/run1`.
Unknown keys and bad values are errors that name the key.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bincount.config_layers import CONFIG_ENV, CONFIG_NAME, deep_merge, env_name, env_layer, nest, yaml_layer
from bincount.container.hparams import BY_NAME as HP
from bincount.errors import BincountError
from bincount.ranges import IntRanges, parse_ranges
from bincount.results import Result

PRETRAINED_NAMES = ("imagenet", "none")  # any other train.pretrained is a local weights file


class Section(BaseModel):
    # allow_inf_nan=False: inf and nan are refused in every float setting (train.lr=inf trained a NaN model)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def _check_path(value: Path | None) -> Path | None:
    if value is not None and "\x00" in str(value):
        raise ValueError("a path cannot hold a NUL character")
    return value


def _check_url(value: str | None) -> str | None:
    """An endpoint URL must be http(s)://host[:port][/path]: botocore fails on anything else with a traceback."""
    from urllib.parse import urlsplit

    if value is None:
        return value
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise ValueError(f"{value!r} is not a URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or any(c.isspace() for c in value):
        raise ValueError(f"{value!r} is not an http(s)://host[:port] URL")
    return value


class DataSettings(Section):
    """Where the bin images come from and which ones to take."""

    source: str = Field("s3://aft-vbi-pds", description="s3://bucket[/prefix] in the bucket layout, or a local folder")
    endpoint_url: str | None = Field(None, description="any S3-compatible endpoint (e.g. http://127.0.0.1:9000)")
    region: str = Field("us-east-1", description="AWS region of the source bucket")
    unsigned: bool = Field(True, description="anonymous requests (the public ABID bucket needs no account)")
    max_count: int = Field(5, ge=1, le=100, description="classes are counts 0..max_count")
    counts: str | None = Field(None, description="keep only these counts, e.g. \"1-5\"; default 0..max_count")
    limit: int | None = Field(None, ge=1, description="at most this many usable items")
    ids: str | None = Field(None, description="an id range or list, e.g. \"1-5000\" or \"4,9915,100313\"")
    id_file: Path | None = Field(None, description="plain ids (one a line) or the capstone JSON {\"1\": [\"data/metadata/100313.json\", ...]}")
    balanced: bool = Field(False, description="equal numbers per count (labels are read first, then images fetched)")
    workers: int | None = Field(None, ge=1, le=512, description="concurrent requests; default: 256 on S3 (sized for network "
                                "latency: a GET waits tens of ms; s5cmd's default), 4 per core for a local folder")
    retries: int = Field(8, ge=1, le=50, description="attempts per object in all (botocore's retries with backoff on throttling "
                         "and connection errors, and a re-read of a body that broke off)")
    seed: int = Field(0, description="which items --balanced picks when a count has more than needed (--limit takes the lowest ids)")
    index: bool | None = Field(None, description="select from <workdir>/index.sqlite (`bincount index`): true = required, "
                               "false = never, null = when it is complete and was built from data.source")

    timeout: float = Field(10, gt=0, le=600, description="seconds without an answer before a request is retried; "
                           "fetch stops with an error once the source has not answered for 3x this long")

    @field_validator("counts", "ids")
    @classmethod
    def _int_set(cls, value: str | None) -> str | None:
        if value is not None:
            parse_ranges(value)
        return value

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint_url(cls, value: str | None) -> str | None:
        return _check_url(value)

    @field_validator("id_file")
    @classmethod
    def _id_file(cls, value: Path | None) -> Path | None:
        return _check_path(value)

    def count_set(self) -> list[int]:
        if not self.counts:
            return list(range(self.max_count + 1))
        ranges = IntRanges(self.counts)
        if ranges.last > self.max_count:
            raise BincountError(f"data.counts: {self.counts!r} goes beyond data.max_count={self.max_count}")
        return list(ranges)


class SplitSettings(Section):
    """Stratified, seeded train/val/test split."""

    train: float = Field(0.6, gt=0, lt=1, description="share of each count that goes to training")
    val: float = Field(0.2, gt=0, lt=1, description="share for validation (early stopping, tuning objective)")
    test: float = Field(0.2, gt=0, lt=1, description="share held out for evaluate and audit")
    seed: int = Field(42, description="random seed: the same manifest and seed give the same split")

    @model_validator(mode="after")
    def _sum_to_one(self) -> SplitSettings:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"split ratios must sum to 1 (train+val+test = {total:g})")
        return self


class S3Settings(Section):
    """Where `upload` puts the training channels."""

    bucket: str | None = Field(None, description="required by upload and the sagemaker backend")
    prefix: str = Field("bincount", description="key prefix: channels go to s3://<bucket>/<prefix>/{train,val,test}/")
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint for upload (e.g. a local S3 server)")
    region: str | None = Field(None, description="AWS region of the bucket; default the jobs' region (sagemaker.region), "
                               "which the sagemaker backend requires")
    workers: int = Field(16, ge=1, le=256, description="concurrent uploads")

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint_url(cls, value: str | None) -> str | None:
        return _check_url(value)

    @field_validator("bucket")
    @classmethod
    def _bucket(cls, value: str | None) -> str | None:
        # S3's naming rules: 3-63 of a-z 0-9 . -, a letter or digit at each end
        if value is not None and not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", value):
            raise ValueError(f"{value!r} is not an S3 bucket name (3-63 characters: a-z, 0-9, . and -, "
                             "a letter or digit first and last)")
        return value


def resolve_pretrained(value: str) -> str:
    """The one place that reads train.pretrained: imagenet | none | s3://bucket/key.pth | a local file.

    A local file becomes an absolute path here, once (train.py runs in its run dir). Whether it exists is
    checked where it is used (TrainSettings.weights_file), so a command that does not train (status,
    config) works from any directory.
    """
    value = str(value).strip()
    if value in PRETRAINED_NAMES:
        return value
    if not value.endswith((".pth", ".pt")):
        raise ValueError("must be imagenet, none, a .pth/.pt weights file or an s3:// URI of one")
    if value.startswith("s3://"):
        bucket, _, key = value[5:].partition("/")
        if not bucket or not key:
            raise ValueError(f"{value} is not an s3://bucket/key URI")
        return value
    return str(Path(value).expanduser().resolve())


class ShardSettings(Section):
    """Shard channels (`bincount shard`): WebDataset-style tar files that training streams."""

    channels: Literal["auto", "files", "shards"] = Field("auto", description="what upload and local training use: "
                                                          "auto = the shards when `bincount shard` built them, else the image files")
    items_per_shard: int = Field(4000, ge=1, description="items per tar file (~200-300 MB at 448 px)")
    max_side: int | None = Field(None, ge=16, le=4096, description="longest side of the stored images (resized, never cropped); "
                                 "default 2 x train.image_size")
    quality: int = Field(90, ge=1, le=100, description="JPEG quality of re-encoded images")
    workers: int = Field(32, ge=1, le=512, description="concurrent image reads and encodes")
    seed: int = Field(0, description="how items are spread over the shards (every shard mixes all counts)")
    instance_type: str = Field("ml.m5.xlarge", description="sagemaker backend: the Processing job's instance type")
    instance_count: int = Field(1, ge=1, description="sagemaker backend: instances (shards are spread over them)")
    volume_size_gb: int = Field(30, ge=1, description="sagemaker backend: the Processing job's volume")
    max_runtime_s: int = Field(24 * 3600, ge=60, description="sagemaker backend: the Processing job's time limit")
    wait: bool = Field(True, description="sagemaker backend: wait for the Processing job to end")


def _hp(name: str, **bounds: Any) -> Any:
    """A train setting's Field: its default and description from the container's hyperparameter table."""
    return Field(HP[name].default, description=HP[name].help, **bounds)


class TrainSettings(Section):
    """Hyperparameters of container/train.py (passed as --name value, as SageMaker does)."""

    # The hyperparameters train.py takes: defaults and descriptions from container/hparams.py (train.py builds
    # its arguments from the same table); only the bounds are added here.
    arch: Literal[HP["arch"].choices] = _hp("arch")
    stem: Literal[HP["stem"].choices] = _hp("stem")
    pretrained: str = _hp("pretrained")
    epochs: int = _hp("epochs", ge=1)
    batch_size: int = _hp("batch_size", ge=1)
    lr: float = _hp("lr", gt=0)
    weight_decay: float = _hp("weight_decay", ge=0)
    optimizer: Literal[HP["optimizer"].choices] = _hp("optimizer")
    momentum: float = _hp("momentum", ge=0, lt=1)
    warmup_epochs: int = _hp("warmup_epochs", ge=0)
    label_smoothing: float = _hp("label_smoothing", ge=0, lt=1)
    count_loss: float = _hp("count_loss", ge=0)
    ema_decay: float = _hp("ema_decay", ge=0, lt=1)
    class_weighting: bool = _hp("class_weighting")
    image_size: int = _hp("image_size", ge=32, le=1024)
    tta: bool = _hp("tta")
    patience: int = _hp("patience", ge=0)
    num_workers: int | None = _hp("num_workers", ge=0)
    seed: int = _hp("seed")
    shuffle_buffer: int = _hp("shuffle_buffer", ge=1)
    amp: bool = _hp("amp")
    use_best: bool = Field(False, description="train with the best tuning trial's hyperparameters (tuned and the rest "
                           "it ran with, e.g. image_size; train settings you set yourself win, with a note)")
    keep_checkpoint: bool = Field(False, description="keep a finished run's (and tuning trial's) checkpoints: "
                                  "checkpoints/ locally, the job's checkpoint prefix in S3 on SageMaker (optimizer "
                                  "state, ~2x the model); only an interrupted run needs them to resume")
    wait: bool = Field(True, description="sagemaker backend: stream logs until the job ends")

    @field_validator("pretrained")
    @classmethod
    def _pretrained(cls, value: str) -> str:
        return resolve_pretrained(value)

    @property
    def weights_file(self) -> Path | None:
        """train.pretrained as an absolute path when it names a local weights file (which must exist: a
        one-line error here, where it is used); None for imagenet, none or s3://."""
        if self.pretrained in PRETRAINED_NAMES or self.pretrained.startswith("s3://"):
            return None
        path = Path(self.pretrained)  # resolve_pretrained made it absolute
        if not path.is_file():
            raise BincountError(f"train.pretrained: weights file {path} not found")
        return path

    def hyperparameters(self, max_count: int) -> dict[str, Any]:
        """The arguments train.py takes, as SageMaker passes them (a weights file as an absolute path:
        the local backend runs train.py in its run dir)."""
        hp = self.model_dump(exclude={"num_workers", "use_best", "wait", "keep_checkpoint"})
        hp["num_classes"] = max_count + 1
        if self.weights_file:
            hp["pretrained"] = str(self.weights_file)
        if self.num_workers is not None:
            hp["num_workers"] = self.num_workers
        return hp


class ContinuousRange(Section):
    min: float
    max: float
    scale: Literal["log", "linear"] = Field("log", description="log or linear search scale")

    @model_validator(mode="after")
    def _bounds(self) -> ContinuousRange:
        if self.min >= self.max:
            raise ValueError(f"min ({self.min:g}) must be below max ({self.max:g})")
        if self.scale == "log" and self.min <= 0:
            raise ValueError("a log-scale range needs min > 0")
        return self


class TuneSettings(Section):
    """Hyperparameter search: SageMaker HyperparameterTuner, or Optuna locally."""

    objective: Literal["val_acc", "val_rmse"] = Field("val_acc", description="val_acc is maximised, val_rmse minimised")
    max_jobs: int = Field(8, ge=1, description="trials in total")
    max_parallel_jobs: int = Field(2, ge=1, description="trials at once")
    strategy: Literal["Bayesian", "Random", "Hyperband", "Grid"] = Field("Bayesian", description="SageMaker search strategy (local search always uses Optuna TPE)")
    early_stopping: Literal["Auto", "Off"] = Field("Auto", description="stop hopeless trials early (SageMaker Auto; Optuna median pruning locally)")
    warm_start: bool = Field(True, description="start from the previous tuning job recorded in state.json")
    lr: ContinuousRange = Field(ContinuousRange(min=1e-4, max=1e-1, scale="log"), description="learning-rate search range")
    weight_decay: ContinuousRange = Field(ContinuousRange(min=1e-6, max=1e-2, scale="log"), description="weight-decay search range")
    batch_size: list[int] = Field([32, 64, 128, 256, 512], min_length=1, description="categorical choices")
    epochs: int | None = Field(None, ge=1, description="epochs per trial; default train.epochs")
    wait: bool = Field(True, description="sagemaker backend: wait for the tuning job to end")

    @field_validator("lr", "weight_decay", mode="before")
    @classmethod
    def _range_defaults(cls, value: Any, info: Any) -> Any:
        """`--set tune.lr.max=0.01` keeps the default min and scale."""
        if isinstance(value, dict):
            return {**cls.model_fields[info.field_name].default.model_dump(), **value}
        return value


class DeploySettings(Section):
    """Endpoint settings: the local server, or a SageMaker real-time or serverless endpoint."""

    mode: Literal["realtime", "serverless"] = Field("realtime", description="realtime (instances) or serverless (SageMaker)")
    endpoint_name: str | None = Field(None, description="default: bincount-<timestamp>")
    instance_type: str = Field("ml.m5.large", description="realtime endpoint instance type")
    instance_count: int = Field(1, ge=1, description="realtime endpoint instance count")
    memory_size_mb: int = Field(4096, ge=1024, le=6144, description="serverless: 1024..6144 in steps of 1024")
    max_concurrency: int = Field(5, ge=1, le=200, description="serverless")
    framework_version: str = Field("2.6.0", description="SageMaker PyTorch inference container (the newest SDK 2.257 knows)")
    py_version: str = Field("py312", description="Python version of the inference container")
    image_uri: str | None = Field(None, description="an ECR inference image in the endpoint's region; overrides "
                                  "framework_version/py_version (see README: choosing a newer image)")
    host: str = Field("127.0.0.1", description="local server")
    port: int = Field(8080, ge=0, le=65535, description="0 picks a free port")
    model_data: str | None = Field(None, description="model.tar.gz (path or s3:// URI); default: the one in state.json")
    workers: int = Field(8, ge=1, le=128, description="concurrent predict requests")
    trust_code: bool = Field(False, description="run a model artifact's own code/ even when it differs from this "
                             "version's (serve, predict, evaluate, audit): only for artifacts you trust")
    threads: int = Field(8, ge=1, le=256, description="local server: requests served at once (threads of its one worker "
                                                      "process, which holds the one copy of the model)")
    max_connections: int = Field(1000, ge=1, le=10000, description="local server: connections held at once (served, queued "
                                                                   "for a thread, or idle keep-alive); more wait in the backlog, "
                                                                   "and the oldest that has sent no whole request for 1 s gives way")
    max_idle: int = Field(100, ge=0, le=10000, description="local server: idle keep-alive connections kept at once (the oldest "
                                                          "is closed first)")
    backlog: int = Field(2048, ge=16, le=65535, description="local server: connections the kernel queues until the server "
                                                            "takes them (capped by net.core.somaxconn)")
    keepalive_s: int = Field(60, ge=0, le=3600, description="local server: an idle keep-alive connection is closed after this")
    head_timeout_s: float = Field(10, gt=0, le=3600, description="local server: a request head (line and headers) must arrive "
                                                                "whole within this of its first byte, a new connection's of "
                                                                "its accept (else 408)")
    read_timeout_s: float = Field(30, gt=0, le=3600, description="local server: a request body must arrive whole within this of "
                                                                "its head (else 408)")
    graceful_timeout_s: int = Field(30, ge=1, le=3600, description="local server: on SIGTERM, requests already taken get "
                                                                   "this long to finish")
    pixel_budget: int = Field(48_000_000, ge=1_000_000, le=2_000_000_000,
                              description="local server: image pixels decoded at once (4-8 bytes each); "
                                          "more wait for room, up to queue_timeout_s")
    queue_timeout_s: float = Field(30, gt=0, le=3600, description="local server: a request waits this long for room to "
                                                                  "decode its images, then gets a 503")

    @field_validator("memory_size_mb")
    @classmethod
    def _memory_step(cls, value: int) -> int:
        if value % 1024:
            raise ValueError("must be a multiple of 1024 (1024..6144)")
        return value


class AuditSettings(Section):
    """`bincount audit` on this machine: parallel, streamed to disk, resumable."""

    workers: int | None = Field(None, ge=1, le=256, description="scoring threads (processes with pool: process) for an in-process "
                                "model; default: one per CPU core. Endpoints use deploy.workers concurrent requests")
    pool: Literal["thread", "process"] = Field("thread", description="thread (one model, no start-up: measured faster on 2 cores, "
                                               "see benchmarks/audit.py) or process (a model per worker; no shared GIL)")
    threads: int | None = Field(None, ge=1, le=256, description="torch threads per worker; default: cores / workers (1 when "
                                "the workers fill the cores: measured fastest, and far faster on a loaded machine)")
    chunk: int = Field(8, ge=1, le=64, description="images per task sent to a worker (one forward pass per chunk)")
    top: int = Field(15, ge=0, description="rows of the ranking printed (and in --json); the CSV has them all")


class TransformSettings(Section):
    """`bincount audit --backend sagemaker`: a SageMaker Batch Transform job (no endpoint kept running)."""

    instance_type: str = Field("ml.m5.xlarge", description="transform instance type")
    instance_count: int = Field(1, ge=1, le=100, description="transform instances (objects are spread across them)")
    max_payload_mb: int = Field(6, ge=0, le=100, description="MaxPayloadInMB: the largest request (one image, or a "
                                "MultiRecord batch) in MB, 0..100 (0: unbounded chunked, not supported by our container)")
    max_concurrent_transforms: int | None = Field(4, ge=0, description="MaxConcurrentTransforms: parallel requests per "
                                                  "instance (one per vCPU of the default instance; unset: SageMaker's 1); "
                                                  "times max_payload_mb at most 100")
    batch_strategy: Literal["SingleRecord", "MultiRecord"] = Field("SingleRecord", description="BatchStrategy; each image is a "
                                                                   "whole object (SplitType None), so one image per request either way")
    wait: bool = Field(True, description="wait for the job and join its outputs (--no-wait returns at once)")
    poll_s: float = Field(30.0, ge=0, description="seconds between DescribeTransformJob calls while waiting")
    max_wait_s: int = Field(6 * 3600, ge=1, description="stop waiting (the job keeps running) after this many seconds")
    invocation_timeout_s: int | None = Field(None, ge=1, le=3600, description="ModelClientConfig InvocationsTimeoutInSeconds "
                                             "per request, 1..3600 (unset: SageMaker's default, 600)")

    @model_validator(mode="after")
    def _payload_budget(self) -> TransformSettings:
        if self.max_payload_mb == 0:
            raise ValueError("max_payload_mb 0 (chunked transfer) is not supported by the PyTorch serving container; use 1..100")
        if self.max_concurrent_transforms and self.max_concurrent_transforms * self.max_payload_mb > 100:
            raise ValueError(f"max_concurrent_transforms x max_payload_mb = {self.max_concurrent_transforms} x "
                             f"{self.max_payload_mb} MB is over SageMaker's 100 MB")
        return self


class RuleSettings(Section):
    """SageMaker Debugger built-in rules (each can be switched off)."""

    vanishing_gradient: bool = Field(True, description="VanishingGradient rule")
    overfit: bool = Field(True, description="Overfit rule")
    overtraining: bool = Field(True, description="Overtraining rule")
    poor_weight_initialization: bool = Field(True, description="PoorWeightInitialization rule")
    loss_not_decreasing: bool = Field(True, description="LossNotDecreasing rule")
    profiler_report: bool = Field(True, description="ProfilerReport rule (system and dataloader bottlenecks)")
    stop_training_on_failure: bool = Field(False, description="rule action: stop the job when a rule fires")
    wait_s: int = Field(1800, ge=0, description="after a waited training job ends: wait this long for the rule "
                        "evaluations to finish (0 = do not wait; bincount status shows them later)")


class SageMakerSettings(Section):
    """The SageMaker backend: training jobs, tuning jobs, endpoints."""

    role: str | None = Field(None, description="an IAM role ARN SageMaker can assume")
    region: str | None = Field(None, description="AWS region for SageMaker jobs and endpoints; default AWS_REGION, "
                               "AWS_DEFAULT_REGION, the profile's region, else us-east-1")
    instance_type: str = Field("ml.g4dn.xlarge", description="training instance type")
    instance_count: int = Field(1, ge=1, description="instances; >1 needs a GPU type (every GPU instance runs torch_distributed: one process per GPU)")
    volume_size_gb: int = Field(30, ge=1, description="training volume size")
    max_run_s: int = Field(24 * 3600, ge=60, description="training time limit in seconds")
    framework_version: str = Field("2.8.0", description="SageMaker PyTorch training container (the newest SDK 2.257 knows)")
    py_version: str = Field("py312", description="Python version of the training container")
    image_uri: str | None = Field(None, description="an ECR training image in the job's region; overrides "
                                  "framework_version/py_version (see README: choosing a newer image)")
    output_path: str | None = Field(None, description="default s3://<s3.bucket>/<s3.prefix>/output")
    base_job_name: str = Field("bincount", description="prefix of training and tuning job names")
    tags: dict[str, str] = Field({}, description="tags on jobs, models and endpoints")
    subnets: list[str] | None = Field(None, description="VPC subnets for training (optional)")
    security_group_ids: list[str] | None = Field(None, description="VPC security groups for training (optional)")
    volume_kms_key: str | None = Field(None, description="KMS key for the training volume (optional)")
    output_kms_key: str | None = Field(None, description="KMS key for the output in S3 (optional)")
    enable_network_isolation: bool = Field(False, description="no network access from the training container")
    use_spot_instances: bool = Field(False, description="managed spot training (resumes from checkpoints after interruptions)")
    max_wait_s: int | None = Field(None, ge=60, description="spot: >= max_run_s")
    checkpoint_s3_uri: str | None = Field(None, description="default s3://<s3.bucket>/<s3.prefix>/checkpoints when spot")
    rules: RuleSettings = Field(RuleSettings(), description="Debugger rules to run next to the training job")
    telemetry_opt_out: bool = Field(True, description="no SDK telemetry calls")

    @field_validator("role")
    @classmethod
    def _role_arn(cls, value: str | None) -> str | None:
        import re

        if value is not None and not re.fullmatch(r"arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]+", value):
            raise ValueError("must be an IAM role ARN like arn:aws:iam::123456789012:role/SageMakerRole")
        return value


class MlflowSettings(Section):
    """Optional: log each run to MLflow (`pip install 'bincount[mlflow]'`)."""

    tracking_uri: str | None = Field(None, description="MLflow tracking URI (a SageMaker managed MLflow ARN, "
                                     "http(s)://, or file:); default off")
    experiment: str = Field("bincount", description="the MLflow experiment runs are logged to")


class Settings(Section):
    """Everything bincount needs, in one tree."""


    workdir: Path = Field(Path("bincount-work"), description="the work dir: raw/, manifest.jsonl, splits/, state.json, models/, reports/")
    backend: Literal["local", "sagemaker"] = Field("local", description="local (this machine, default) or sagemaker")
    data: DataSettings = Field(DataSettings(), description="what to fetch and from where")
    split: SplitSettings = Field(SplitSettings(), description="how to split the manifest")
    s3: S3Settings = Field(S3Settings(), description="where upload puts the training channels")
    shard: ShardSettings = Field(ShardSettings(), description="shard channels for training at scale")
    train: TrainSettings = Field(TrainSettings(), description="training hyperparameters (container/train.py arguments)")
    tune: TuneSettings = Field(TuneSettings(), description="hyperparameter search")
    deploy: DeploySettings = Field(DeploySettings(), description="endpoints: the local server or SageMaker")
    audit: AuditSettings = Field(AuditSettings(), description="the local audit: workers, pool")
    transform: TransformSettings = Field(TransformSettings(), description="the SageMaker Batch Transform audit")
    sagemaker: SageMakerSettings = Field(SageMakerSettings(), description="the SageMaker backend")
    mlflow: MlflowSettings = Field(MlflowSettings(), description="optional experiment tracking in MLflow")

    @field_validator("workdir")
    @classmethod
    def _workdir(cls, value: Path) -> Path:
        return _check_path(value)


def did_you_mean(loc: tuple) -> str:
    """'; did you mean train.epochs?' for a misspelled key (the closest setting at the same level), else ''."""
    import difflib

    model: Any = Settings
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(str(part))
        model = field.annotation if field is not None else None
        if model is None:
            return ""
    names = list(getattr(model, "model_fields", {}))
    close = difflib.get_close_matches(str(loc[-1]), names, n=1, cutoff=0.6)
    return f"; did you mean {'.'.join([*map(str, loc[:-1]), close[0]])}?" if close else ""


def describe_validation_error(exc: ValidationError, origin: str = "") -> str:
    """One line: the first bad key and what is wrong with it (and how many more problems there are)."""
    errors = exc.errors()
    first = errors[0]
    key = ".".join(str(p) for p in first["loc"]) or "config"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key" + did_you_mean(first["loc"])
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    return f"invalid setting {key}: {msg}{origin}{more}"


def load_settings(
    config: Path | None = None,
    overrides: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
) -> Settings:
    """Build the settings: defaults < YAML file < BINCOUNT_* env vars < `overrides` (dotted keys).

    The CLI finds `config` with find_config; a library caller passes its own.
    """
    environ = dict(os.environ if environ is None else environ)
    env, flags = env_layer(environ), nest(overrides or {})
    file = yaml_layer(config) if config is not None else {}
    layers = deep_merge(deep_merge(file, env), flags)
    try:
        return Settings.model_validate(layers)
    except ValidationError as exc:
        loc = exc.errors()[0]["loc"]
        origin = next((where for layer, where in ((flags, "--set or a flag"), (env, env_name(loc)),
                                                   (file, str(config))) if _has(layer, loc)), "")
        raise BincountError(describe_validation_error(exc, f" (from {origin})" if origin else "")) from None
    except RecursionError:
        raise BincountError("invalid settings: a value is nested too deeply") from None


def _has(layer: dict[str, Any], loc: tuple) -> bool:
    """Whether a layer sets the key at `loc` (or a parent of it that is not a mapping)."""
    node: Any = layer
    for part in loc:
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
        if not isinstance(node, dict):
            return True
    return True


def find_config(config: Path | None, environ: dict[str, str], workdir: Any = None) -> Path | None:
    """The config file to read: --config, else $BINCOUNT_CONFIG, else ./bincount.yaml, else <workdir>/bincount.yaml.

    The work dir is the one the flags or environment name, else the default.
    """
    if config is not None:
        return Path(config)
    if environ.get(CONFIG_ENV):
        path = Path(environ[CONFIG_ENV])
        if not path.is_file():
            raise BincountError(f"{CONFIG_ENV}={path}: config file not found")
        return path
    found = [folder / CONFIG_NAME for folder in (Path.cwd(), Path(workdir or Settings.model_fields["workdir"].default))
             if (folder / CONFIG_NAME).is_file()]
    if len(found) == 2 and not found[0].samefile(found[1]):
        from bincount.console import log

        log(f"note: reading settings from ./{CONFIG_NAME}; {found[1]} is not read (./{CONFIG_NAME} comes first; "
            "--config FILE picks one)")
    return found[0] if found else None


class ConfigResult(Result):
    """`bincount config`: the file the settings were read from (if any) and the effective settings."""

    config_file: str | None  # the config file the settings were read from (None: none found or given)
    settings: dict[str, Any]  # the effective settings: defaults < config file < BINCOUNT_* variables < --set < flags

    def rich(self) -> Any:
        from rich.console import Group
        from rich.syntax import Syntax
        from rich.text import Text

        source = (f"# read from {self.config_file}" if self.config_file else
                  "# no config file: defaults, BINCOUNT_* variables and flags only")
        return Group(Text(source, style="dim"), Syntax(yaml.safe_dump(self.settings, sort_keys=False), "yaml"))


def show(settings: Settings, config_file: Path | None = None) -> ConfigResult:
    """The effective settings as a result (YAML in the terminal, JSON with --json)."""
    return ConfigResult(config_file=str(config_file) if config_file else None, settings=settings.model_dump(mode="json"))
