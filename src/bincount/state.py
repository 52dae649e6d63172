"""state.json, typed: what each stage records for the later ones.

`bincount upload` records the S3 channels, `tune` the best hyperparameters, `train` the model and
`deploy` the endpoint. The training, tuning and endpoint records are one class per backend, told apart
by their `backend` field ("local" or "sagemaker"). Read with Workspace.state(), written with
Workspace.update_state() (atomically); nothing else opens state.json.

Every version so far wrote these same shapes, so older work dirs load as they are. Keys this version
does not know (left by another version, or added by hand) are dropped on read rather than failing a
user's work dir; a missing or bad value of a known key is a BincountError naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bincount.errors import BincountError


class Record(BaseModel):
    # A typo in code that writes a record fails loudly; unknown keys in a file are dropped by State.load.
    model_config = ConfigDict(extra="forbid")


class PendingTraining(Record):
    """A local run that has not finished: `bincount train` resumes it when the hyperparameters match."""

    run_dir: str
    hyperparameters: dict[str, Any]


class _Run(Record):
    """What `bincount runs` shows of a training run, recorded when it starts or ends (older records lack it)."""

    hyperparameters: dict[str, Any] | None = None  # the train.py arguments it ran with
    started: str | None = None  # ISO 8601 UTC
    seconds: float | None = None  # wall time of the run
    val_digest: str | None = None  # sha256 prefix of splits/val.jsonl it was validated on: runs compare on the same


class LocalTraining(_Run):
    backend: Literal["local"] = "local"
    job: str  # the run dir's name under models/
    model_data: str  # its model.tar.gz
    model_dir: str  # the unpacked model dir beside it
    metrics: dict[str, float] = {}


class SageMakerTraining(_Run):
    backend: Literal["sagemaker"] = "sagemaker"
    job: str  # the training job name
    status: str  # TrainingJobStatus when last seen
    model_data: str | None = None  # s3://.../model.tar.gz once Completed
    metrics: dict[str, float] = {}
    rules: dict[str, str] | None = None  # Debugger/profiler rule -> RuleEvaluationStatus when last seen
    profiler_report: str | None = None  # the local copy under reports/profiler/<job>/, once fetched


class _Tuning(Record):
    job: str
    objective: str  # val_acc or val_rmse
    status: str  # Completed, or the tuning job's status when last seen
    best_hyperparameters: dict[str, Any] | None = None
    best_value: float | None = None
    hyperparameters: dict[str, Any] | None = None  # what every trial ran with besides the tuned ones (image_size, ...)


class LocalTuning(_Tuning):
    backend: Literal["local"] = "local"


class SageMakerTuning(_Tuning):
    backend: Literal["sagemaker"] = "sagemaker"


class LocalEndpoint(Record):
    backend: Literal["local"] = "local"
    url: str
    pid: int  # the background `bincount serve` process (group leader)
    model_dir: str


class SageMakerEndpoint(Record):
    backend: Literal["sagemaker"] = "sagemaker"
    name: str
    mode: str  # realtime or serverless
    model_data: str
    config_name: str | None = None
    model_name: str | None = None
    model_ref: str | None = None  # the artifact before upload (sha256:<local file digest>, or its S3 URI)
    serving: dict[str, Any] | None = None  # the deploy settings it runs with (endpoint.serving_settings)


class SageMakerTransform(Record):
    """The last `audit --backend sagemaker`: its Batch Transform job and what joining its outputs needs."""

    backend: Literal["sagemaker"] = "sagemaker"
    job: str  # the transform job name
    status: str  # TransformJobStatus when last seen
    model_name: str  # the SageMaker model it ran (reused by the next audit of the same artifact)
    model_data: str  # that model's model.tar.gz in S3
    model_ref: str | None = None  # the artifact before upload: sha256 of a local file, or its S3 URI
    input_manifest: str  # s3:// URI of the transform's ManifestFile
    input_prefix: str  # s3://bucket/prefix/ the manifest's entries are relative to
    input_key_prefix: str  # that prefix's key part
    output_path: str  # s3://.../transform/<job>/: one <entry>.out per input object
    bins: int
    bins_file: str  # local JSON Lines of the bins (ids, images, expected quantities or label paths)
    source: str  # what was audited, as given
    source_digest: str  # digest of that input (an unjoined job over the same bins is joined, not rerun)
    joined: bool = False  # its outputs went into a report


class SageMakerProcessing(Record):
    """The last `shard --backend sagemaker`: its Processing job and the shard channels it writes, which become
    state.json's channels only once it has completed (`status`, `train` and `tune` refresh it)."""

    backend: Literal["sagemaker"] = "sagemaker"
    job: str  # the processing job name
    status: str  # ProcessingJobStatus when last seen
    channels: dict[str, str]  # split -> s3:// URI it writes


