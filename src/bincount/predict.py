"""Count the objects in bin images: files, folders (recursive) or s3:// URIs, sent concurrently.

Targets, first match wins: --model (the artifact's handlers in this process, no server); --endpoint
(an http(s):// URL of a local endpoint, or a SageMaker endpoint name); with --backend sagemaker,
deploy.endpoint_name (bincount.backends.sagemaker.endpoint.predict); the endpoint recorded in
state.json; else the last trained model, in-process.

s3:// images are read with the data settings (data.endpoint_url, data.region, data.unsigned) when the
bucket is the data source's bucket (e.g. the public ABID bucket), else with the s3 settings (your
credentials, s3.endpoint_url, s3.region).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pydantic import Field

from bincount.config import Settings
from bincount.data.source import BucketClients, aws_message
from bincount.errors import BincountError
from bincount.results import Result
from bincount.runs import used_training
from bincount.http_answers import MAX_BODY_BYTES
from bincount.state import LocalEndpoint, SageMakerEndpoint
from bincount.workspace import Workspace

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
CONTENT_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png"}


class PredictItem(Result):
    image: str  # the image: a path (as given, or found in a folder) or s3:// URI
    count: int | None = None  # the predicted count (None: the image failed, see error)
    confidence: float | None = None  # the predicted count's probability, 0..1 (None: failed)
    probabilities: dict[str, float] | None = None  # count (a string) -> probability 0..1 (None: failed or not sent)
    error: str | None = None  # why the image got no prediction (None: it got one)


class PredictResult(Result):
    target: str  # what answered: model <dir> (in-process), endpoint <url> or SageMaker endpoint <name>
    predicted: int  # images that got a count
    failed: int  # images that got an error instead (any makes the exit code 1)
    items: list[PredictItem]  # one per image, in input order (a folder's or prefix's images sorted)
    output_format: str = Field("table", exclude=True)  # how to print it, not part of the result
    exit_code: int = Field(0, exclude=True)  # 1 when an image failed: the shell sees it, the JSON need not

    def rich(self) -> Any:
        if self.output_format == "json":
            return Raw(self.model_dump_json(indent=2) + "\n")
        if self.output_format == "csv":
            return Raw(items_csv(self.items))
        from rich.table import Table
        from rich.text import Text

        table = Table(title=f"predictions ({self.target})", title_justify="left")
        for name, justify in (("image", "left"), ("count", "right"), ("confidence", "right"), ("error", "left")):
            table.add_column(name, justify=justify, overflow="fold")
        for item in self.items:
            if item.error:
                table.add_row(item.image, "", "", Text(item.error, style="red"))
            else:
                table.add_row(item.image, str(item.count), f"{item.confidence:.3f}", "")
        table.caption = f"{self.predicted} predicted, {self.failed} failed"
        return table


class Raw:
    """Text printed exactly as is (no wrapping, markup or highlighting): CSV and JSON output."""

    def __init__(self, text: str):
        self.text = text

    def __rich_console__(self, console: Any, options: Any) -> Any:
        from rich.segment import Segment

        yield Segment(self.text if self.text.endswith("\n") else self.text + "\n")


def items_csv(items: list[PredictItem]) -> str:
    from bincount.results import csv_cell

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["image", "count", "confidence", "error"])
    for item in items:
        conf = "" if item.confidence is None else f"{item.confidence:.6f}"
        writer.writerow([csv_cell(item.image), "" if item.count is None else item.count, conf, csv_cell(item.error or "")])
    return buf.getvalue()


# -- sources: where image bytes come from --------------------------------------------------
@dataclass
class Source:
    name: str  # what the user sees: a path or s3:// URI
    read: Callable[[], bytes] | None  # None: the source itself is bad (see error)
    content_type: str = "application/x-image"
    error: str | None = None


def _content_type(name: str) -> str:
    return CONTENT_TYPES.get(Path(name.lower()).suffix, "application/x-image")


def _too_big(size: int) -> ValueError:
    return ValueError(f"{size / 1e6:.1f} MB, over the {MAX_BODY_BYTES // (1024 * 1024)} MB request limit")


def _read_file(path: Path) -> Callable[[], bytes]:
    def read() -> bytes:
        size = path.stat().st_size
        if size > MAX_BODY_BYTES:
            raise _too_big(size)
        return path.read_bytes()

    return read


def file_source(path: Path, name: str | None = None) -> Source:
    name = name or str(path)
    if not path.is_file():
        return Source(name, None, error="not found")
    return Source(name, _read_file(path), _content_type(path.name))


class S3Reader(BucketClients):
    """Image sources from s3:// URIs, each bucket read with its own settings (see the module docstring)."""

    def sources(self, uri: str) -> list[Source]:
        from bincount.aws import parse_s3_uri

        bucket, prefix = parse_s3_uri(uri)
        try:
            if prefix.lower().endswith(IMAGE_SUFFIXES):
                return [Source(uri, self._reader(bucket, prefix), _content_type(prefix))]
            keys = [obj["Key"] for obj in self.list(bucket, prefix, IMAGE_SUFFIXES)]
        except Exception as exc:  # noqa: BLE001 - botocore raises many kinds
            return [Source(uri, None, error=f"cannot list: {aws_message(exc)}")]
        if not keys:
            return [Source(uri, None, error="no .jpg/.jpeg/.png objects under this prefix")]
        return [Source(f"s3://{bucket}/{k}", self._reader(bucket, k), _content_type(k)) for k in sorted(keys)]

    def _reader(self, bucket: str, key: str) -> Callable[[], bytes]:
        def read() -> bytes:
            try:
                obj = self.get(f"s3://{bucket}/{key}")
            except Exception as exc:  # noqa: BLE001
                raise ValueError(f"cannot read: {aws_message(exc)}") from None
            if obj["ContentLength"] > MAX_BODY_BYTES:
                obj["Body"].close()
                raise _too_big(obj["ContentLength"])
            return obj["Body"].read()

        return read


