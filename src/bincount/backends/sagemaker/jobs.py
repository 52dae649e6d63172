"""What every SageMaker job shares, and `bincount stop`.

The SDK session (one per command, on the command's `bincount.aws.Aws`), the SDK's output kept off
stdout, AWS errors as one line, the role, bucket, S3 locations, tags and image checks of a request,
Ctrl-C while waiting on a job, and stopping a training, tuning, Batch Transform or Processing job.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bincount.aws import Aws, bucket_region, error_code, error_message
from bincount.config import Settings
from bincount.console import confirm, log
from bincount.errors import BincountError
from bincount.results import Result
from bincount.state import SageMakerProcessing, SageMakerTraining, SageMakerTransform, SageMakerTuning, State
from bincount.workspace import Workspace


@contextlib.contextmanager
def aws_errors(action: str) -> Iterator[None]:
    """Turn AWS / SDK failures into one-line BincountErrors (no credentials ever appear in them)."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    try:
        yield
    except BincountError:
        raise
    except NoCredentialsError:
        raise BincountError(f"{action}: no AWS credentials found (configure a profile or AWS_* variables)") from None
    except ClientError as exc:
        raise BincountError(f"{action}: {error_code(exc) or 'error'}: {error_message(exc) or exc}") from None
    except BotoCoreError as exc:
        raise BincountError(f"{action}: {exc}") from None
    except Exception as exc:  # the SDK raises ValueError/RuntimeError/UnexpectedStatusException
        if type(exc).__module__.startswith("sagemaker") or isinstance(exc, (ValueError, RuntimeError)):
            message = " ".join(str(exc).split())
            raise BincountError(f"{action}: {message}") from None
        raise


