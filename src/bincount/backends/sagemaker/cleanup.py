"""`bincount cleanup`: delete what this work dir made on AWS, after one confirmation.

What goes, in this order (all listed in the question first):
- the recorded training, tuning, Batch Transform and Processing jobs, stopped if still running (a stopped job bills no more);
- the endpoints, endpoint configs and models this work dir recorded in state.json, or that carry its
  tag (`bincount:workdir` = its id; every deploy, audit and job tags what it makes): named
  `<sagemaker.base_job_name>-...` is not enough, so another team's `bincount-*` in a shared account stays;
- every S3 object under s3://<s3.bucket>/<s3.prefix>/ (channels, weights, code, outputs, Debugger and
  profiler data, checkpoints), under sagemaker.output_path and sagemaker.checkpoint_s3_uri where they lie
  elsewhere, and the repacked model.tar.gz the SDK wrote beside each deleted model (s3://<bucket>/<model>/).
  Listed under `<prefix>/` (never `<prefix>X/`); an empty prefix (the whole bucket) is refused.
The bucket and the IAM role stay: the README's walk-through deletes them with the aws cli.
Then state.json forgets the SageMaker records it saw (jobs, endpoint, transform, channels under the deleted
prefixes, older SageMaker runs and a `runs --use` pin on one of them); a record another command wrote since stays.
"""

from __future__ import annotations

from typing import Any

from bincount.backends.sagemaker import jobs
from bincount.config import Settings
from bincount.console import log
from bincount.errors import BincountError
from bincount.results import Result
from bincount.state import SageMakerEndpoint
from bincount.workspace import Workspace


class CleanupResult(Result):
    backend: str = "sagemaker"  # always sagemaker
    region: str  # the AWS region of the jobs, endpoints and models it looked at
    stopped: list[str] = []  # running jobs it asked to stop, as "training job NAME" (or tuning, transform, processing)
    deleted: list[str] = []  # "endpoint X", "endpoint config Y", "model Z"
    s3_prefixes: list[str] = []  # s3:// prefixes that held objects to delete (listed even when kept)
    s3_objects: int = 0  # how many S3 objects it deleted
    kept: bool = False  # true when the confirmation was declined: nothing was stopped or deleted

    def title(self) -> str:
        return "cleanup (sagemaker)"


def _listed(client: Any, operation: str, key: str, name_key: str, arn_key: str, base: str) -> dict[str, str]:
    """name -> ARN of every resource named `<base>-...` (candidates only: see _ours)."""
    found: dict[str, str] = {}
    for page in client.get_paginator(operation).paginate(NameContains=base):
        found.update({item[name_key]: item[arn_key] for item in page.get(key, []) if item[name_key].startswith(f"{base}-")})
    return found


def _ours(sm: Any, arn: str, owner: str) -> bool:
    """Whether the resource carries this work dir's tag."""
    tags = sm.list_tags(ResourceArn=arn).get("Tags", [])
    return any(t.get("Key") == jobs.OWNER_TAG and t.get("Value") == owner for t in tags)


