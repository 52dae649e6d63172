"""The SageMaker pieces the stages share: session, PyTorch estimator, Debugger rules, channels, errors."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
import tempfile
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bincount.aws import bucket_region, error_code, error_message
from bincount.aws import job_region as region
from bincount.config import Settings
from bincount.console import log
from bincount.debugger import Finding
from bincount.errors import BincountError
from bincount.workspace import Workspace

# Tensors the built-in rules read, saved through each rule's `collections_to_save` (one definition
# per collection, so the hook config the SDK merges from the rules has no conflicting duplicates).
# The rules themselves: bincount.debugger.RULES; relu_input's include_regex depends on the architecture
# (activation_inputs_regex).
COLLECTIONS = {
    "gradients": {"save_interval": "100"},
    "losses": {"save_interval": "20"},
    "relu_input": {"save_interval": "200"},
}
# The inputs of each architecture's activation modules, as smdebug names them ("<module name>_input_<i>",
# the module name from named_modules() of the model train.py registers). torchvision's ResNets call
# their ReLU modules "relu"; MobileNetV3 has unnamed activations (ReLU or Hardswish) as child 2 of
# each Conv2dNormActivation ("features.1.block.0.2", "features.12.2") and a Hardswish "classifier.1".
ACTIVATION_INPUTS = {
    "resnet": r".*relu_input",
    "mobilenet_v3": r"^(features\.\d+(\.block\.\d+)?\.2|classifier\.1)_input_\d+$",
}


def activation_inputs_regex(arch: str) -> str:
    """The regex for the tensors PoorWeightInitialization reads: the activation inputs of `arch`."""
    family = next((f for f in ACTIVATION_INPUTS if arch.startswith(f)), None)
    if family is None:
        raise BincountError(f"train.arch={arch!r}: no activation-input regex for PoorWeightInitialization; "
                            "switch the rule off with --set sagemaker.rules.poor_weight_initialization=false")
    return ACTIVATION_INPUTS[family]


def is_gpu_instance(instance_type: str) -> bool:
    """ml.p* and ml.g* instances have NVIDIA GPUs; ml.trn*/ml.inf* (Neuron) and the rest run train.py on CPU."""
    family = instance_type.removeprefix("ml.").split(".")[0]
    return family[:1] in ("p", "g")


def check_instances(settings: Settings) -> None:
    """Refuse, before any request, what SageMaker would reject or waste: DDP on CPU instances."""
    sm = settings.sagemaker
    if sm.instance_count > 1 and not is_gpu_instance(sm.instance_type):
        raise BincountError(
            f"sagemaker.instance_count={sm.instance_count} runs torch_distributed, which SageMaker runs on GPU "
            f"instances only and {sm.instance_type} has no NVIDIA GPU: use an ml.g*/ml.p* instance type or "
            "sagemaker.instance_count=1")


def container_dir() -> Path:
    """src/bincount/container: the source_dir SageMaker runs train.py and inference.py from."""
    import bincount.container

    return Path(bincount.container.__file__).parent


# The training job's source_dir: the script, the modules it imports and copies into the model's code/.
TRAINING_FILES = ("train.py", "net.py", "epochlog.py", "shards.py", "inference.py", "smdebug_compat.py")
# container/requirements.txt (smdebug and the two pyinstrument packages it imports) reaches a job only when the
# Debugger hook is on and the job can reach PyPI; this environment makes the toolkit's `pip install -r
# requirements.txt` install exactly those lines, so the container's torch, numpy and protobuf stay as they are.
SMDEBUG_ENVIRONMENT = {"PIP_NO_DEPS": "1"}


def installs_smdebug(settings: Settings) -> bool:
    """Does a training job install smdebug: a Debugger rule reads tensors and the job is not network-isolated."""
    from bincount.debugger import RULES

    switches = settings.sagemaker.rules
    return any(getattr(switches, field) for field in RULES) and not settings.sagemaker.enable_network_isolation


def training_code(dest: Path, install_smdebug: bool) -> Path:
    """The training source_dir: TRAINING_FILES, plus requirements.txt (smdebug) only when `install_smdebug`.

    Without a requirements.txt the SageMaker training toolkit installs nothing: the job needs no network.
    """
    dest.mkdir(parents=True, exist_ok=True)
    for name in TRAINING_FILES:
        shutil.copy(container_dir() / name, dest / name)
    if install_smdebug:
        shutil.copy(container_dir() / "requirements.txt", dest / "requirements.txt")
    return dest


def checkpoint_uri(settings: Settings, job: str) -> str:
    """The job's own checkpoint prefix (trailing slash: SageMaker syncs every key that starts with it).

    A tuning job's trials share their tuning job's prefix; train.py keeps each trial in a subfolder named
    after its training job.
    """
    base = settings.sagemaker.checkpoint_s3_uri or s3_uri(settings, "checkpoints")
    return f"{base.rstrip('/')}/{job}/"


def job_inputs(settings: Settings, sm_session: Any, hyperparameters: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The job's channels (data, and `weights` for train.pretrained) and its hyperparameters to match.

    imagenet: the torchvision file cached on this machine goes up once as the weights channel (that works
    under network isolation too); not cached, the job downloads it, which network isolation refuses.
    A local file goes up the same way; an s3:// URI is the channel as it is.
    """
    from sagemaker.inputs import TrainingInput

    from bincount.container import net

    inputs, hp = channels(settings), dict(hyperparameters)
    pretrained, arch = settings.train.pretrained, settings.train.arch
    if pretrained == "none":
        return inputs, hp
    if pretrained == "imagenet":
        cache = net.imagenet_cache_file(arch)
        if not cache.is_file():
            if settings.sagemaker.enable_network_isolation:
                raise BincountError(
                    f"train.pretrained=imagenet: the {arch} weights are not cached here ({cache}) and a network-isolated "
                    f"job cannot download them; cache them (python -c \"import torchvision; torchvision.models.{arch}"
                    "(weights='DEFAULT')\") or pass an s3:// URI of the file as train.pretrained")
            log(f"ImageNet weights for {arch} are not cached here: the job downloads them (torchvision)")
            hp.update(pretrained="imagenet", download_weights=True)
            return inputs, hp
        uri, hp["pretrained"] = upload_weights(settings, sm_session, cache), "imagenet"
    elif pretrained.startswith("s3://"):
        uri, hp["pretrained"] = pretrained, "channel"
    else:
        uri, hp["pretrained"] = upload_weights(settings, sm_session, Path(pretrained)), "channel"
    hp["weights_source"] = uri
    inputs["weights"] = TrainingInput(uri, distribution="FullyReplicated")
    return inputs, hp


