"""`bincount train --backend sagemaker`: a training job over container/train.py, its record and rule verdicts."""

from __future__ import annotations

from typing import Any

from bincount.aws import Aws
from bincount.backends.sagemaker import debugger, estimator, jobs
from bincount.backends.sagemaker.tuning import tuning_result
from bincount.backends.tuning import record
from bincount.config import Settings
from bincount.console import log
from bincount.results import Result, key_value_table
from bincount.state import SageMakerTraining, SageMakerTuning
from bincount.workspace import Workspace


class TrainJobResult(Result):
    backend: str = "sagemaker"  # always sagemaker
    run: str = ""  # the run's name as `bincount runs` lists it and a local train names it: the job's name
    job: str  # the SageMaker training job
    status: str  # SageMaker's TrainingJobStatus: InProgress (--no-wait), Completed or Stopped (a failure raises)
    model_data: str | None = None  # s3:// URI of the job's model.tar.gz (None with --no-wait)
    metrics: dict[str, float] = {}  # kept epoch's train_loss, val_loss, val_acc, val_rmse; last epoch's lr; no test_*
    rules: list[dict[str, str]] = []  # Debugger and profiler rules: rule, status (RuleEvaluationStatus), detail, source
    profiler_report: str | None = None  # ProfilerReport rule output copied to reports/profiler/<job>/ (None: not yet)
    hyperparameters: dict[str, Any] = {}  # the train.py arguments the job was given
    seconds: float | None = None  # the job's training time (TrainingTimeInSeconds), seconds

    def model_post_init(self, _: Any) -> None:
        self.run = self.run or self.job

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


def train(settings: Settings) -> TrainJobResult:
    """Start a training job over container/train.py; with train.wait, stream its logs and record the artifact."""
    jobs.load_sdk()
    from sagemaker.utils import name_from_base

    from bincount import tracking
    from bincount.data.split import stale_note
    from bincount.runs import announce, now_iso, val_digest

    ws = Workspace(settings.workdir)
    tracking.enabled(settings)  # mlflow.tracking_uri set without mlflow installed: say so before the job starts
    note = stale_note(ws)
    if note:
        log(note)
    with jobs.aws_errors("sagemaker train"), jobs.sdk_output():
        aws = Aws(settings)
        sm_session = jobs.session(aws)
        if settings.train.use_best:
            _refresh_tuning(settings, sm_session.sagemaker_client)
        job = name_from_base(settings.sagemaker.base_job_name)
        wanted = estimator.train_hyperparameters(settings)
        inputs, hp = estimator.job_inputs(aws, wanted)
        est = estimator.estimator(settings, sm_session, hp, job)
        jobs.check_bucket_region(aws)
        est.fit(inputs=inputs, job_name=job, wait=False, logs="None")
        ws.update_state(training=SageMakerTraining(job=job, status="InProgress", hyperparameters=wanted,
                                                   started=now_iso(), val_digest=val_digest(ws)))
        log(f"training job [bold]{job}[/] started in {sm_session.boto_region_name}")
        announce(ws, job)
        if not settings.train.wait:
            return TrainJobResult(job=job, status="InProgress", hyperparameters=hp)
        client = sm_session.sagemaker_client
        try:
            est.latest_training_job.wait(logs="All")
        except KeyboardInterrupt:
            jobs.interrupted("training", job, lambda: client.stop_training_job(TrainingJobName=job))
        finally:
            description = client.describe_training_job(TrainingJobName=job)
            record_training(ws, description)
        description = debugger.wait_for_rules(client, description, settings.sagemaker.rules.wait_s)
        rules = debugger.rule_statuses(description)
        for rule in rules:
            log(f"rule {rule['rule']}: {rule['status']} {rule['detail']}".rstrip())
        report = debugger.download_profiler_report(settings, aws.s3(), description)
        if report:
            log(f"profiler report: {report}")
        record_training(ws, description, report)
    if description["TrainingJobStatus"] == "Completed":
        tracking.log_run(settings, job, wanted, _final_metrics(description))
    return TrainJobResult(job=job, status=description["TrainingJobStatus"], model_data=model_artifact(description),
                          metrics=_final_metrics(description), rules=rules, profiler_report=report, hyperparameters=hp,
                          seconds=description.get("TrainingTimeInSeconds"))


def _refresh_tuning(settings: Settings, client: Any) -> None:
    """A SageMaker tuning job started with --no-wait: fetch and record its best trial once there is one."""
    tuning = Workspace(settings.workdir).state().tuning
    if isinstance(tuning, SageMakerTuning) and not tuning.best_hyperparameters:
        result = tuning_result(settings, client, tuning.job)
        if result.best_hyperparameters:
            record(settings, result)


def model_artifact(description: dict[str, Any]) -> str | None:
    return (description.get("ModelArtifacts") or {}).get("S3ModelArtifacts")


def _final_metrics(description: dict[str, Any]) -> dict[str, float]:
    return {m["MetricName"]: m["Value"] for m in description.get("FinalMetricDataList") or []}


def record_training(ws: Workspace, description: dict[str, Any], profiler_report: str | None = None) -> None:
    status = description["TrainingJobStatus"]
    seconds = description.get("TrainingTimeInSeconds")
    ws.update_state(training=SageMakerTraining(
        job=description["TrainingJobName"], status=status, metrics=_final_metrics(description),
        **({"seconds": float(seconds)} if seconds is not None else {}),
        model_data=model_artifact(description) if status == "Completed" else None,
        rules={r["rule"]: r["status"] for r in debugger.rule_statuses(description)} or None,
        profiler_report=profiler_report))
