"""The SageMaker backend: training and tuning jobs, endpoints, invocations (SageMaker Python SDK v2).

The estimator, rules and session live in bincount.backends.sm_estimator; the shared tuning
table and state handling in bincount.backends.tuning.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from bincount.aws import error_code, error_message, s3_client
from bincount.backends import sm_estimator as sme
from bincount.backends.tuning import TUNED, TuneResult, best_train_settings, coerce_hyperparameters, record
from bincount.config import Settings
from bincount.console import confirm, log
from bincount.errors import BincountError
from bincount.results import Result, key_value_table
from bincount.state import SageMakerEndpoint, SageMakerTraining, SageMakerTuning
from bincount.workspace import Workspace


class TrainJobResult(Result):
    backend: str = "sagemaker"
    job: str
    status: str
    model_data: str | None = None
    metrics: dict[str, float] = {}
    rules: list[dict[str, str]] = []
    profiler_report: str | None = None
    hyperparameters: dict[str, Any] = {}

    def title(self) -> str:
        return "train (sagemaker)"

    def rich(self) -> Any:
        from rich.console import Group
        from rich.table import Table

        table = key_value_table(title=f"training job {self.job}: {self.status}")
        for name, value in self.metrics.items():
            table.add_row(name, f"{value:.4f}")
        table.add_row("model", self.model_data or "(not yet: see bincount status)")
        if self.profiler_report:
            table.add_row("profiler report", self.profiler_report)
        parts: list[Any] = [table]
        if self.rules:
            rules = Table(title="Debugger and profiler rules", title_justify="left")
            for column in ("rule", "status", "detail"):
                rules.add_column(column)
            for rule in self.rules:
                style = "red" if rule["status"] in ("IssuesFound", "Error") else None
                rules.add_row(rule["rule"], rule["status"], rule["detail"], style=style)
            parts.append(rules)
        return Group(*parts)


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


# -- train -------------------------------------------------------------------------------------

def _train_hyperparameters(settings: Settings, epochs: int | None = None) -> dict[str, Any]:
    train = best_train_settings(settings)
    hp = train.hyperparameters(settings.data.max_count)
    if epochs is not None:
        hp["epochs"] = epochs
    return hp


def train(settings: Settings) -> TrainJobResult:
    """Start a training job over container/train.py; with train.wait, stream its logs and record the artifact."""
    sme.load_sdk()
    from sagemaker.utils import name_from_base

    ws = Workspace(settings.workdir)
    with sme.aws_errors("sagemaker train"), sme.sdk_output():
        sm_session = sme.session(settings)
        if settings.train.use_best:
            _refresh_tuning(settings, sm_session.sagemaker_client)
        job = name_from_base(settings.sagemaker.base_job_name)
        inputs, hp = sme.job_inputs(settings, sm_session, _train_hyperparameters(settings))
        est = sme.estimator(settings, sm_session, hp, job)
        sme.check_bucket_region(settings, s3_client(settings))
        est.fit(inputs=inputs, job_name=job, wait=False, logs="None")
        ws.update_state(training=SageMakerTraining(job=job, status="InProgress"))
        log(f"training job [bold]{job}[/] started in {sm_session.boto_region_name}")
        if not settings.train.wait:
            return TrainJobResult(job=job, status="InProgress", hyperparameters=hp)
        client = sm_session.sagemaker_client
        try:
            est.latest_training_job.wait(logs="All")
        except KeyboardInterrupt:
            _interrupted("training", job, lambda: client.stop_training_job(TrainingJobName=job))
        finally:
            description = client.describe_training_job(TrainingJobName=job)
            _record_training(ws, description)
        description = sme.wait_for_rules(client, description, settings.sagemaker.rules.wait_s)
        rules = sme.rule_statuses(description)
        for rule in rules:
            log(f"rule {rule['rule']}: {rule['status']} {rule['detail']}".rstrip())
        report = sme.download_profiler_report(settings, s3_client(settings), description)
        if report:
            log(f"profiler report: {report}")
        _record_training(ws, description, report)
    return TrainJobResult(job=job, status=description["TrainingJobStatus"], model_data=_model_data(description),
                          metrics=_final_metrics(description), rules=rules, profiler_report=report, hyperparameters=hp)


def _refresh_tuning(settings: Settings, client: Any) -> None:
    """A SageMaker tuning job started with --no-wait: fetch and record its best trial once there is one."""
    tuning = Workspace(settings.workdir).state().tuning
    if isinstance(tuning, SageMakerTuning) and not tuning.best_hyperparameters:
        result = tuning_result(settings, client, tuning.job)
        if result.best_hyperparameters:
            record(settings, result)


def _model_data(description: dict[str, Any]) -> str | None:
    return (description.get("ModelArtifacts") or {}).get("S3ModelArtifacts")


def _final_metrics(description: dict[str, Any]) -> dict[str, float]:
    return {m["MetricName"]: m["Value"] for m in description.get("FinalMetricDataList") or []}


def _record_training(ws: Workspace, description: dict[str, Any], profiler_report: str | None = None) -> None:
    status = description["TrainingJobStatus"]
    ws.update_state(training=SageMakerTraining(
        job=description["TrainingJobName"], status=status, metrics=_final_metrics(description),
        model_data=_model_data(description) if status == "Completed" else None,
        rules={r["rule"]: r["status"] for r in sme.rule_statuses(description)} or None,
        profiler_report=profiler_report))


def _interrupted(kind: str, job: str, stop: Any) -> None:
    """Ctrl-C while waiting: the job runs on (and bills) unless stopped; ask where a person can answer."""
    import typer

    if sys.stdin.isatty() and sys.stderr.isatty():
        try:
            answer = typer.confirm(f"\nStop {kind} job {job}? Otherwise it keeps running (and billing)",
                                   default=True, err=True)
        except (KeyboardInterrupt, EOFError, typer.Abort):
            answer = False
        if answer:
            with sme.aws_errors(f"stop {kind} job {job}"):
                stop()
            raise KeyboardInterrupt(f"interrupted: stopping {kind} job {job} (bincount status shows when it has stopped)")
    raise KeyboardInterrupt(f"interrupted: {kind} job {job} keeps running and billing; stop it with "
                            f"`bincount stop --job {job} --yes`, or follow it with `bincount status`")


# -- tune --------------------------------------------------------------------------------------

def tune(settings: Settings) -> TuneResult:
    """A HyperparameterTuner over the training estimator; records the best trial in state.json."""
    sme.load_sdk()
    from sagemaker.tuner import CategoricalParameter, ContinuousParameter, HyperparameterTuner

    from bincount.container.epochlog import METRIC_DEFINITIONS, OBJECTIVES

    t = settings.tune
    if t.strategy == "Grid":
        raise BincountError("tune.strategy=Grid searches categorical ranges only, and lr and weight_decay are "
                            "continuous ranges: use Bayesian, Random or Hyperband")
    epochs = t.epochs or settings.train.epochs
    early_stopping, strategy_config = t.early_stopping, None
    if t.strategy == "Hyperband":
        # Hyperband stops trials itself (TrainingJobEarlyStoppingType must be Off) after each epoch's
        # objective metric; its resource is epochs: each trial runs at most MaxResource of them.
        from sagemaker.tuner import HyperbandStrategyConfig, StrategyConfig

        if early_stopping != "Off":
            log("Hyperband stops trials itself: tune.early_stopping is Off for it")
        early_stopping = "Off"
        strategy_config = StrategyConfig(HyperbandStrategyConfig(
            max_resource=epochs, min_resource=min(epochs, settings.train.warmup_epochs + 1)))
    scale = {"log": "Logarithmic", "linear": "Linear"}
    ranges = {
        "lr": ContinuousParameter(t.lr.min, t.lr.max, scaling_type=scale[t.lr.scale]),
        "weight_decay": ContinuousParameter(t.weight_decay.min, t.weight_decay.max, scaling_type=scale[t.weight_decay.scale]),
        "batch_size": CategoricalParameter([int(b) for b in t.batch_size]),
    }
    with sme.aws_errors("sagemaker tune"), sme.sdk_output():
        sm_session = sme.session(settings)
        job = _tuning_job_name(settings.sagemaker.base_job_name)
        inputs, hp = sme.job_inputs(settings, sm_session, _train_hyperparameters(settings, epochs))
        est = sme.estimator(settings, sm_session, hp, job)
        sme.check_bucket_region(settings, s3_client(settings))
        warm = _warm_start(settings, sm_session.sagemaker_client)
        tuner = HyperparameterTuner(
            est,
            objective_metric_name=t.objective,
            hyperparameter_ranges=ranges,
            metric_definitions=[dict(m) for m in METRIC_DEFINITIONS],
            strategy=t.strategy,
            objective_type=OBJECTIVES[t.objective],
            max_jobs=t.max_jobs,
            max_parallel_jobs=t.max_parallel_jobs,
            early_stopping_type=early_stopping,
            warm_start_config=warm,
            strategy_config=strategy_config,
            tags=sme.tags(settings),
        )
        tuner.fit(inputs=inputs, job_name=job, wait=False, include_cls_metadata=False)
        log(f"tuning job [bold]{job}[/] started ({t.max_jobs} trials, {t.max_parallel_jobs} at a time)")
        result = TuneResult(backend="sagemaker", job=job, objective=t.objective, direction=OBJECTIVES[t.objective],
                            status="InProgress")
        record(settings, result)
        if not t.wait:
            return result
        try:
            tuner.wait()
        except KeyboardInterrupt:
            client = sm_session.sagemaker_client
            _interrupted("tuning", job, lambda: client.stop_hyper_parameter_tuning_job(HyperParameterTuningJobName=job))
        result = tuning_result(settings, sm_session.sagemaker_client, job)
    record(settings, result)
    return result


def _warm_start(settings: Settings, client: Any) -> Any:
    """A WarmStartConfig from the recorded tuning job, if it ended (Completed or Stopped); else None, said why.

    Warm start serves the Bayesian and Random strategies; SageMaker takes a parent only once it has ended.
    """
    from sagemaker.tuner import WarmStartConfig, WarmStartTypes

    previous = Workspace(settings.workdir).state().tuning
    if not settings.tune.warm_start or not isinstance(previous, SageMakerTuning):
        return None
    parent = previous.job
    if settings.tune.strategy not in ("Bayesian", "Random"):
        log(f"no warm start from {parent}: warm start serves the Bayesian and Random strategies")
        return None
    from botocore.exceptions import ClientError

    try:
        status = client.describe_hyper_parameter_tuning_job(HyperParameterTuningJobName=parent)[
            "HyperParameterTuningJobStatus"]
    except ClientError as exc:
        log(f"warning: no warm start: tuning job {parent} cannot be described ({error_message(exc) or exc})")
        return None
    if status not in ("Completed", "Stopped"):
        log(f"warning: no warm start: tuning job {parent} is {status} (a parent must be Completed or Stopped); "
            "starting without it")
        return None
    log(f"warm start from tuning job {parent} ({status})")
    return WarmStartConfig(WarmStartTypes.IDENTICAL_DATA_AND_ALGORITHM, parents={parent})


def _tuning_job_name(base: str) -> str:
    """A unique tuning job name within SageMaker's 32 characters: <base>-tune-yymmdd-HHMMSS-xxx."""
    import secrets

    stamp = sme.timestamp()[2:]
    return f"{(base + '-tune')[:14].rstrip('-')}-{stamp}-{secrets.token_hex(2)[:3]}"