def upload_weights(settings: Settings, sm_session: Any, path: Path) -> str:
    """Upload a weights file once, to s3://<bucket>/<prefix>/weights/<name>-<sha256 prefix><ext>; its URI."""
    from botocore.exceptions import ClientError

    from bincount.aws import parse_s3_uri, s3_client

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    uri = s3_uri(settings, "weights", f"{path.stem}-{digest.hexdigest()[:16]}{path.suffix}")
    bucket, key = parse_s3_uri(uri)
    s3 = s3_client(settings)
    try:
        if s3.head_object(Bucket=bucket, Key=key)["ContentLength"] == path.stat().st_size:
            return uri  # the name carries the digest: the same bytes are there already
    except ClientError as exc:
        if error_code(exc) not in ("404", "NoSuchKey", "NotFound"):
            raise
    log(f"uploading {path} to {uri}")
    s3.upload_file(str(path), bucket, key)
    return uri


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


def check_bucket_region(settings: Settings, s3: Any) -> None:
    """Refuse a bucket outside the jobs' region before any job is created."""
    from botocore.exceptions import ClientError

    from bincount.console import log

    jobs_in = region(settings)
    try:
        found = bucket_region(s3, require_bucket(settings))
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


def output_path(settings: Settings) -> str:
    return settings.sagemaker.output_path or s3_uri(settings, "output")


def session(settings: Settings) -> Any:
    """A sagemaker.Session in the jobs' region, default bucket s3.bucket, telemetry opted out if asked."""
    import boto3

    sagemaker = load_sdk()
    from sagemaker.config import load_sagemaker_config

    boto_session = boto3.Session(region_name=region(settings))
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

    state = Workspace(settings.workdir).state()
    recorded = state.channels
    uris = {name: uri for name, uri in recorded.items() if uri.startswith("s3://")}
    missing = [name for name in ("train", "val") if name not in uris]
    if missing:
        raise BincountError(f"no S3 {' and '.join(missing)} channel in state.json: run bincount upload first")
    # Shards are read once, front to back: FastFile streams them from S3 as they are read (no download first).
    mode = "FastFile" if state.channel_format == "shards" else None
    return {name: TrainingInput(uri, distribution="FullyReplicated", input_mode=mode) for name, uri in sorted(uris.items())}


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
        parameters = None
        configs = []
        for name in collections:
            params = dict(COLLECTIONS[name])
            if name == "relu_input":
                params["include_regex"] = activation_inputs_regex(settings.train.arch)
                parameters = {"activation_inputs_regex": params["include_regex"]}
            configs.append(CollectionConfig(name=name, parameters=params))
        rules.append(Rule.sagemaker(getattr(rule_configs, field)(), rule_parameters=parameters,
                                    collections_to_save=configs, actions=actions))
    if switches.profiler_report:
        rules.append(ProfilerRule.sagemaker(rule_configs.ProfilerReport()))
    return rules


