"""`bincount status`: the recorded data, channels, tuning, training and endpoint, and where each stands now.

SageMaker jobs and endpoints are described live; a local endpoint is pinged (GET /ping).
A lookup that fails shows as "unknown (...)" instead of failing the whole command.
"""

from __future__ import annotations

from typing import Any

from bincount.aws import error_message
from bincount.config import Settings
from bincount.errors import BincountError
from bincount.results import Result, key_value_table
from bincount.state import LocalEndpoint, Record, SageMakerEndpoint, SageMakerTraining, SageMakerTuning, State
from bincount.workspace import SPLITS, Workspace


class StatusResult(Result):
    workdir: str  # the work dir shown
    data: dict[str, int | None]  # rows per file: manifest, train, val, test (splits/) -> rows (None: no such file)
    channels: dict[str, str] = {}  # split -> s3:// URI of the training channel recorded in state.json (empty: none)
    tuning: dict[str, Any] | None = None  # recorded tuning, with a SageMaker job's live status and best (None: none)
    training: dict[str, Any] | None = None  # recorded run, with a SageMaker job's live status and metrics (None: none)
    endpoint: dict[str, Any] | None = None  # recorded endpoint and its live status (a local one: up, down or unhealthy)
    transform: dict[str, Any] | None = None  # the last audit's SageMaker Batch Transform job
    processing: dict[str, Any] | None = None  # the last `shard --backend sagemaker` Processing job

    def rich(self) -> Any:
        table = key_value_table(title=f"status of {self.workdir}")
        table.add_row("data", ", ".join(f"{k} {'-' if v is None else v}" for k, v in self.data.items()))
        table.add_row("channels", ", ".join(f"{k} {v}" for k, v in self.channels.items()) or "-")
        for name in ("tuning", "training", "endpoint", "transform", "processing"):
            item = getattr(self, name)
            table.add_row(name, "-" if not item else "\n".join(f"{k}: {_short(v)}" for k, v in item.items() if v not in (None, {})))
        return table


def _short(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}={_short(v)}" for k, v in value.items())
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _lines(path) -> int | None:
    if not path.exists():
        return None
    with path.open("rb") as fh:
        return sum(1 for line in fh if line.strip())


def status(settings: Settings) -> StatusResult:
    """Show the recorded state, with live job/endpoint status where it can be had."""
    ws = Workspace(settings.workdir)
    if not ws.root.is_dir():
        raise BincountError(f"work dir {ws.root} does not exist (give the one you fetched into with --workdir)")
    state = ws.state()
    data = {"manifest": _lines(ws.manifest), **{name: _lines(ws.split(name)) for name in SPLITS}}
    live = _Live(settings)
    tuning, training, endpoint = state.tuning, state.training, state.endpoint
    processing = _processing(ws, state, live)  # first: its completion records the channels shown
    return StatusResult(
        workdir=str(ws.root), data=data, channels=ws.state().channels if processing else state.channels,
        tuning=_shown(tuning, live.tuning(tuning.job) if isinstance(tuning, SageMakerTuning) else {}),
        training=_shown(training, live.training(training.job) if isinstance(training, SageMakerTraining) else {}),
        endpoint=_shown(endpoint, live.endpoint(endpoint.name) if isinstance(endpoint, SageMakerEndpoint)
                        else {"status": _ping(endpoint.url)} if isinstance(endpoint, LocalEndpoint) else {}),
        transform=_shown(state.transform, live.transform(state.transform.job) if state.transform else {}),
        processing=processing)


def _processing(ws: Workspace, state: State, live: _Live) -> dict[str, Any] | None:
    """The shard Processing job as it stands; once it has ended, that is recorded (Completed: its channels)."""
    record = state.processing
    if record is None:
        return None
    found = live.processing(record.job) if record.status not in ("Completed", "Failed", "Stopped") else {}
    if found.get("status") in ("Completed", "Failed", "Stopped"):
        from bincount.backends.sagemaker.processing import settle

        settle(ws, record.job, found["status"])
    return _shown(record, found)


def _shown(record: Record | None, live: dict[str, Any]) -> dict[str, Any] | None:
    """A recorded item as shown: its fields, updated with what a live lookup found."""
    return {**record.model_dump(mode="json", exclude_none=True), **_known(live)} if record else None