def tuning_result(settings: Settings, client: Any, job: str) -> TuneResult:
    """Status, trials and best trial of a tuning job (the best alone where the trial list is unavailable)."""
    from bincount.container.epochlog import OBJECTIVES

    objective = settings.tune.objective
    desc = client.describe_hyper_parameter_tuning_job(HyperParameterTuningJobName=job)
    config = desc.get("HyperParameterTuningJobConfig") or {}
    metric = config.get("HyperParameterTuningJobObjective") or {}
    objective = metric.get("MetricName", objective)
    direction = metric.get("Type", OBJECTIVES.get(objective, "Maximize"))
    best = desc.get("BestTrainingJob") or {}
    note = None
    try:
        summaries = []
        paginator = client.get_paginator("list_training_jobs_for_hyper_parameter_tuning_job")
        for page in paginator.paginate(HyperParameterTuningJobName=job):
            summaries.extend(page.get("TrainingJobSummaries", []))
    except Exception as exc:  # noqa: BLE001 - e.g. an API the endpoint does not offer (moto)
        reason = error_code(exc) or type(exc).__name__
        summaries = [best] if best else []
        note = (f"the trial list is unavailable ({reason}); showing the best training job from "
                "describe_hyper_parameter_tuning_job")
    trials = [_trial_row(s) for s in summaries]
    ranked = [r for r in trials if r["value"] is not None]
    ranked.sort(key=lambda r: r["value"], reverse=direction == "Maximize")
    trials = ranked + [r for r in trials if r["value"] is None]
    best_value = (best.get("FinalHyperParameterTuningJobObjectiveMetric") or {}).get("Value")
    return TuneResult(backend="sagemaker", job=job, objective=objective, direction=direction,
                      status=desc.get("HyperParameterTuningJobStatus", "?"), best_value=best_value,
                      best_hyperparameters=coerce_hyperparameters(best.get("TunedHyperParameters") or {}),
                      trials=trials, note=note)


