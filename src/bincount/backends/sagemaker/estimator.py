"""The PyTorch estimator that training and tuning jobs share: code, channels, weights, hyperparameters."""

from __future__ import annotations

import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any

from bincount.aws import Aws, error_code, job_region
from bincount.backends.sagemaker import debugger, jobs
from bincount.backends.tuning import best_train_settings
from bincount.config import Settings
from bincount.console import log
from bincount.errors import BincountError
from bincount.workspace import Workspace, file_sha256


def train_hyperparameters(settings: Settings, epochs: int | None = None) -> dict[str, Any]:
    train = best_train_settings(settings)
    hp = train.hyperparameters(settings.data.max_count)
    if epochs is not None:
        hp["epochs"] = epochs
    return hp


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


# The training job's source_dir: the script, the modules it imports and copies into the model's code/.
TRAINING_FILES = ("train.py", "hparams.py", "batches.py", "checkpoints.py", "loop.py", "debughook.py", "net.py",
                  "epochlog.py", "shards.py", "inference.py", "smdebug_compat.py")


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
        shutil.copy(jobs.container_dir() / name, dest / name)
    if install_smdebug:
        shutil.copy(jobs.container_dir() / "requirements.txt", dest / "requirements.txt")
    return dest


def checkpoint_uri(settings: Settings, job: str) -> str:
    """The job's own checkpoint prefix (trailing slash: SageMaker syncs every key that starts with it).

    A tuning job's trials share their tuning job's prefix; train.py keeps each trial in a subfolder named
    after its training job.
    """
    base = settings.sagemaker.checkpoint_s3_uri or jobs.s3_uri(settings, "checkpoints")
    return f"{base.rstrip('/')}/{job}/"


def job_inputs(aws: Aws, hyperparameters: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The job's channels (data, and `weights` for train.pretrained) and its hyperparameters to match.

    imagenet: the torchvision file cached on this machine goes up once as the weights channel (that works
    under network isolation too); not cached, the job downloads it, which network isolation refuses.
    A local file goes up the same way; an s3:// URI is the channel as it is.
    """
    from sagemaker.inputs import TrainingInput

    from bincount.backends.sagemaker.processing import check_channels

    settings = aws.settings
    check_channels(aws)  # not while the shard Processing job runs or after it failed
    inputs, hp = channels(settings), dict(hyperparameters)
    pretrained, arch = settings.train.pretrained, settings.train.arch
    if pretrained == "none":
        return inputs, hp
    if pretrained == "imagenet":
        from bincount.container import net  # torch and torchvision: 2-3 s to import, only for this branch

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
        uri, hp["pretrained"] = upload_weights(aws, cache), "imagenet"
    elif pretrained.startswith("s3://"):
        uri, hp["pretrained"] = pretrained, "channel"
    else:
        uri, hp["pretrained"] = upload_weights(aws, settings.train.weights_file), "channel"
    hp["weights_source"] = uri
    inputs["weights"] = TrainingInput(uri, distribution="FullyReplicated")
    return inputs, hp


def upload_weights(aws: Aws, path: Path) -> str:
    """Upload a weights file once, to s3://<bucket>/<prefix>/weights/<name>-<sha256 prefix><ext>; its URI."""
    from botocore.exceptions import ClientError

    from bincount.aws import parse_s3_uri

    settings = aws.settings
    uri = jobs.s3_uri(settings, "weights", f"{path.stem}-{file_sha256(path)[:16]}{path.suffix}")
    bucket, key = parse_s3_uri(uri)
    s3 = aws.s3()
    try:
        if s3.head_object(Bucket=bucket, Key=key)["ContentLength"] == path.stat().st_size:
            return uri  # the name carries the digest: the same bytes are there already
    except ClientError as exc:
        if error_code(exc) not in ("404", "NoSuchKey", "NotFound"):
            raise
    log(f"uploading {path} to {uri}")
    s3.upload_file(str(path), bucket, key)
    return uri


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


def estimator(settings: Settings, sm_session: Any, hyperparameters: dict[str, Any], job: str,
              tuning: bool = False) -> Any:
    """The PyTorch estimator over container/ that train and tune both use; `job` names the checkpoint prefix.

    tuning: for a HyperparameterTuner's trials, which carry no Debugger hook or rules (a tuning job's
    TrainingJobDefinition has no DebugHookConfig): no rules, no hook, and so nothing to pip-install.
    """
    from sagemaker.debugger import ProfilerConfig, Rule
    from sagemaker.pytorch import PyTorch

    from bincount.container.epochlog import METRIC_DEFINITIONS

    sm = settings.sagemaker
    check_instances(settings)
    role = jobs.require_role(settings)
    out = jobs.output_path(settings)
    rules = [] if tuning else debugger.debugger_rules(settings)
    kwargs: dict[str, Any] = {}
    if sm.use_spot_instances:
        max_wait = sm.max_wait_s or sm.max_run_s
        if max_wait < sm.max_run_s:
            raise BincountError(f"sagemaker.max_wait_s ({max_wait}) must be at least sagemaker.max_run_s ({sm.max_run_s})")
        kwargs.update(use_spot_instances=True, max_wait=max_wait, checkpoint_s3_uri=checkpoint_uri(settings, job))
    elif sm.checkpoint_s3_uri:
        kwargs["checkpoint_s3_uri"] = checkpoint_uri(settings, job)
    if sm.instance_count > 1 or is_gpu_instance(sm.instance_type):
        # torchrun through the toolkit: one process per GPU of every instance (ml.g5.12xlarge: 4, ml.p4d.24xlarge:
        # 8), so a several-GPU instance uses all of them; on a one-GPU instance it is one process, as before
        kwargs["distribution"] = {"torch_distributed": {"enabled": True}}
    if not any(isinstance(r, Rule) for r in rules):
        kwargs["debugger_hook_config"] = False  # no debugger rule reads tensors: no hook
    if sm.image_uri:
        kwargs["image_uri"] = jobs.check_image_uri(sm.image_uri, job_region(settings), "sagemaker.image_uri")
    smdebug = installs_smdebug(settings) and not tuning
    if smdebug:
        kwargs["environment"] = dict(SMDEBUG_ENVIRONMENT)
    if settings.train.keep_checkpoint:  # train.py keeps its checkpoint folder, which SageMaker syncs to S3
        hyperparameters = {**hyperparameters, "keep_checkpoint": True}
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
        tags=jobs.tags(settings),
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