def load_sdk() -> Any:
    """Import the SageMaker SDK with its stdout log handlers pointed at stderr (stdout is for results)."""
    import logging

    # SDK v2 is what we use on purpose (v3 dropped the Estimator and its Debugger rules): no nagging.
    os.environ.setdefault("SAGEMAKER_SUPPRESS_V2_WARNING", "1")
    with contextlib.redirect_stdout(sys.stderr):
        import sagemaker
    for name in ("sagemaker.config", "sagemaker"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream in (sys.stdout, sys.__stdout__):
                handler.setStream(sys.stderr)
    logging.getLogger("sagemaker.config").setLevel(logging.WARNING)
    _validate_config_with_one_validator(sagemaker)
    _read_endpoints_once(sagemaker)
    return sagemaker


def _read_endpoints_once(sagemaker: Any) -> None:
    """The SDK reads and parses botocore's endpoints.json (80 ms of CPU) at every image URI lookup, several per
    job or model: keep the resolver it builds from it (read-only data from the installed botocore)."""
    import functools

    if not hasattr(sagemaker.utils._botocore_resolver, "cache_info"):
        sagemaker.utils._botocore_resolver = functools.cache(sagemaker.utils._botocore_resolver)


def _validate_config_with_one_validator(sagemaker: Any) -> None:
    """The SDK validates its config against its JSON schema at every config lookup with jsonschema.validate,
    which checks the schema itself first each time: 0.18 s of CPU a lookup, ~90 lookups (16 s) for one
    tuning job once the telemetry opt-out makes the config non-empty. Validate the same way (best_match of
    every error) with one validator made once."""
    import jsonschema
    from sagemaker.config.config_schema import SAGEMAKER_PYTHON_SDK_CONFIG_SCHEMA as schema

    if getattr(sagemaker.utils.validate_sagemaker_config, "one_validator", False):
        return
    validator = jsonschema.validators.validator_for(schema)(schema)

    def validate_sagemaker_config(sagemaker_config: dict | None = None) -> None:
        error = jsonschema.exceptions.best_match(validator.iter_errors(sagemaker_config))
        if error is not None:
            raise error

    validate_sagemaker_config.one_validator = True  # type: ignore[attr-defined]
    for module in (sagemaker.utils, sagemaker.session, sagemaker.config, sagemaker.config.config):
        module.validate_sagemaker_config = validate_sagemaker_config


@contextlib.contextmanager
def sdk_output() -> Iterator[None]:
    """The SDK prints logs and progress dots on stdout; send them to stderr (stdout is for results)."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def session(aws: Aws) -> Any:
    """The command's sagemaker.Session (made once): the jobs' region, default bucket s3.bucket, telemetry opt-out."""
    return aws.once("sagemaker.Session", lambda: _new_session(aws))


def _new_session(aws: Aws) -> Any:
    sagemaker = load_sdk()
    from sagemaker.config import load_sagemaker_config

    settings, config = aws.settings, None
    if settings.sagemaker.telemetry_opt_out:
        config = load_sagemaker_config() or {}
        config.setdefault("SchemaVersion", "1.0")
        modules = config.setdefault("SageMaker", {}).setdefault("PythonSDK", {}).setdefault("Modules", {})
        modules["TelemetryOptOut"] = True
    return sagemaker.Session(boto_session=aws.boto_session, default_bucket=settings.s3.bucket,
                             default_bucket_prefix=None, sagemaker_config=config)


def require_role(settings: Settings) -> str:
    if not settings.sagemaker.role:
        raise BincountError(
            "set sagemaker.role to an IAM role ARN SageMaker can assume "
            "(--set sagemaker.role=arn:aws:iam::123456789012:role/SageMakerRole or BINCOUNT_SAGEMAKER__ROLE)")
    return settings.sagemaker.role


def require_bucket(settings: Settings) -> str:
    if not settings.s3.bucket:
        raise BincountError("set s3.bucket (the bucket for channels, code and model artifacts), e.g. --set s3.bucket=my-bucket")
    return settings.s3.bucket


def check_bucket_region(aws: Aws) -> None:
    """Refuse a bucket outside the jobs' region before any job is created."""
    from botocore.exceptions import ClientError

    from bincount.console import log

    settings, jobs_in = aws.settings, aws.job_region
    try:
        found = bucket_region(aws.s3(), require_bucket(settings))
    except ClientError as exc:
        if error_code(exc) not in ("AccessDenied", "403"):
            raise
        log(f"warning: cannot check the region of bucket {settings.s3.bucket} (no s3:GetBucketLocation); "
            f"it must be {jobs_in}")
        return
    if found != jobs_in:
        raise BincountError(f"bucket {settings.s3.bucket} is in {found} but the SageMaker jobs run in {jobs_in}: "
                            f"use a bucket in {jobs_in} or --set sagemaker.region={found}")


def s3_uri(settings: Settings, *parts: str) -> str:
    prefix = settings.s3.prefix.strip("/")
    return "s3://" + "/".join(p for p in (require_bucket(settings), prefix, *parts) if p)


def s3_keys(s3: Any, uri: str) -> list[str]:
    """Every key under the S3 prefix `uri` (as a folder: `<prefix>/`, never `<prefix>X`)."""
    from bincount.aws import parse_s3_uri

    bucket, key = parse_s3_uri(uri)
    keys = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{key}/"):
        keys += [obj["Key"] for obj in page.get("Contents", [])]
    return keys


def delete_keys(s3: Any, bucket: str, keys: list[str]) -> int:
    """Delete `keys` from `bucket` (DeleteObjects, 1000 at a time); the count deleted. The first error raises."""
    for start in range(0, len(keys), 1000):
        batch = [{"Key": k} for k in keys[start:start + 1000]]
        answer = s3.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
        if answer.get("Errors"):
            err = answer["Errors"][0]
            raise BincountError(f"could not delete s3://{bucket}/{err['Key']}: {err.get('Message')}")
    return len(keys)


def drop_checkpoints(aws: Aws, uri: str | None, keep: bool) -> int:
    """After a tuning job completed: delete its checkpoint prefix `uri` in S3 unless train.keep_checkpoint. Each
    trial removes its own checkpoint when it ends; a trial the tuner stopped early leaves its own there, and
    nothing resumes it (a job name is never reused). The count of objects deleted. Best effort: a failure is a
    warning (the job's result is recorded all the same; `bincount cleanup` deletes the prefix later)."""
    from botocore.exceptions import BotoCoreError, ClientError

    from bincount.aws import parse_s3_uri

    if keep or not uri:
        return 0
    try:
        s3 = aws.s3()
        deleted = delete_keys(s3, parse_s3_uri(uri)[0], s3_keys(s3, uri))
    except (BotoCoreError, ClientError, BincountError) as exc:
        log(f"warning: the checkpoints under {uri} were not deleted ({error_message(exc) or exc}); "
            "`bincount cleanup` deletes them")
        return 0
    if deleted:
        log(f"deleted the {deleted} checkpoint objects under {uri} (train.keep_checkpoint=true keeps them)")
    return deleted


def output_path(settings: Settings) -> str:
    return settings.sagemaker.output_path or s3_uri(settings, "output")


OWNER_TAG = "bincount:workdir"  # its value: the work dir's id; `bincount cleanup` deletes only what carries it


def tags(settings: Settings) -> list[dict[str, str]]:
    """settings.sagemaker.tags as the API takes them (on jobs, models, endpoint configs and endpoints), and
    bincount's own tag naming the work dir that made them."""
    own = {"Key": OWNER_TAG, "Value": Workspace(settings.workdir).identity()}
    return [{"Key": k, "Value": v} for k, v in settings.sagemaker.tags.items() if k != OWNER_TAG] + [own]


def check_image_uri(uri: str, job_region: str, key: str) -> str:
    """An ECR image URI in the job's region (SageMaker pulls only from ECR in its own region)."""
    import re

    match = re.fullmatch(r"\d{12}\.dkr\.ecr(-fips)?\.([a-z0-9-]+)\.amazonaws\.com(\.cn)?/[a-z0-9._/-]+"
                         r"(:[\w.-]{1,128}|@sha256:[0-9a-f]{64})", uri)
    if not match:
        raise BincountError(f"{key}={uri!r} is not an ECR image URI like "
                            "763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch-training:2.8.0-gpu-py312-cu129-ubuntu22.04-sagemaker")
    if match.group(2) != job_region:
        raise BincountError(f"{key}: the image is in {match.group(2)} but the jobs run in {job_region}; "
                            "use the same image from the job region's registry")
    return uri


def timestamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime())


