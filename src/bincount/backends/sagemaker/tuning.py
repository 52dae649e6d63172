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
        warm = _warm_start(settings, sm_session.sagemaker_client, {
            "objective": t.objective, "hyperparameters": set(hp) | set(ranges), "image": est.training_image_uri(),
            "channels": {name: i.config["DataSource"]["S3DataSource"]["S3Uri"] for name, i in inputs.items()}})
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
        if result.status == "Completed" and est.checkpoint_s3_uri:  # what early-stopped trials left in the prefix
            jobs.drop_checkpoints(aws, est.checkpoint_s3_uri, settings.train.keep_checkpoint)
    if result.warning:
        log(result.warning)
    record(settings, result)
    return result


def _warm_start(settings: Settings, client: Any, new: dict[str, Any]) -> Any:
    """A WarmStartConfig from the recorded tuning job where AWS's rules allow one; else None, said why in one line.

    The rules (API reference, HyperParameterTuningJobWarmStartConfig): a parent must have ended (Completed or
    Stopped), warm start serves Bayesian and Random, and the parent must have the same objective metric and the
    same hyperparameters (static plus tuned: train.pretrained adds weights_source). IdenticalDataAndAlgorithm also needs the
    same input data and training image; where the channels or the image changed, TransferLearning.
    `new`: objective, hyperparameters (names, static and tuned), channels (name -> S3 URI), image.
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
        desc = client.describe_hyper_parameter_tuning_job(HyperParameterTuningJobName=parent)
    except ClientError as exc:
        log(f"warning: no warm start: tuning job {parent} cannot be described ({error_message(exc) or exc})")
        return None
    status = desc["HyperParameterTuningJobStatus"]
    if status not in ("Completed", "Stopped"):
        log(f"warning: no warm start: tuning job {parent} is {status} (a parent must be Completed or Stopped); "
            "starting without it")
        return None
    old = _parent_definition(desc)
    why = None
    if old["objective"] != new["objective"]:
        why = f"its objective is {old['objective']}, this one's {new['objective']} (warm start needs the same)"
    elif _own(old["hyperparameters"]) != _own(new["hyperparameters"]):
        added = sorted(_own(new["hyperparameters"]) - _own(old["hyperparameters"]))
        gone = sorted(_own(old["hyperparameters"]) - _own(new["hyperparameters"]))
        why = ("its hyperparameters differ (" + "; ".join(part for part in (
            f"added {', '.join(added)}" if added else "", f"gone {', '.join(gone)}" if gone else "") if part)
            + "; warm start needs the same set)")
    if why:
        log(f"no warm start from tuning job {parent}: {why}; starting cold")
        return None
    changed = [what for what in ("channels", "image") if old[what] != new[what]]
    if changed:
        log(f"warm start from tuning job {parent} ({status}) as TransferLearning: the {' and '.join(changed)} changed")
        return WarmStartConfig(WarmStartTypes.TRANSFER_LEARNING, parents={parent})
    log(f"warm start from tuning job {parent} ({status})")
    return WarmStartConfig(WarmStartTypes.IDENTICAL_DATA_AND_ALGORITHM, parents={parent})


def _own(names: set[str]) -> set[str]:
    """Hyperparameter names less the SDK's own (sagemaker_*, _tuning_objective_metric): the SDK adds the same
    ones to every job it starts, and they are not in the names bincount gives it."""
    return {n for n in names if not n.startswith(("sagemaker_", "_"))}


def _parent_definition(desc: dict[str, Any]) -> dict[str, Any]:
    """Objective, hyperparameter names (static and tuned), channels and image of a DescribeHyperParameterTuningJob."""
    config = desc.get("HyperParameterTuningJobConfig") or {}
    definition = desc.get("TrainingJobDefinition") or {}
    ranges = config.get("ParameterRanges") or {}
    tuned = {r["Name"] for kind in ("ContinuousParameterRanges", "IntegerParameterRanges", "CategoricalParameterRanges")
             for r in ranges.get(kind) or []}
    channels = {c["ChannelName"]: ((c.get("DataSource") or {}).get("S3DataSource") or {}).get("S3Uri")
                for c in definition.get("InputDataConfig") or []}
    return {"objective": (config.get("HyperParameterTuningJobObjective") or {}).get("MetricName"),
            "hyperparameters": set(definition.get("StaticHyperParameters") or {}) | tuned,
            "channels": channels, "image": (definition.get("AlgorithmSpecification") or {}).get("TrainingImage")}


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
