"""`bincount tune --backend sagemaker`: a HyperparameterTuner over the training estimator; the best trial recorded."""

from __future__ import annotations

from typing import Any

from bincount.aws import Aws, error_code, error_message
from bincount.backends.sagemaker import estimator, jobs
from bincount.backends.tuning import (TUNED, TuneResult, batch_sizes, chance_warning, coerce_hyperparameters, record,
                                      trial_hyperparameters)
from bincount.config import Settings
from bincount.console import log
from bincount.errors import BincountError
from bincount.state import SageMakerTuning
from bincount.workspace import Workspace


def tune(settings: Settings) -> TuneResult:
    """A HyperparameterTuner over the training estimator; records the best trial in state.json."""
    jobs.load_sdk()
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
    sizes, size_note = batch_sizes(settings)  # an epoch of several steps: not 512 on 360 images
    if size_note:
        log(f"note: {size_note}")
    from bincount.data.split import stale_note

    if stale := stale_note(Workspace(settings.workdir)):
        log(stale)
    ranges = {
        "lr": ContinuousParameter(t.lr.min, t.lr.max, scaling_type=scale[t.lr.scale]),
        "weight_decay": ContinuousParameter(t.weight_decay.min, t.weight_decay.max, scaling_type=scale[t.weight_decay.scale]),
        "batch_size": CategoricalParameter(sizes),
    }
    with jobs.aws_errors("sagemaker tune"), jobs.sdk_output():
        aws = Aws(settings)
        sm_session = jobs.session(aws)
        job = _tuning_job_name(settings.sagemaker.base_job_name)
        static = estimator.train_hyperparameters(settings, epochs)
        inputs, hp = estimator.job_inputs(aws, static)
        est = estimator.estimator(settings, sm_session, hp, job, tuning=True)
        jobs.check_bucket_region(aws)
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
            tags=jobs.tags(settings),
        )
        tuner.fit(inputs=inputs, job_name=job, wait=False, include_cls_metadata=False)
        log(f"tuning job [bold]{job}[/] started ({t.max_jobs} trials, {t.max_parallel_jobs} at a time)")
        result = TuneResult(backend="sagemaker", job=job, objective=t.objective, direction=OBJECTIVES[t.objective],
                            status="InProgress", trial_hyperparameters=trial_hyperparameters(static), note=size_note)
        record(settings, result)
        if not t.wait:
            return result
        try:
            tuner.wait()
        except KeyboardInterrupt:
            client = sm_session.sagemaker_client
            jobs.interrupted("tuning", job, lambda: client.stop_hyper_parameter_tuning_job(HyperParameterTuningJobName=job))
        result = tuning_result(settings, sm_session.sagemaker_client, job)
    if result.warning:
        log(result.warning)
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

    stamp = jobs.timestamp()[2:]
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
    # what every trial ran with besides the tuned ones (image_size, arch, epochs, ...): --use-best reproduces it
    static = (desc.get("TrainingJobDefinition") or {}).get("StaticHyperParameters") or {}
    return TuneResult(backend="sagemaker", job=job, objective=objective, direction=direction,
                      status=desc.get("HyperParameterTuningJobStatus", "?"), best_value=best_value,
                      best_hyperparameters=coerce_hyperparameters(best.get("TunedHyperParameters") or {}),
                      trial_hyperparameters=trial_hyperparameters(coerce_hyperparameters(static)),
                      trials=trials, note=note,
                      warning=chance_warning(settings, best_value) if objective == "val_acc" else None)


def _trial_row(summary: dict[str, Any]) -> dict[str, Any]:
    tuned = coerce_hyperparameters(summary.get("TunedHyperParameters") or {})
    value = (summary.get("FinalHyperParameterTuningJobObjectiveMetric") or {}).get("Value")
    reason = {"reason": summary["FailureReason"]} if summary.get("FailureReason") else {}  # e.g. train.py: diverged
    return {"trial": summary.get("TrainingJobName", "?"), "status": summary.get("TrainingJobStatus", "?"),
            "value": value, **{k: tuned.get(k) for k in TUNED}, **reason}