def _trial_row(summary: dict[str, Any]) -> dict[str, Any]:
    tuned = coerce_hyperparameters(summary.get("TunedHyperParameters") or {})
    value = (summary.get("FinalHyperParameterTuningJobObjectiveMetric") or {}).get("Value")
    return {"trial": summary.get("TrainingJobName", "?"), "status": summary.get("TrainingJobStatus", "?"),
            "value": value, **{k: tuned.get(k) for k in TUNED}}


# -- deploy / undeploy -------------------------------------------------------------------------

def _resolve_model_data(settings: Settings, sm_session: Any) -> str:
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
            _record_training(Workspace(settings.workdir), desc)
            model_data = _model_data(desc)
    if not model_data:
        raise BincountError("no model to deploy: run bincount train first or pass --model")
    if model_data.startswith("s3://"):
        return model_data
    path = Path(model_data)
    if not path.is_file():
        raise BincountError(f"model artifact {path} not found (expected a model.tar.gz)")
    from bincount.aws import parse_s3_uri

    bucket, prefix = parse_s3_uri(sme.s3_uri(settings, "models", sme.timestamp()))
    log(f"uploading {path} to s3://{bucket}/{prefix}/")
    return sm_session.upload_data(str(path), bucket=bucket, key_prefix=prefix)