def estimator(settings: Settings, sm_session: Any, hyperparameters: dict[str, Any], job: str) -> Any:
    """The PyTorch estimator over container/ that train and tune both use; `job` names the checkpoint prefix."""
    from sagemaker.debugger import ProfilerConfig, Rule
    from sagemaker.pytorch import PyTorch

    from bincount.container.epochlog import METRIC_DEFINITIONS

    sm = settings.sagemaker
    check_instances(settings)
    role = require_role(settings)
    out = output_path(settings)
    rules = debugger_rules(settings)
    kwargs: dict[str, Any] = {}
    if sm.use_spot_instances:
        max_wait = sm.max_wait_s or sm.max_run_s
        if max_wait < sm.max_run_s:
            raise BincountError(f"sagemaker.max_wait_s ({max_wait}) must be at least sagemaker.max_run_s ({sm.max_run_s})")
        kwargs.update(use_spot_instances=True, max_wait=max_wait, checkpoint_s3_uri=checkpoint_uri(settings, job))
    elif sm.checkpoint_s3_uri:
        kwargs["checkpoint_s3_uri"] = checkpoint_uri(settings, job)
    if sm.instance_count > 1:
        kwargs["distribution"] = {"torch_distributed": {"enabled": True}}
    if not any(isinstance(r, Rule) for r in rules):
        kwargs["debugger_hook_config"] = False  # no debugger rule reads tensors: no hook
    if sm.image_uri:
        kwargs["image_uri"] = check_image_uri(sm.image_uri, region(settings), "sagemaker.image_uri")
    smdebug = installs_smdebug(settings)
    if smdebug:
        kwargs["environment"] = dict(SMDEBUG_ENVIRONMENT)
    code = training_code(Path(tempfile.mkdtemp(prefix="bincount-code-")), smdebug)
    est = PyTorch(
        entry_point="train.py",
        source_dir=str(code),
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
        tags=tags(settings),
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
    weakref.finalize(est, shutil.rmtree, code, True)  # the SDK tars source_dir when the job starts
    return est


def tags(settings: Settings) -> list[dict[str, str]] | None:
    """settings.sagemaker.tags as the API takes them (on jobs, models, endpoint configs and endpoints)."""
    return [{"Key": k, "Value": v} for k, v in settings.sagemaker.tags.items()] or None


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


RULE_POLL_S = 20.0  # between DescribeTrainingJob calls while rule evaluations run


def pending_rules(description: dict[str, Any]) -> list[str]:
    """The rules whose evaluation is still InProgress."""
    return [r["rule"] for r in rule_statuses(description) if r["status"] == "InProgress"]


def wait_for_rules(client: Any, description: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """After the job ends: describe it until no rule evaluation is InProgress, for at most timeout_s.

    Rule evaluations run in their own processing jobs and finish minutes after the training job.
    Progress goes to stderr; Ctrl-C stops the waiting only (the job has ended, the rules go on).
    """
    from bincount.console import log

    job = description["TrainingJobName"]
    start = time.monotonic()
    try:
        while (pending := pending_rules(description)) and time.monotonic() - start < timeout_s:
            log(f"waiting for rule evaluations: {', '.join(pending)} ({time.monotonic() - start:.0f} s of at most "
                f"{timeout_s:.0f} s; Ctrl-C stops waiting)")
            time.sleep(RULE_POLL_S)
            description = client.describe_training_job(TrainingJobName=job)
    except KeyboardInterrupt:
        log("stopped waiting for the rule evaluations")
    if pending_rules(description):
        log(f"rules still evaluating: {', '.join(pending_rules(description))}; `bincount status` shows their "
            "verdicts and fetches the profiler report later")
    return description


def rule_statuses(description: dict[str, Any]) -> list[Finding]:
    """Debugger and profiler rule evaluation statuses from describe_training_job, as debugger findings."""
    rows: list[Finding] = []
    for key in ("DebugRuleEvaluationStatuses", "ProfilerRuleEvaluationStatuses"):
        for item in description.get(key) or []:
            rows.append({"rule": item.get("RuleConfigurationName", "?"), "status": item.get("RuleEvaluationStatus", "?"),
                         "detail": item.get("StatusDetails", ""), "source": "SageMaker"})
    return rows


def download_profiler_report(settings: Settings, s3: Any, description: dict[str, Any]) -> str | None:
    """Copy <output>/<job>/rule-output/ProfilerReport*/ to <workdir>/reports/profiler/<job>/; the folder or None.

    None while the ProfilerReport rule is still evaluating (its report is written when it ends).
    """
    from bincount.aws import parse_s3_uri

    if "ProfilerReport" in " ".join(pending_rules(description)):
        return None
    job = description["TrainingJobName"]
    base = (description.get("OutputDataConfig") or {}).get("S3OutputPath") or output_path(settings)
    bucket, prefix = parse_s3_uri(base.rstrip("/") + f"/{job}/rule-output/")
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