def container_dir() -> Path:
    """src/bincount/container: the source_dir SageMaker runs train.py and inference.py from."""
    import bincount.container

    return Path(bincount.container.__file__).parent


def missing(exc: Any) -> bool:
    message = (error_message(exc) or "").lower()
    return error_code(exc) == "ResourceNotFound" or "could not find" in message or "does not exist" in message


def interrupted(kind: str, job: str, stop: Any) -> None:
    """Ctrl-C while waiting: the job runs on (and bills) unless stopped; ask where a person can answer."""
    import typer

    if sys.stdin.isatty() and sys.stderr.isatty():
        try:
            answer = typer.confirm(f"\nStop {kind} job {job}? Otherwise it keeps running (and billing)",
                                   default=True, err=True)
        except (KeyboardInterrupt, EOFError, typer.Abort):
            answer = False
        if answer:
            with aws_errors(f"stop {kind} job {job}"):
                stop()
            raise KeyboardInterrupt(f"interrupted: stopping {kind} job {job} (bincount status shows when it has stopped)")
    raise KeyboardInterrupt(f"interrupted: {kind} job {job} keeps running and billing; stop it with "
                            f"`bincount stop --job {job} --yes`, or follow it with `bincount status`")


class StopResult(Result):
    backend: str = "sagemaker"  # always sagemaker
    stopped: list[str] = []  # "training job NAME" / "tuning job NAME" / "transform job NAME" / "processing job NAME"
    not_running: list[str] = []  # the same, with the status they were found in
    kept: bool = False  # true when the confirmation was declined: the running jobs were left running

    def title(self) -> str:
        return "stop (sagemaker)"