def deploy(settings: Settings) -> EndpointResult:
    """A PyTorchModel with container/inference.py on a real-time or serverless endpoint; waits until InService."""
    sme.load_sdk()
    import tempfile

    from sagemaker.pytorch import PyTorchModel
    from sagemaker.serverless import ServerlessInferenceConfig

    d = settings.deploy
    name = d.endpoint_name or f"{settings.sagemaker.base_job_name}-{sme.timestamp()}"
    with sme.aws_errors("sagemaker deploy"), sme.sdk_output(), tempfile.TemporaryDirectory() as serving_dir:
        sm_session = sme.session(settings)
        role = sme.require_role(settings)
        model_data = _resolve_model_data(settings, sm_session)
        image = sme.check_image_uri(d.image_uri, sme.region(settings), "deploy.image_uri") if d.image_uri else None
        model = PyTorchModel(
            model_data=model_data,
            role=role,
            entry_point="inference.py",
            source_dir=str(sme.serving_code(Path(serving_dir))),
            framework_version=d.framework_version,
            py_version=d.py_version,
            image_uri=image,
            name=f"{name}-model",
            sagemaker_session=sm_session,
        )
        log(f"deploying {model_data} to endpoint [bold]{name}[/] ({d.mode})")
        tags = sme.tags(settings)  # on the model, the endpoint config and the endpoint
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

    from bincount.aws import client as aws_client

    ws = Workspace(settings.workdir)
    endpoint = ws.state().endpoint
    recorded = endpoint if isinstance(endpoint, SageMakerEndpoint) else None
    name = settings.deploy.endpoint_name or (recorded.name if recorded else None)
    if not name:
        raise BincountError("no SageMaker endpoint recorded in state.json: pass --endpoint-name")
    if not confirm(f"Delete SageMaker endpoint {name}, its endpoint config and model?", yes):
        log("kept the endpoint")
        return UndeployResult(endpoint=name, kept=True)
    sm = aws_client("sagemaker", region=settings.sagemaker.region)
    ours = recorded is not None and recorded.name == name
    config_name = recorded.config_name if ours else None
    models = [recorded.model_name] if ours and recorded.model_name else []
    deleted: list[str] = []
    with sme.aws_errors("sagemaker undeploy"):
        try:
            config_name = sm.describe_endpoint(EndpointName=name)["EndpointConfigName"]
        except ClientError as exc:
            if not _missing(exc):
                raise
        if config_name:
            try:
                variants = sm.describe_endpoint_config(EndpointConfigName=config_name)["ProductionVariants"]
                models = list(dict.fromkeys([*models, *(v["ModelName"] for v in variants if v.get("ModelName"))]))
            except ClientError as exc:
                if not _missing(exc):
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
                if not _missing(exc):
                    raise
    if ours:
        ws.update_state(endpoint=None)
    return UndeployResult(endpoint=name, deleted=deleted)


