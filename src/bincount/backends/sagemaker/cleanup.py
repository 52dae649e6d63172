"""`bincount cleanup`: delete what bincount made on AWS, after one confirmation.

What goes, in this order (all listed in the question first):
- the recorded training and tuning jobs, stopped if still running (a stopped job bills no more);
- the recorded endpoint and every endpoint, endpoint config and model named `<sagemaker.base_job_name>-...`,
  the way `bincount deploy` names them (with an endpoint: its config and its models);
- every S3 object under s3://<s3.bucket>/<s3.prefix>/ (channels, weights, code, outputs, Debugger and
  profiler data, checkpoints), under sagemaker.output_path and sagemaker.checkpoint_s3_uri where they lie
  elsewhere, and the repacked model.tar.gz the SDK wrote beside each deleted model (s3://<bucket>/<model>/).
The bucket and the IAM role stay: the README's walk-through deletes them with the aws cli.
"""

from __future__ import annotations

from typing import Any

from bincount.backends.sagemaker import jobs
from bincount.config import Settings
from bincount.console import log
from bincount.errors import BincountError
from bincount.results import Result
from bincount.state import SageMakerEndpoint, SageMakerTraining, SageMakerTuning
from bincount.workspace import Workspace


class CleanupResult(Result):
    backend: str = "sagemaker"
    region: str
    stopped: list[str] = []
    deleted: list[str] = []  # "endpoint X", "endpoint config Y", "model Z"
    s3_prefixes: list[str] = []
    s3_objects: int = 0
    kept: bool = False

    def title(self) -> str:
        return "cleanup (sagemaker)"


def _named(items: list[dict[str, Any]], key: str, base: str) -> list[str]:
    return [item[key] for item in items if item[key].startswith(f"{base}-")]


def _list_all(client: Any, operation: str, key: str, name_key: str, base: str) -> list[str]:
    names: list[str] = []
    for page in client.get_paginator(operation).paginate(NameContains=base):
        names += _named(page.get(key, []), name_key, base)
    return names


def _s3_keys(s3: Any, bucket: str, prefix: str) -> list[str]:
    keys = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [obj["Key"] for obj in page.get("Contents", [])]
    return keys


