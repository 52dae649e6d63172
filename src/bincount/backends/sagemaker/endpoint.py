"""`bincount deploy`, `undeploy` and `predict` with --backend sagemaker: a PyTorchModel endpoint (real-time or serverless)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bincount.aws import Aws
from bincount.backends.sagemaker import jobs
from bincount.backends.sagemaker.training import model_artifact, record_training
from bincount.config import Settings
from bincount.console import confirm, log
from bincount.errors import BincountError
from bincount.results import Result
from bincount.runs import used_training
from bincount.state import SageMakerEndpoint, SageMakerTraining
from bincount.workspace import Workspace


class EndpointResult(Result):
    backend: str = "sagemaker"  # always sagemaker
    endpoint: str  # the SageMaker endpoint's name
    status: str  # SageMaker's EndpointStatus, e.g. InService
    mode: str  # realtime or serverless (deploy.mode)
    config_name: str | None = None  # its endpoint config's name
    model_name: str | None = None  # the SageMaker model it serves
    model_data: str | None = None  # s3:// URI of the model.tar.gz it serves
    action: str = "created"  # created, updated (a new endpoint config on the running endpoint) or already deployed

    def title(self) -> str:
        return "deploy (sagemaker)"


class UndeployResult(Result):
    backend: str = "sagemaker"  # always sagemaker
    endpoint: str  # the SageMaker endpoint's name
    deleted: list[str] = []  # what it deleted: "endpoint X", "endpoint config Y", "model Z" (already gone: left out)
    kept: bool = False  # true when the confirmation was declined: nothing was deleted

    def title(self) -> str:
        return "undeploy (sagemaker)"


def resolve_model_data(settings: Settings, sm_session: Any) -> str:
    """settings.deploy.model_data, else the recorded training artifact; local files are uploaded to S3."""
    model_data = settings.deploy.model_data
    if not model_data:
        training = used_training(Workspace(settings.workdir))  # the newest run, or the one `runs --use` pinned
        model_data = training.model_data if training else None
        if not model_data and isinstance(training, SageMakerTraining):
            desc = sm_session.sagemaker_client.describe_training_job(TrainingJobName=training.job)
            if desc["TrainingJobStatus"] != "Completed":
                raise BincountError(f"training job {training.job} is {desc['TrainingJobStatus']}: "
                                    "deploy once it has completed (bincount status)")
            record_training(Workspace(settings.workdir), desc)
            model_data = model_artifact(desc)
    if not model_data:
        raise BincountError("no model to deploy: run bincount train first or pass --model")
    if model_data.startswith("s3://"):
        return model_data
    path = Path(model_data)
    if not path.is_file():
        raise BincountError(f"model artifact {path} not found (expected a model.tar.gz)")
    from bincount.aws import parse_s3_uri

    bucket, prefix = parse_s3_uri(jobs.s3_uri(settings, "models", jobs.timestamp()))
    log(f"uploading {path} to s3://{bucket}/{prefix}/")
    return sm_session.upload_data(str(path), bucket=bucket, key_prefix=prefix)


def model_ref(settings: Settings) -> str | None:
    """What identifies the artifact to deploy before any upload: a local model.tar.gz's sha256, else its S3 URI."""
    from bincount.workspace import file_sha256

    training = used_training(Workspace(settings.workdir))
    source = settings.deploy.model_data or (training.model_data if training else None)
    if not source or source.startswith("s3://"):
        return source
    return f"sha256:{file_sha256(Path(source))}" if Path(source).is_file() else None


def serving_settings(d: Any) -> dict[str, Any]:
    """The deploy settings an endpoint runs with: its image (or framework and Python versions), its mode and
    that mode's capacity. A redeploy that changes any of them updates the endpoint."""
    image = {"image_uri": d.image_uri} if d.image_uri else {"framework_version": d.framework_version,
                                                            "py_version": d.py_version}
    capacity = ({"memory_size_mb": d.memory_size_mb, "max_concurrency": d.max_concurrency} if d.mode == "serverless"
                else {"instance_type": d.instance_type, "instance_count": d.instance_count})
    return {"mode": d.mode, **image, **capacity}