def _known(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def _ping(url: str) -> str:
    from bincount.endpoint_client import health

    reason = health(url)
    return "up" if reason is None else f"unhealthy ({reason})" if reason.startswith("HTTP") else f"down ({reason})"


class _Live:
    """Describe calls against SageMaker, made only when something recorded lives there."""

    def __init__(self, settings: Settings):
        from bincount.aws import Aws

        self.settings, self.aws = settings, Aws(settings)
        self._client = None

    def _describe(self, method: str, **kwargs: Any) -> dict[str, Any] | str:
        try:
            if self._client is None:
                self._client = self.aws.client("sagemaker", max_attempts=2)
            return getattr(self._client, method)(**kwargs)
        except Exception as exc:  # noqa: BLE001 - status must show what it can
            return f"unknown ({error_message(exc) or type(exc).__name__})"

    def training(self, job: str) -> dict[str, Any]:
        desc = self._describe("describe_training_job", TrainingJobName=job)
        if isinstance(desc, str):
            return {"status": desc}
        out = {"status": desc.get("TrainingJobStatus"), "secondary_status": desc.get("SecondaryStatus"),
               "metrics": {m["MetricName"]: m["Value"] for m in desc.get("FinalMetricDataList") or []} or None}
        if desc.get("TrainingJobStatus") == "Completed":
            out["model_data"] = (desc.get("ModelArtifacts") or {}).get("S3ModelArtifacts")
        if desc.get("FailureReason"):
            out["failure"] = desc["FailureReason"]
        from bincount.backends.sagemaker.debugger import rule_statuses

        rules = rule_statuses(desc)
        if rules:  # the Debugger and profiler rule verdicts, which come minutes after the job ends
            out["rules"] = {r["rule"]: r["status"] for r in rules}
            out["profiler_report"] = self.profiler_report(desc)
        return out

    def profiler_report(self, desc: dict[str, Any]) -> str | None:
        """The local copy of the job's profiler report, fetched once the ProfilerReport rule has written it."""
        ws = Workspace(self.settings.workdir)
        recorded = ws.state().training
        if isinstance(recorded, SageMakerTraining) and recorded.profiler_report:
            return recorded.profiler_report
        try:
            from bincount.backends.sagemaker.debugger import download_profiler_report

            s3 = self.aws.s3(max_attempts=2)
            report = download_profiler_report(self.settings, s3, desc)
        except Exception as exc:  # noqa: BLE001 - status must show what it can
            return f"unknown ({error_message(exc) or type(exc).__name__})"
        if report and isinstance(recorded, SageMakerTraining) and recorded.job == desc["TrainingJobName"]:
            def add_report(state: Any) -> dict[str, Any]:  # to the record as it is now, if still that job's
                now = state.training
                if isinstance(now, SageMakerTraining) and now.job == recorded.job:
                    return {"training": now.model_copy(update={"profiler_report": report})}
                return {}

            ws.update_state(add_report)
        return report

    def tuning(self, job: str) -> dict[str, Any]:
        desc = self._describe("describe_hyper_parameter_tuning_job", HyperParameterTuningJobName=job)
        if isinstance(desc, str):
            return {"status": desc}
        best = desc.get("BestTrainingJob") or {}
        return {"status": desc.get("HyperParameterTuningJobStatus"),
                "trials": desc.get("TrainingJobStatusCounters"),
                "best_job": best.get("TrainingJobName"),
                "best_value": (best.get("FinalHyperParameterTuningJobObjectiveMetric") or {}).get("Value")}

    def endpoint(self, name: str) -> dict[str, Any]:
        return self._status_of("describe_endpoint", "EndpointStatus", EndpointName=name)

    def processing(self, job: str) -> dict[str, Any]:
        return self._status_of("describe_processing_job", "ProcessingJobStatus", ProcessingJobName=job)

    def transform(self, job: str) -> dict[str, Any]:
        return self._status_of("describe_transform_job", "TransformJobStatus", TransformJobName=job)

    def _status_of(self, operation: str, status_key: str, **name: str) -> dict[str, Any]:
        """{"status": ..., "failure": its FailureReason if any} from one Describe call (its error text if it failed)."""
        desc = self._describe(operation, **name)
        if isinstance(desc, str):
            return {"status": desc}
        out = {"status": desc.get(status_key)}
        if desc.get("FailureReason"):
            out["failure"] = desc["FailureReason"]
        return out
