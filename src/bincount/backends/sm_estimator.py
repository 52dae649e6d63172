"""The SageMaker pieces the stages share: session, PyTorch estimator, Debugger rules, channels, errors."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bincount.aws import error_code, error_message
from bincount.config import Settings
from bincount.debugger import Finding
from bincount.errors import BincountError
from bincount.workspace import Workspace

# Tensors the built-in rules read, saved through each rule's `collections_to_save` (one definition
# per collection, so the hook config the SDK merges from the rules has no conflicting duplicates).
# The rules themselves: bincount.debugger.RULES.
COLLECTIONS = {
    "gradients": {"save_interval": "100"},
    "losses": {"save_interval": "20"},
    "relu_input": {"include_regex": ".*relu_input", "save_interval": "200"},
}


def container_dir() -> Path:
    """src/bincount/container: the source_dir SageMaker runs train.py and inference.py from."""
    import bincount.container

    return Path(bincount.container.__file__).parent


def serving_code(dest: Path) -> Path:
    """The endpoint's source_dir: only the serving handlers, and no training requirements (no smdebug)."""
    from bincount.artifacts import write_serving_code

    return write_serving_code(dest)


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
    return sagemaker


@contextlib.contextmanager
def sdk_output() -> Iterator[None]:
    """The SDK prints logs and progress dots on stdout; send them to stderr (stdout is for results)."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


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


def s3_uri(settings: Settings, *parts: str) -> str:
    prefix = settings.s3.prefix.strip("/")
    return "s3://" + "/".join(p for p in (require_bucket(settings), prefix, *parts) if p)


def output_path(settings: Settings) -> str:
    return settings.sagemaker.output_path or s3_uri(settings, "output")


def session(settings: Settings) -> Any:
    """A sagemaker.Session in settings.sagemaker.region, default bucket s3.bucket, telemetry opted out if asked."""
    import boto3

    sagemaker = load_sdk()
    from sagemaker.config import load_sagemaker_config

    boto_session = boto3.Session(region_name=settings.sagemaker.region)
    config = None
    if settings.sagemaker.telemetry_opt_out:
        config = load_sagemaker_config() or {}
        config.setdefault("SchemaVersion", "1.0")
        modules = config.setdefault("SageMaker", {}).setdefault("PythonSDK", {}).setdefault("Modules", {})
        modules["TelemetryOptOut"] = True
    return sagemaker.Session(boto_session=boto_session, default_bucket=settings.s3.bucket,
                             default_bucket_prefix=None, sagemaker_config=config)


def channels(settings: Settings) -> dict[str, Any]:
    """TrainingInputs from state["channels"] (written by `bincount upload`)."""
    from sagemaker.inputs import TrainingInput

    recorded = Workspace(settings.workdir).state().channels
    uris = {name: uri for name, uri in recorded.items() if uri.startswith("s3://")}
    missing = [name for name in ("train", "val") if name not in uris]
    if missing:
        raise BincountError(f"no S3 {' and '.join(missing)} channel in state.json: run bincount upload first")
    return {name: TrainingInput(uri, distribution="FullyReplicated") for name, uri in sorted(uris.items())}


def debugger_rules(settings: Settings) -> list[Any]:
    """The enabled built-in Debugger rules (collections via collections_to_save) and the ProfilerReport rule."""
    from sagemaker.debugger import CollectionConfig, ProfilerRule, Rule, rule_configs

    from bincount.debugger import RULES

    switches = settings.sagemaker.rules
    rules: list[Any] = []
    for field, (_, collections) in RULES.items():
        if not getattr(switches, field):
            continue
        actions = rule_configs.ActionList(rule_configs.StopTraining()) if switches.stop_training_on_failure else None
        rules.append(Rule.sagemaker(
            getattr(rule_configs, field)(),
            collections_to_save=[CollectionConfig(name=c, parameters=dict(COLLECTIONS[c])) for c in collections],
            actions=actions,
        ))
    if switches.profiler_report:
        rules.append(ProfilerRule.sagemaker(rule_configs.ProfilerReport()))
    return rules


def estimator(settings: Settings, sm_session: Any, hyperparameters: dict[str, Any]) -> Any:
    """The PyTorch estimator over container/ that train and tune both use."""
    from sagemaker.debugger import ProfilerConfig, Rule
    from sagemaker.pytorch import PyTorch

    from bincount.container.epochlog import METRIC_DEFINITIONS

    sm = settings.sagemaker
    role = require_role(settings)
    out = output_path(settings)
    rules = debugger_rules(settings)
    kwargs: dict[str, Any] = {}
    if sm.use_spot_instances:
        max_wait = sm.max_wait_s or sm.max_run_s
        if max_wait < sm.max_run_s:
            raise BincountError(f"sagemaker.max_wait_s ({max_wait}) must be at least sagemaker.max_run_s ({sm.max_run_s})")
        kwargs.update(use_spot_instances=True, max_wait=max_wait,
                      checkpoint_s3_uri=sm.checkpoint_s3_uri or s3_uri(settings, "checkpoints"))
    elif sm.checkpoint_s3_uri:
        kwargs["checkpoint_s3_uri"] = sm.checkpoint_s3_uri
    if sm.instance_count > 1:
        kwargs["distribution"] = {"torch_distributed": {"enabled": True}}
    if not any(isinstance(r, Rule) for r in rules):
        kwargs["debugger_hook_config"] = False  # no debugger rule reads tensors: no hook
    return PyTorch(
        entry_point="train.py",
        source_dir=str(container_dir()),
        framework_version=sm.framework_version,
        py_version=sm.py_version,
        role=role,
        instance_type=sm.instance_type,
        instance_count=sm.instance_count,
        volume_size=sm.volume_size_gb,
        max_run=sm.max_run_s,
        output_path=out,
        code_location=out,
        base_job_name=sm.base_job_name,
        hyperparameters=hyperparameters,
        metric_definitions=[dict(m) for m in METRIC_DEFINITIONS],
        tags=[{"Key": k, "Value": v} for k, v in sm.tags.items()] or None,
        subnets=sm.subnets,
        security_group_ids=sm.security_group_ids,
        volume_kms_key=sm.volume_kms_key,
        output_kms_key=sm.output_kms_key,
        enable_network_isolation=sm.enable_network_isolation,
        rules=rules or None,
        # System metrics only: framework profiling is deprecated for PyTorch 2.x (and malformed in the SDK).
        profiler_config=ProfilerConfig(system_monitor_interval_millis=500),
        sagemaker_session=sm_session,
        **kwargs,
    )


def rule_statuses(description: dict[str, Any]) -> list[Finding]:
    """Debugger and profiler rule evaluation statuses from describe_training_job, as debugger findings."""
    rows: list[Finding] = []
    for key in ("DebugRuleEvaluationStatuses", "ProfilerRuleEvaluationStatuses"):
        for item in description.get(key) or []:
            rows.append({"rule": item.get("RuleConfigurationName", "?"), "status": item.get("RuleEvaluationStatus", "?"),
                         "detail": item.get("StatusDetails", ""), "source": "SageMaker"})
    return rows


def download_profiler_report(settings: Settings, sm_session: Any, description: dict[str, Any]) -> str | None:
    """Copy <output>/<job>/rule-output/ProfilerReport*/ to <workdir>/reports/profiler/<job>/; the folder or None."""
    from bincount.aws import parse_s3_uri

    job = description["TrainingJobName"]
    base = (description.get("OutputDataConfig") or {}).get("S3OutputPath") or output_path(settings)
    bucket, prefix = parse_s3_uri(base.rstrip("/") + f"/{job}/rule-output/")
    s3 = sm_session.boto_session.client("s3")
    target = Workspace(settings.workdir).reports / "profiler" / job
    found = False
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        for obj in page.get("Contents", []):
            rel = obj["Key"][len(prefix) + 1:]
            if not rel.startswith("ProfilerReport") or rel.endswith("/") or ".." in rel.split("/"):
                continue
            dest = target / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, obj["Key"], str(dest))
            found = True
    return str(target) if found else None


def timestamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime())