Training = Annotated[LocalTraining | SageMakerTraining, Field(discriminator="backend")]
Tuning = Annotated[LocalTuning | SageMakerTuning, Field(discriminator="backend")]
Endpoint = Annotated[LocalEndpoint | SageMakerEndpoint, Field(discriminator="backend")]

_KINDS: dict[str, dict[str, type[Record]]] = {
    "training": {"local": LocalTraining, "sagemaker": SageMakerTraining},
    "tuning": {"local": LocalTuning, "sagemaker": SageMakerTuning},
    "endpoint": {"local": LocalEndpoint, "sagemaker": SageMakerEndpoint},
    "transform": {"sagemaker": SageMakerTransform},
    "processing": {"sagemaker": SageMakerProcessing},
}


class State(Record):
    """The whole of state.json. A section that is None is absent from the file."""

    workdir_id: str | None = None  # this work dir's id: the bincount:workdir tag on what it made on AWS
    channels: dict[str, str] = {}  # split -> s3:// URI
    channel_format: Literal["files", "shards"] | None = None  # what the channels hold (None: files, older work dirs)
    training_pending: PendingTraining | None = None
    training: Training | None = None
    tuning: Tuning | None = None
    endpoint: Endpoint | None = None
    transform: SageMakerTransform | None = None
    processing: SageMakerProcessing | None = None  # the shard Processing job (its channels count once it completed)
    runs: list[Training] = []  # the training runs before `training` (the newest), oldest first
    use: str | None = None  # the run evaluate, deploy, predict and audit use (`bincount runs --use`); None: `training`

    def all_runs(self) -> list[LocalTraining | SageMakerTraining]:
        """Every recorded training run, oldest first (the newest is `training`)."""
        return [*self.runs, *([self.training] if self.training else [])]

    def with_training(self, new: LocalTraining | SageMakerTraining) -> dict[str, Any]:
        """The changes that record `new` as the newest run: an update of the same job keeps what the old
        record knew and the new one does not set; another job moves the previous record into `runs`."""
        old = self.training
        if old is not None and (old.backend, old.job) == (new.backend, new.job):
            return {"training": old.model_copy(update=new.model_dump(exclude_unset=True))}
        for i, run in enumerate(self.runs):  # news of an older run (e.g. deploy describing a pinned job): it stays older
            if (run.backend, run.job) == (new.backend, new.job):
                runs = list(self.runs)
                runs[i] = run.model_copy(update=new.model_dump(exclude_unset=True))
                return {"training": old, "runs": runs}
        return {"training": new, "runs": [*self.runs, *([old] if old else [])]}

    @classmethod
    def load(cls, raw: Any, path: Path | str = "state.json") -> State:
        """Validate what was read from `path`, less the keys this version does not know (see above)."""
        if not isinstance(raw, dict):
            raise BincountError(f"{path} is not a JSON object; fix or delete it")
        data: dict[str, Any] = {}
        for key, value in raw.items():
            if key not in cls.model_fields or value is None:
                continue
            if key in _KINDS and isinstance(value, dict):
                value = _known_keys(key, value)
            elif key == "runs" and isinstance(value, list):
                value = [_known_keys("training", r) if isinstance(r, dict) else r for r in value]
            elif key == "training_pending" and isinstance(value, dict):
                value = {k: v for k, v in value.items() if k in PendingTraining.model_fields}
            data[key] = value
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            raise BincountError(f"{path}: {where}: {first['msg']}; fix or delete it") from None

    def dump(self) -> str:
        data = self.model_dump(mode="json", exclude_none=True)
        for key in ("channels", "runs"):
            if not data[key]:
                del data[key]  # not uploaded, or never trained, yet
        return json.dumps(data, indent=2, sort_keys=True) + "\n"


def _known_keys(section: str, record: dict[str, Any]) -> dict[str, Any]:
    """A record as read from a file, less the keys its class does not know."""
    kind = _KINDS[section].get(record.get("backend"))  # type: ignore[arg-type]
    if kind is None:
        return record  # no or an unknown backend: validation names it
    return {k: v for k, v in record.items() if k in kind.model_fields}