# kind -> (Describe method, Stop method, name parameter, status field): the four kinds of job bincount starts
KINDS = {
    "training": ("describe_training_job", "stop_training_job", "TrainingJobName", "TrainingJobStatus"),
    "tuning": ("describe_hyper_parameter_tuning_job", "stop_hyper_parameter_tuning_job", "HyperParameterTuningJobName",
               "HyperParameterTuningJobStatus"),
    "transform": ("describe_transform_job", "stop_transform_job", "TransformJobName", "TransformJobStatus"),
    "processing": ("describe_processing_job", "stop_processing_job", "ProcessingJobName", "ProcessingJobStatus"),
}


def job_status(client: Any, job: str, kinds: Any = KINDS) -> tuple[str, str] | None:
    """(kind, status) of a job name (kind: training, tuning, transform or processing), or None if SageMaker
    knows no job of those kinds by that name."""
    from botocore.exceptions import ClientError

    for kind in kinds:
        describe, _, key, field = KINDS[kind]
        try:
            return kind, getattr(client, describe)(**{key: job})[field]
        except ClientError as exc:
            if not missing(exc) and error_code(exc) != "ValidationException":
                raise
    return None


def stop_job(client: Any, kind: str, job: str) -> None:
    """StopTrainingJob / StopHyperParameterTuningJob / StopTransformJob / StopProcessingJob."""
    _, stop_call, key, _ = KINDS[kind]
    getattr(client, stop_call)(**{key: job})


Recorded = SageMakerTraining | SageMakerTuning | SageMakerTransform | SageMakerProcessing


def recorded_jobs(state: State) -> list[tuple[str, Recorded]]:
    """(kind, record) of the SageMaker jobs state.json knows that may run: the newest training, tuning,
    Batch Transform and Processing jobs, and any older training run last seen running (a `runs --use` pin
    never hides one)."""
    older = [("training", r) for r in state.runs if isinstance(r, SageMakerTraining) and r.status in ("InProgress", "Stopping")]
    newest = [(kind, r) for kind, r in (("training", state.training), ("tuning", state.tuning),
                                         ("transform", state.transform), ("processing", state.processing))
              if getattr(r, "backend", None) == "sagemaker"]
    return [*older, *newest]  # type: ignore[list-item]


def stop(settings: Settings, job: str | None = None, yes: bool = False) -> StopResult:
    """Stop a running SageMaker job: the named one, else the recorded ones still running."""
    aws = Aws(settings)
    sm = aws.client("sagemaker", region=aws.job_region)
    state = Workspace(settings.workdir).state()
    if job:
        names = [(None, job)]
    else:
        names = [(kind, r.job) for kind, r in recorded_jobs(state)]
        if not names:
            raise BincountError("no SageMaker training, tuning, transform or processing job recorded in state.json: "
                                "pass --job NAME")
    running, not_running = [], []
    with aws_errors("sagemaker stop"):
        for known, name in names:
            found = job_status(sm, name, [known] if known else KINDS)
            if found is None:
                raise BincountError(f"no SageMaker training, tuning, transform or processing job named {name} "
                                    f"in {aws.job_region}")
            kind, status = found
            (running if status == "InProgress" else not_running).append((kind, name, status))
        result = StopResult(not_running=[f"{kind} job {name} ({status})" for kind, name, status in not_running])
        for line in result.not_running:
            log(f"not running: {line}")
        if not running:
            return result
        listed = ", ".join(f"{kind} job {name}" for kind, name, _ in running)
        if not confirm(f"Stop {listed}?", yes):
            log("left running")
            return result.model_copy(update={"kept": True})
        for kind, name, _ in running:
            stop_job(sm, kind, name)
            result.stopped.append(f"{kind} job {name}")
            log(f"stopping {kind} job {name} (bincount status shows when it has stopped)")
    return result