def cleanup(settings: Settings, yes: bool = False) -> CleanupResult:
    """Stop the recorded jobs and delete bincount's endpoints, endpoint configs, models and S3 data."""
    from botocore.exceptions import ClientError

    from bincount.aws import Aws, parse_s3_uri
    from bincount.console import confirm

    aws = Aws(settings)
    region = aws.job_region
    bucket = jobs.require_bucket(settings)
    base = settings.sagemaker.base_job_name
    ws = Workspace(settings.workdir)
    state = ws.state()
    sm = aws.client("sagemaker", region=region)
    s3 = aws.s3()
    with jobs.aws_errors("sagemaker cleanup"):
        # -- what exists ----------------------------------------------------------------------------
        running = []
        for record in (state.training, state.tuning):
            if isinstance(record, (SageMakerTraining, SageMakerTuning)):
                found = jobs.job_status(sm, record.job)
                if found and found[1] == "InProgress":
                    running.append((found[0], record.job))
        endpoint = state.endpoint
        endpoints = _list_all(sm, "list_endpoints", "Endpoints", "EndpointName", base)
        if isinstance(endpoint, SageMakerEndpoint) and endpoint.name not in endpoints:
            try:
                sm.describe_endpoint(EndpointName=endpoint.name)
                endpoints.append(endpoint.name)
            except ClientError as exc:
                if not jobs.missing(exc):
                    raise
        configs = _list_all(sm, "list_endpoint_configs", "EndpointConfigs", "EndpointConfigName", base)
        models = _list_all(sm, "list_models", "Models", "ModelName", base)
        for name in endpoints:
            config = sm.describe_endpoint(EndpointName=name)["EndpointConfigName"]
            configs.append(config)
            try:
                variants = sm.describe_endpoint_config(EndpointConfigName=config)["ProductionVariants"]
                models += [v["ModelName"] for v in variants if v.get("ModelName")]
            except ClientError as exc:
                if not jobs.missing(exc):
                    raise
        configs, models = list(dict.fromkeys(configs)), list(dict.fromkeys(models))
        prefixes = [jobs.s3_uri(settings) + "/"]
        for extra in (settings.sagemaker.output_path, settings.sagemaker.checkpoint_s3_uri):
            if extra and not extra.rstrip("/").startswith(prefixes[0].rstrip("/")):
                prefixes.append(extra.rstrip("/") + "/")
        for model in models:  # the SDK repacks model.tar.gz with the serving code to s3://<bucket>/<model>/
            try:
                desc = sm.describe_model(ModelName=model)
            except ClientError as exc:
                if jobs.missing(exc):
                    continue
                raise
            container = desc.get("PrimaryContainer") or (desc.get("Containers") or [{}])[0]
            url = container.get("ModelDataUrl") or ""
            if url.startswith(f"s3://{bucket}/{model}/"):
                prefixes.append(f"s3://{bucket}/{model}/")
        objects = {p: _s3_keys(s3, *parse_s3_uri(p)) for p in prefixes}
        objects = {p: keys for p, keys in objects.items() if keys}
        count = sum(len(keys) for keys in objects.values())

        plan = [f"stop {kind} job {job}" for kind, job in running]
        plan += [f"endpoint {n}" for n in endpoints] + [f"endpoint config {n}" for n in configs]
        plan += [f"model {n}" for n in models] + [f"{len(keys)} objects under {p}" for p, keys in objects.items()]
        result = CleanupResult(region=region, s3_prefixes=list(objects))
        if not plan:
            log(f"nothing of bincount's to clean up in {region} (s3://{bucket}, names {base}-*)")
            return result
        if not confirm(f"In {region}: {'; '.join(plan)}. Delete all this?", yes):
            log("kept everything")
            return result.model_copy(update={"kept": True})

        # -- delete ---------------------------------------------------------------------------------
        for kind, job in running:
            if kind == "training":
                sm.stop_training_job(TrainingJobName=job)
            else:
                sm.stop_hyper_parameter_tuning_job(HyperParameterTuningJobName=job)
            result.stopped.append(f"{kind} job {job}")
            log(f"stopping {kind} job {job}")
        steps = [("endpoint", sm.delete_endpoint, "EndpointName", n) for n in endpoints]
        steps += [("endpoint config", sm.delete_endpoint_config, "EndpointConfigName", n) for n in configs]
        steps += [("model", sm.delete_model, "ModelName", n) for n in models]
        for kind, call, key, name in steps:
            try:
                call(**{key: name})
                result.deleted.append(f"{kind} {name}")
                log(f"deleted {kind} {name}")
            except ClientError as exc:
                if not jobs.missing(exc):
                    raise
        for prefix, keys in objects.items():
            bucket_name = parse_s3_uri(prefix)[0]
            for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
                batch = [{"Key": k} for k in keys[start:start + 1000]]
                answer = s3.delete_objects(Bucket=bucket_name, Delete={"Objects": batch, "Quiet": True})
                if answer.get("Errors"):
                    err = answer["Errors"][0]
                    raise BincountError(f"could not delete s3://{bucket_name}/{err['Key']}: {err.get('Message')}")
                result.s3_objects += len(batch)
            log(f"deleted {len(keys)} objects under {prefix}")
    # what state.json recorded on AWS is gone now
    gone: dict[str, Any] = {k: None for k in ("training", "tuning", "endpoint")
                            if getattr(getattr(state, k), "backend", None) == "sagemaker"}
    if state.channels and all(any(uri.startswith(p) for p in prefixes) for uri in state.channels.values()):
        gone["channels"] = {}
    if gone:
        ws.update_state(**gone)
    return result