def deploy(settings: Settings) -> EndpointResult:
    """A PyTorchModel with container/inference.py on a real-time or serverless endpoint; waits until InService.

    With the recorded endpoint running and another model (deploy --model NEW, or `runs --use` chose another run),
    mode, image or capacity (serving_settings), the endpoint is updated in place to a new endpoint config over a
    new model (UpdateEndpoint: it keeps serving the old one until the new one is InService), and the old config
    and model are deleted."""
    jobs.load_sdk()
    import tempfile

    from sagemaker.pytorch import PyTorchModel
    from sagemaker.serverless import ServerlessInferenceConfig
    from sagemaker.utils import name_from_base

    d = settings.deploy
    ws = Workspace(settings.workdir)
    recorded = ws.state().endpoint
    live = recorded if isinstance(recorded, SageMakerEndpoint) and d.endpoint_name in (None, recorded.name) else None
    name = live.name if live else d.endpoint_name or f"{settings.sagemaker.base_job_name}-{jobs.timestamp()}"
    with jobs.aws_errors("sagemaker deploy"), jobs.sdk_output(), tempfile.TemporaryDirectory() as serving_dir:
        aws = Aws(settings)
        sm_session = jobs.session(aws)
        sm = sm_session.sagemaker_client
        role = jobs.require_role(settings)
        image = jobs.check_image_uri(d.image_uri, aws.job_region, "deploy.image_uri") if d.image_uri else None
        status = _endpoint_status(sm, name) if live else None
        ref, serving = model_ref(settings), serving_settings(d)
        if status and ref and live.model_ref == ref and _serves_as(live, serving):
            return EndpointResult(endpoint=name, status=status, mode=d.mode, config_name=live.config_name,
                                  model_name=live.model_name, model_data=live.model_data, action="already deployed")
        if not live:  # the credentials, and their SageMaker access, before any upload (a model is megabytes)
            aws.client("sts").get_caller_identity()
            sm.list_endpoints(MaxResults=1)
        model_data = resolve_model_data(settings, sm_session)
        model = PyTorchModel(
            model_data=model_data,
            role=role,
            entry_point="inference.py",
            source_dir=str(serving_code(Path(serving_dir))),
            framework_version=d.framework_version,
            py_version=d.py_version,
            image_uri=image,
            name=name_from_base(f"{name}-model") if status else f"{name}-model",
            sagemaker_session=sm_session,
        )
        tags = jobs.tags(settings)  # on the model, the endpoint config and the endpoint
        serverless = (ServerlessInferenceConfig(memory_size_in_mb=d.memory_size_mb, max_concurrency=d.max_concurrency)
                      if d.mode == "serverless" else None)
        if status:
            log(f"updating endpoint [bold]{name}[/] ({status}, serving {live.model_data}) to {model_data} ({d.mode})")
            _update(sm_session, name, model, serverless, tags, d, live)
        else:
            log(f"deploying {model_data} to endpoint [bold]{name}[/] ({d.mode})")
            if serverless is not None:
                model.deploy(endpoint_name=name, wait=True, tags=tags, serverless_inference_config=serverless)
            else:
                model.deploy(endpoint_name=name, wait=True, tags=tags, initial_instance_count=d.instance_count,
                             instance_type=d.instance_type)
        desc = sm.describe_endpoint(EndpointName=name)
    result = EndpointResult(endpoint=name, status=desc["EndpointStatus"], mode=d.mode,
                            config_name=desc.get("EndpointConfigName"), model_name=model.name, model_data=model_data,
                            action="updated" if status else "created")
    ws.update_state(endpoint=SageMakerEndpoint(name=name, config_name=result.config_name, model_name=result.model_name,
                                               mode=d.mode, model_data=model_data, model_ref=ref, serving=serving))
    return result


def _serves_as(live: SageMakerEndpoint, serving: dict[str, Any]) -> bool:
    """Does the recorded endpoint run with these serving settings? (A record from before they were kept: its mode.)"""
    return live.serving == serving if live.serving is not None else live.mode == serving["mode"]


def _endpoint_status(sm: Any, name: str) -> str | None:
    """The recorded endpoint's status, or None when it is gone (then deploy creates it again)."""
    from botocore.exceptions import ClientError

    try:
        return sm.describe_endpoint(EndpointName=name)["EndpointStatus"]
    except ClientError as exc:
        if jobs.missing(exc) or jobs.error_code(exc) == "ValidationException":
            return None
        raise