def _missing(exc: Any) -> bool:
    message = (error_message(exc) or "").lower()
    return error_code(exc) == "ResourceNotFound" or "could not find" in message or "does not exist" in message


# -- predict / status --------------------------------------------------------------------------

def invoke_endpoint(settings: Settings, endpoint_name: str, body: bytes, content_type: str) -> dict:
    """POST one image to a SageMaker endpoint through sagemaker-runtime; the parsed JSON response."""
    from bincount.aws import client as aws_client

    runtime = aws_client("sagemaker-runtime", region=settings.sagemaker.region, max_attempts=3)
    with sme.aws_errors(f"invoke endpoint {endpoint_name}"):
        response = runtime.invoke_endpoint(EndpointName=endpoint_name, Body=body, ContentType=content_type,
                                           Accept="application/json")
        payload = response["Body"].read()
    try:
        data = json.loads(payload)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BincountError(f"endpoint {endpoint_name} answered {response.get('ContentType', '?')}, not JSON: "
                            f"{payload[:80]!r}") from None
    if not isinstance(data, dict):
        raise BincountError(f"endpoint {endpoint_name} answered JSON that is not an object: {payload[:80]!r}")
    return data


def status(settings: Settings) -> Any:
    from bincount.status import status as show

    return show(settings)


# -- stop --------------------------------------------------------------------------------------

class StopResult(Result):
    backend: str = "sagemaker"
    stopped: list[str] = []  # "training job NAME" / "tuning job NAME"
    not_running: list[str] = []  # the same, with the status they were found in
    kept: bool = False

    def title(self) -> str:
        return "stop (sagemaker)"


def _job_status(client: Any, job: str) -> tuple[str, str] | None:
    """("training" | "tuning", status) of a job name, or None if SageMaker knows no job by that name."""
    from botocore.exceptions import ClientError

    for kind, call, key, field in (
            ("training", client.describe_training_job, "TrainingJobName", "TrainingJobStatus"),
            ("tuning", client.describe_hyper_parameter_tuning_job, "HyperParameterTuningJobName",
             "HyperParameterTuningJobStatus")):
        try:
            return kind, call(**{key: job})[field]
        except ClientError as exc:
            if not _missing(exc) and error_code(exc) != "ValidationException":
                raise
    return None


def stop(settings: Settings, job: str | None = None, yes: bool = False) -> StopResult:
    """Stop a running SageMaker training or tuning job: the named one, else the recorded ones still running."""
    from bincount.aws import client as aws_client

    sm = aws_client("sagemaker", region=sme.region(settings))
    state = Workspace(settings.workdir).state()
    if job:
        names = [job]
    else:
        names = [r.job for r in (state.training, state.tuning) if isinstance(r, (SageMakerTraining, SageMakerTuning))]
        if not names:
            raise BincountError("no SageMaker training or tuning job recorded in state.json: pass --job NAME")
    running, not_running = [], []
    with sme.aws_errors("sagemaker stop"):
        for name in names:
            found = _job_status(sm, name)
            if found is None:
                raise BincountError(f"no SageMaker training or tuning job named {name} in {sme.region(settings)}")
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
            if kind == "training":
                sm.stop_training_job(TrainingJobName=name)
            else:
                sm.stop_hyper_parameter_tuning_job(HyperParameterTuningJobName=name)
            result.stopped.append(f"{kind} job {name}")
            log(f"stopping {kind} job {name} (bincount status shows when it has stopped)")
    return result
