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
from bincount.state import SageMakerEndpoint, SageMakerTraining
from bincount.workspace import Workspace


class EndpointResult(Result):
    backend: str = "sagemaker"
    endpoint: str
    status: str
    mode: str
    config_name: str | None = None
    model_name: str | None = None
    model_data: str | None = None

    def title(self) -> str:
        return "deploy (sagemaker)"


class UndeployResult(Result):
    backend: str = "sagemaker"
    endpoint: str
    deleted: list[str] = []
    kept: bool = False

    def title(self) -> str:
        return "undeploy (sagemaker)"


def resolve_model_data(settings: Settings, sm_session: Any) -> str:
    """settings.deploy.model_data, else the recorded training artifact; local files are uploaded to S3."""
    model_data = settings.deploy.model_data
    if not model_data:
        training = Workspace(settings.workdir).state().training
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


def deploy(settings: Settings) -> EndpointResult:
    """A PyTorchModel with container/inference.py on a real-time or serverless endpoint; waits until InService."""
    jobs.load_sdk()
    import tempfile

    from sagemaker.pytorch import PyTorchModel
    from sagemaker.serverless import ServerlessInferenceConfig

    d = settings.deploy
    name = d.endpoint_name or f"{settings.sagemaker.base_job_name}-{jobs.timestamp()}"
    with jobs.aws_errors("sagemaker deploy"), jobs.sdk_output(), tempfile.TemporaryDirectory() as serving_dir:
        aws = Aws(settings)
        sm_session = jobs.session(aws)
        role = jobs.require_role(settings)
        model_data = resolve_model_data(settings, sm_session)
        image = jobs.check_image_uri(d.image_uri, aws.job_region, "deploy.image_uri") if d.image_uri else None
        model = PyTorchModel(
            model_data=model_data,
            role=role,
            entry_point="inference.py",
            source_dir=str(serving_code(Path(serving_dir))),
            framework_version=d.framework_version,
            py_version=d.py_version,
            image_uri=image,
            name=f"{name}-model",
            sagemaker_session=sm_session,
        )
        log(f"deploying {model_data} to endpoint [bold]{name}[/] ({d.mode})")
        tags = jobs.tags(settings)  # on the model, the endpoint config and the endpoint
        if d.mode == "serverless":
            model.deploy(endpoint_name=name, wait=True, tags=tags, serverless_inference_config=ServerlessInferenceConfig(
                memory_size_in_mb=d.memory_size_mb, max_concurrency=d.max_concurrency))
        else:
            model.deploy(endpoint_name=name, wait=True, tags=tags, initial_instance_count=d.instance_count,
                         instance_type=d.instance_type)
        desc = sm_session.sagemaker_client.describe_endpoint(EndpointName=name)
    result = EndpointResult(endpoint=name, status=desc["EndpointStatus"], mode=d.mode,
                            config_name=desc.get("EndpointConfigName"), model_name=model.name, model_data=model_data)
    Workspace(settings.workdir).update_state(endpoint=SageMakerEndpoint(
        name=name, config_name=result.config_name, model_name=result.model_name, mode=d.mode, model_data=model_data))
    return result


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