def _update(sm_session: Any, name: str, model: Any, serverless: Any, tags: list[dict[str, str]], d: Any,
            live: SageMakerEndpoint) -> None:
    """UpdateEndpoint to a new endpoint config over `model`; then the old config and model go (best effort)."""
    from botocore.exceptions import ClientError
    from sagemaker import production_variant
    from sagemaker.utils import name_from_base

    model.create(instance_type=None if serverless else d.instance_type, serverless_inference_config=serverless,
                 tags=tags)
    variant = production_variant(model.name, instance_type=None if serverless else d.instance_type,
                                 initial_instance_count=None if serverless else d.instance_count,
                                 serverless_inference_config=serverless._to_request_dict() if serverless else None)
    config = name_from_base(name)
    sm = sm_session.sagemaker_client
    sm.create_endpoint_config(EndpointConfigName=config, ProductionVariants=[variant], **({"Tags": tags} if tags else {}))
    sm.update_endpoint(EndpointName=name, EndpointConfigName=config)
    sm_session.wait_for_endpoint(name)
    for kind, call, key, old in (("endpoint config", sm.delete_endpoint_config, "EndpointConfigName", live.config_name),
                                 ("model", sm.delete_model, "ModelName", live.model_name)):
        if old:
            try:
                call(**{key: old})
            except ClientError as exc:
                log(f"warning: the old {kind} {old} was not deleted ({jobs.error_message(exc) or exc}); "
                    "`bincount cleanup` removes it")


def undeploy(settings: Settings, yes: bool = False) -> UndeployResult:
    """Delete the endpoint, its endpoint config and its model (after a confirmation that --yes skips)."""
    from botocore.exceptions import ClientError

    ws = Workspace(settings.workdir)
    endpoint = ws.state().endpoint
    recorded = endpoint if isinstance(endpoint, SageMakerEndpoint) else None
    name = settings.deploy.endpoint_name or (recorded.name if recorded else None)
    if not name:
        raise BincountError("no SageMaker endpoint recorded in state.json: pass --endpoint-name")
    if not confirm(f"Delete SageMaker endpoint {name}, its endpoint config and model?", yes):
        log("kept the endpoint")
        return UndeployResult(endpoint=name, kept=True)
    sm = Aws(settings).sagemaker
    ours = recorded is not None and recorded.name == name
    config_name = recorded.config_name if ours else None
    models = [recorded.model_name] if ours and recorded.model_name else []
    deleted: list[str] = []
    with jobs.aws_errors("sagemaker undeploy"):
        try:
            config_name = sm.describe_endpoint(EndpointName=name)["EndpointConfigName"]
        except ClientError as exc:
            if not jobs.missing(exc):
                raise
        if config_name:
            try:
                variants = sm.describe_endpoint_config(EndpointConfigName=config_name)["ProductionVariants"]
                models = list(dict.fromkeys([*models, *(v["ModelName"] for v in variants if v.get("ModelName"))]))
            except ClientError as exc:
                if not jobs.missing(exc):
                    raise
        steps = [("endpoint", sm.delete_endpoint, {"EndpointName": name})]
        if config_name:
            steps.append(("endpoint config", sm.delete_endpoint_config, {"EndpointConfigName": config_name}))
        steps += [("model", sm.delete_model, {"ModelName": m}) for m in models]
        for kind, call, kwargs in steps:
            try:
                call(**kwargs)
                deleted.append(f"{kind} {next(iter(kwargs.values()))}")
                log(f"deleted {deleted[-1]}")
            except ClientError as exc:
                if not jobs.missing(exc):
                    raise
    if ours:
        ws.update_state(endpoint=None)
    return UndeployResult(endpoint=name, deleted=deleted)


def predict(settings: Settings, images: list[str], endpoint: str | None = None, model: Path | None = None,
            output_format: str = "table") -> Any:
    """`bincount predict --backend sagemaker`: as bincount.predict.predict, deploy.endpoint_name before the recorded one."""
    from bincount.predict import predict as run

    if not endpoint and not model:
        endpoint = settings.deploy.endpoint_name
    return run(settings, images, endpoint=endpoint, model=model, output_format=output_format)


def serving_code(dest: Path) -> Path:
    """The endpoint's source_dir: only the serving handlers, and no training requirements (no smdebug)."""
    from bincount.artifacts import write_serving_code

    return write_serving_code(dest)