def collect(settings: Settings, inputs: list[str]) -> list[Source]:
    """Files, folders (recursive .jpg/.jpeg/.png) and s3:// URIs -> image sources, in order."""
    reader = None
    out: list[Source] = []
    for spec in inputs:
        spec = str(spec)
        if spec.startswith("s3://"):
            reader = reader or S3Reader(settings)
            out += reader.sources(spec)
            continue
        path = Path(spec).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            out += [file_source(p) for p in found] or [Source(spec, None, error="no .jpg/.jpeg/.png files in this folder")]
        else:
            out.append(file_source(path, spec))
    if not out:
        raise BincountError("no images given")
    return out


# -- targets: what answers ------------------------------------------------------------------
class Target(Protocol):
    """What answers: the model in this process, a local endpoint URL, or a SageMaker endpoint."""

    name: str

    def predict(self, body: bytes, content_type: str) -> dict: ...

    def close(self) -> None:
        pass


class ModelTarget(Target):
    """The artifact's own handlers in this process (no server)."""

    def __init__(self, model_dir: Path):
        from bincount.handlers import Handlers

        self.name = f"model {model_dir}"
        self.handlers = Handlers(model_dir)

    def predict(self, body: bytes, content_type: str) -> dict:
        from bincount.handlers import client_status

        try:
            return json.loads(self.handlers.invoke(body, content_type, "application/json"))
        except Exception as exc:  # noqa: BLE001 - one bad image must not stop the others
            if client_status(exc):
                raise ValueError(str(exc)) from None
            raise ValueError(f"internal error: {type(exc).__name__}: {exc}") from None


class HttpTarget(Target):
    """An endpoint URL speaking the SageMaker contract (bincount.endpoint_client: a deadline per request, the
    answer capped, redirects refused in the health check and the requests alike)."""

    def __init__(self, url: str, timeout: float = 60.0):
        from bincount.endpoint_client import EndpointError, HttpClient, health

        try:
            self.client = HttpClient(url, timeout)
        except EndpointError as exc:
            raise BincountError(str(exc)) from None
        self.url = self.client.url
        self.name = f"endpoint {self.url}"
        reason = health(self.url, timeout=5.0)
        if reason is not None:
            raise BincountError(f"the endpoint at {self.url} does not answer GET /ping with 200 ({reason}); "
                                "is it running? (`bincount deploy` starts one)")

    def predict(self, body: bytes, content_type: str) -> dict:
        from bincount.endpoint_client import error_of

        status, data = self.client.request("POST", "/invocations", body,
                                           {"Content-Type": content_type, "Accept": "application/json"})
        if status != 200:
            raise ValueError(error_of(status, data))
        try:
            return json.loads(data)
        except ValueError:
            raise ValueError(f"the endpoint's answer is not JSON: {data[:80]!r}") from None

    def close(self) -> None:
        self.client.close()