def _prefix(uri: str, setting: str) -> str:
    """s3://bucket/key/ with a trailing slash; the bucket's root is refused (it would delete everything)."""
    from bincount.aws import parse_s3_uri

    bucket, key = parse_s3_uri(uri)
    if not key:
        raise BincountError(f"{setting} is the root of s3://{bucket}: cleanup deletes only under a prefix that is "
                            f"bincount's alone (set {setting} to one, e.g. bincount)")
    return f"s3://{bucket}/{key}/"


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
    prefixes = [_prefix(jobs.s3_uri(settings), "s3.prefix")]  # refused before anything is listed or deleted
    for setting in ("output_path", "checkpoint_s3_uri"):
        extra = getattr(settings.sagemaker, setting)
        if extra and not _prefix(extra, f"sagemaker.{setting}").startswith(prefixes[0]):
            prefixes.append(_prefix(extra, f"sagemaker.{setting}"))
    owner = state.workdir_id or ""
    sm = aws.client("sagemaker", region=region)
    s3 = aws.s3()
    with jobs.aws_errors("sagemaker cleanup"):
        # -- what exists ----------------------------------------------------------------------------
        running = []
        for kind, record in jobs.recorded_jobs(state):
            found = jobs.job_status(sm, record.job, [kind])
            if found and found[1] == "InProgress":
                running.append((kind, record.job))
        # recorded here, or tagged with this work dir's id; another owner's bincount-* stays
        recorded: set[str] = set()
        if isinstance(state.endpoint, SageMakerEndpoint):
            recorded |= {n for n in (state.endpoint.name, state.endpoint.config_name, state.endpoint.model_name) if n}
        if state.transform is not None:
            recorded.add(state.transform.model_name)
        listed = {kind: _listed(sm, *how, base) for kind, how in (
            ("endpoint", ("list_endpoints", "Endpoints", "EndpointName", "EndpointArn")),
            ("config", ("list_endpoint_configs", "EndpointConfigs", "EndpointConfigName", "EndpointConfigArn")),
            ("model", ("list_models", "Models", "ModelName", "ModelArn")))}
        mine = {kind: [n for n, arn in found.items() if n in recorded or (owner and _ours(sm, arn, owner))]
                for kind, found in listed.items()}
        endpoints, configs, models = mine["endpoint"], mine["config"], mine["model"]
        if isinstance(state.endpoint, SageMakerEndpoint) and state.endpoint.name not in endpoints:
            try:  # recorded under a name outside <base>-*
                sm.describe_endpoint(EndpointName=state.endpoint.name)
                endpoints.append(state.endpoint.name)
            except ClientError as exc:
                if not jobs.missing(exc):
                    raise
        for name in endpoints:  # an endpoint of ours: its config and models, if recorded or tagged
            config = sm.describe_endpoint(EndpointName=name)["EndpointConfigName"]
            try:
                desc = sm.describe_endpoint_config(EndpointConfigName=config)
            except ClientError as exc:
                if not jobs.missing(exc):
                    raise
                continue
            if config in recorded or (owner and _ours(sm, desc["EndpointConfigArn"], owner)):
                configs.append(config)
            for variant in desc.get("ProductionVariants", []):
                model = variant.get("ModelName")
                if model and model not in models:
                    try:
                        arn = sm.describe_model(ModelName=model)["ModelArn"]
                    except ClientError as exc:
                        if not jobs.missing(exc):
                            raise
                        continue
                    if model in recorded or (owner and _ours(sm, arn, owner)):
                        models.append(model)
        configs, models = list(dict.fromkeys(configs)), list(dict.fromkeys(models))
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
        objects = {p: jobs.s3_keys(s3, p) for p in prefixes}
        objects = {p: keys for p, keys in objects.items() if keys}
        count = sum(len(keys) for keys in objects.values())

        plan = [f"stop {kind} job {job}" for kind, job in running]
        plan += [f"endpoint {n}" for n in endpoints] + [f"endpoint config {n}" for n in configs]
        plan += [f"model {n}" for n in models] + [f"{len(keys)} objects under {p}" for p, keys in objects.items()]
        result = CleanupResult(region=region, s3_prefixes=list(objects))
        if not plan:
            log(f"nothing of this work dir's to clean up in {region} (s3://{bucket}, {prefixes[0]})")
            return result
        if not confirm(f"In {region}: {'; '.join(plan)}. Delete all this?", yes):
            log("kept everything")
            return result.model_copy(update={"kept": True})

        # -- delete ---------------------------------------------------------------------------------
        for kind, job in running:
            jobs.stop_job(sm, kind, job)
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
            result.s3_objects += jobs.delete_keys(s3, parse_s3_uri(prefix)[0], keys)
            log(f"deleted {len(keys)} objects under {prefix}")
    # what state.json recorded on AWS is gone now
    def forget(now: Any) -> dict[str, Any]:  # only the records cleanup saw: not one another command wrote since
        gone: dict[str, Any] = {k: None for k in ("training", "tuning", "endpoint", "transform", "processing")
                                if getattr(getattr(state, k), "backend", None) == "sagemaker"
                                and getattr(now, k) == getattr(state, k)}
        if (now.channels and now.channels == state.channels
                and all(any(uri.startswith(p) for p in prefixes) for uri in state.channels.values())):
            gone["channels"] = {}
        # the older SageMaker runs, whose artifacts lay under the deleted prefixes; a pin on one of them goes too
        dropped = [r for r in now.runs if r.backend == "sagemaker" and r in state.runs  # no artifact: nothing to keep
                   and (r.model_data is None or any(r.model_data.startswith(p) for p in prefixes))]
        if dropped:
            gone["runs"] = [r for r in now.runs if r not in dropped]
        forgotten = {r.job for r in dropped} | ({state.training.job} if "training" in gone else set())
        if now.use and now.use in forgotten:
            gone["use"] = None
        return gone

    ws.update_state(forget)
    return result