class SageMakerTarget(Target):
    def __init__(self, settings: Settings, endpoint_name: str):
        from bincount.aws import Aws
        from bincount.backends.sagemaker.runtime import invoke_endpoint

        self.aws, self.endpoint_name = Aws(settings), endpoint_name
        self.name = f"SageMaker endpoint {endpoint_name}"
        self._invoke = invoke_endpoint

    def predict(self, body: bytes, content_type: str) -> dict:
        try:
            return self._invoke(self.aws, self.endpoint_name, body, content_type)
        except BincountError as exc:
            raise ValueError(str(exc)) from None


def resolve_target(settings: Settings, endpoint: str | None = None, model: Path | str | None = None) -> Target:
    """The first of: --model, --endpoint, the recorded endpoint, the last model."""
    from bincount.artifacts import resolve_model
    from bincount.console import log

    if model:
        return ModelTarget(resolve_model(settings, model))
    if endpoint:
        if endpoint.startswith(("http://", "https://")):
            return HttpTarget(endpoint)
        return SageMakerTarget(settings, endpoint)
    state = Workspace(settings.workdir).state()
    if isinstance(state.endpoint, LocalEndpoint):
        return HttpTarget(state.endpoint.url)
    if isinstance(state.endpoint, SageMakerEndpoint):
        return SageMakerTarget(settings, state.endpoint.name)
    training = used_training(Workspace(settings.workdir), state)
    if training and training.model_data:
        model_dir = resolve_model(settings)
        log(f"no endpoint deployed: predicting in-process with the model of run {training.job} ({model_dir})")
        return ModelTarget(model_dir)
    raise BincountError("nothing to predict with: run `bincount deploy`, or pass --endpoint URL|NAME or --model PATH")


MAX_COUNT = 100_000  # no bin holds more: a bigger count is a broken endpoint


def parse_answer(answer: Any) -> tuple[int, float, dict[str, float] | None]:
    """An endpoint's answer for one image -> (count, confidence, probabilities), checked: ValueError otherwise."""
    import math

    if isinstance(answer, list) and len(answer) == 1:  # a batch answer to a single image
        answer = answer[0]
    if not isinstance(answer, dict):
        raise ValueError(f"the endpoint answered {str(answer)[:60]!r}, not a prediction object")

    def number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    count, confidence, probabilities = answer.get("count"), answer.get("confidence"), answer.get("probabilities")
    if not number(count) or count != int(count) or not 0 <= count <= MAX_COUNT:
        raise ValueError(f"the endpoint answered count {count!r}: not a count (a whole number 0..{MAX_COUNT:,})")
    if not number(confidence) or not 0 <= confidence <= 1:
        raise ValueError(f"the endpoint answered confidence {confidence!r}: not a probability (0..1)")
    if probabilities is not None:
        if not isinstance(probabilities, dict) or not all(
                isinstance(k, str) and number(v) and 0 <= v <= 1 for k, v in probabilities.items()):
            raise ValueError(f"the endpoint answered probabilities {str(probabilities)[:60]!r}: "
                             "not a map of count to probability (0..1)")
    return int(count), float(confidence), probabilities


def run_predictions(settings: Settings, sources: list[Source], target: Target, description: str = "predict") -> list[PredictItem]:
    """Predict every source concurrently (deploy.workers) with a progress bar; failures become items with an error."""
    from bincount.console import progress

    def one(source: Source) -> PredictItem:
        if source.read is None:
            return PredictItem(image=source.name, error=source.error or "unreadable")
        try:
            count, confidence, probabilities = parse_answer(target.predict(source.read(), source.content_type))
            return PredictItem(image=source.name, count=count, confidence=confidence, probabilities=probabilities)
        except Exception as exc:  # noqa: BLE001 - every failure is reported per item
            return PredictItem(image=source.name, error=str(exc) or type(exc).__name__)

    items: list[PredictItem] = []
    with progress(transient=True) as bar, ThreadPoolExecutor(settings.deploy.workers) as pool:
        task = bar.add_task(description, total=len(sources))
        for item in pool.map(one, sources):
            items.append(item)
            bar.advance(task)
    return items


def predict(settings: Settings, images: list[str], endpoint: str | None = None, model: Path | None = None,
            output_format: str = "table") -> PredictResult:
    """Predict counts for images; failed items carry their reason and make the exit code 1."""
    if output_format not in ("table", "json", "csv"):
        raise BincountError(f"--format {output_format!r}: choose table, json or csv")
    sources = collect(settings, images)
    target = resolve_target(settings, endpoint, model)
    try:
        items = run_predictions(settings, sources, target)
    finally:
        target.close()
    failed = sum(1 for item in items if item.error)
    return PredictResult(target=target.name, predicted=len(items) - failed, failed=failed, items=items,
                         output_format=output_format, exit_code=1 if failed else 0)
