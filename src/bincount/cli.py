"""The `bincount` command line: thin commands that parse options, call one stage, print its result."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from bincount.errors import BincountError

app = typer.Typer(
    help="Count the objects in warehouse bin photos, locally or on AWS SageMaker.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config file (see configs/default.yaml).")]
WorkdirOpt = Annotated[Optional[Path], typer.Option("--workdir", "-w", help="Work dir holding raw/, splits/, state.json, models/, reports/.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout (progress goes to stderr).")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override any setting: --set train.epochs=3 (repeatable).")]
BackendOpt = Annotated[Optional[str], typer.Option("--backend", "-b", help="local (default) or sagemaker.")]


# Every command and the stage it runs, as "module:function". A stage is imported only when its command
# runs, so --help stays instant. {backend} is settings.backend: bincount.backends.local or .sagemaker,
# each a bincount.backends.Backend.
STAGES: dict[str, str] = {
    "synth": "bincount.data.synth:synth",
    "fetch": "bincount.data.fetch:fetch",
    "split": "bincount.data.split:split",
    "upload": "bincount.data.upload:upload",
    "tune": "bincount.backends.{backend}:tune",
    "train": "bincount.backends.{backend}:train",
    "evaluate": "bincount.evaluate:evaluate",
    "deploy": "bincount.backends.{backend}:deploy",
    "predict": "bincount.predict:predict",
    "audit": "bincount.audit:audit",
    "undeploy": "bincount.backends.{backend}:undeploy",
    "serve": "bincount.serve:serve_forever",
    "status": "bincount.backends.{backend}:status",
    "demo": "bincount.demo:demo",
    "config": "bincount.config:show",
}


def stage(command: str, backend: str = "local") -> Callable[..., Any]:
    """The function `command` runs (with settings.backend = `backend`)."""
    module, _, function = STAGES[command].format(backend=backend).partition(":")
    return getattr(importlib.import_module(module), function)


def _call(command: str, config: Path | None, options: dict[str, Any], sets: list[str] | None, json_out: bool,
          **kwargs: Any) -> Any:
    """Load settings (defaults < --config < env < --set < flags), run the command's stage, print its result."""
    from bincount.config import load_settings, parse_set_option

    try:
        overrides = parse_set_option(sets or [])
        overrides.update({k: v for k, v in options.items() if v is not None})
        settings = load_settings(config, overrides)
        result = stage(command, settings.backend)(settings, **kwargs)
    except BincountError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        _fail("interrupted (work done so far is kept; run the command again to resume)", code=130)
    _print(result, json_out)
    return result


def _fail(message: str, code: int = 1) -> None:
    from rich.markup import escape

    from bincount.console import err_console

    err_console().print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _print(result: Any, json_out: bool) -> None:
    if result is None:
        return
    if json_out:
        sys.stdout.write(result.model_dump_json(indent=2) + "\n")
    else:
        from rich.console import Console

        Console().print(result.rich())
    exit_code = getattr(result, "exit_code", 0)
    if exit_code:
        raise typer.Exit(exit_code)


@app.command()
def synth(
    out: Annotated[Optional[Path], typer.Option(help="Output folder (bucket layout). Default: <workdir>/synth.")] = None,
    n: Annotated[int, typer.Option("--n", "-n", min=1, help="How many images.")] = 600,
    image_size: Annotated[int, typer.Option(min=32, help="Image width and height in pixels.")] = 128,
    min_count: Annotated[int, typer.Option(min=0, help="Smallest count drawn.")] = 0,
    max_count: Annotated[Optional[int], typer.Option(min=0, help="Largest count drawn (default data.max_count).")] = None,
    seed: Annotated[int, typer.Option(help="Random seed: the same seed makes the same files.")] = 0,
    start_id: Annotated[int, typer.Option(min=1, help="First image id.")] = 1,
    config: ConfigOpt = None, workdir: WorkdirOpt = None, json: JsonOpt = False, set: SetOpt = None,
) -> None:
    """Make synthetic bin photos in the ABID layout. No network needed: for tests and demos."""
    _call("synth", config, {"workdir": workdir, "data.max_count": max_count}, set, json,
          out=out, n=n, image_size=image_size, min_count=min_count, seed=seed, start_id=start_id)


@app.command()
def fetch(
    source: Annotated[Optional[str], typer.Option(help="s3://bucket[/prefix] or a local folder in the bucket layout.")] = None,
    endpoint_url: Annotated[Optional[str], typer.Option(help="S3-compatible endpoint, e.g. http://127.0.0.1:9000.")] = None,
    limit: Annotated[Optional[int], typer.Option(min=1, help="At most this many usable items.")] = None,
    ids: Annotated[Optional[str], typer.Option(help="Id range or list: 1-5000 or 4,9915,100313.")] = None,
    id_file: Annotated[Optional[Path], typer.Option(help="File of ids, one a line, or the capstone JSON list.")] = None,
    counts: Annotated[Optional[str], typer.Option(help="Keep only these counts, e.g. 1-5 (default 0..max_count).")] = None,
    balanced: Annotated[Optional[bool], typer.Option("--balanced/--no-balanced", help="Equal numbers per count.")] = None,
    workers: Annotated[Optional[int], typer.Option(min=1, help="Concurrent requests.")] = None,
    max_count: Annotated[Optional[int], typer.Option(min=1, help="Classes are counts 0..max_count.")] = None,
    config: ConfigOpt = None, workdir: WorkdirOpt = None, json: JsonOpt = False, set: SetOpt = None,
) -> None:
    """Download bin images and labels, write manifest.jsonl. Concurrent and resumable."""
    _call("fetch", config, {
        "workdir": workdir, "data.source": source, "data.endpoint_url": endpoint_url, "data.limit": limit,
        "data.ids": ids, "data.id_file": id_file, "data.counts": counts, "data.balanced": balanced,
        "data.workers": workers, "data.max_count": max_count}, set, json)


@app.command()
def split(
    train: Annotated[Optional[float], typer.Option(help="Train share (default 0.6).")] = None,
    val: Annotated[Optional[float], typer.Option(help="Validation share (default 0.2).")] = None,
    test: Annotated[Optional[float], typer.Option(help="Test share (default 0.2).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed.")] = None,
    config: ConfigOpt = None, workdir: WorkdirOpt = None, json: JsonOpt = False, set: SetOpt = None,
) -> None:
    """Split the manifest into train/val/test. Stratified by count and seeded."""
    _call("split", config, {"workdir": workdir, "split.train": train, "split.val": val,
                                       "split.test": test, "split.seed": seed}, set, json)


@app.command()
def upload(
    bucket: Annotated[Optional[str], typer.Option(help="Destination bucket.")] = None,
    prefix: Annotated[Optional[str], typer.Option(help="Key prefix (default bincount).")] = None,
    endpoint_url: Annotated[Optional[str], typer.Option(help="S3-compatible endpoint.")] = None,
    workers: Annotated[Optional[int], typer.Option(min=1, help="Concurrent uploads.")] = None,
    config: ConfigOpt = None, workdir: WorkdirOpt = None, json: JsonOpt = False, set: SetOpt = None,
) -> None:
    """Sync the splits to S3 as training channels. Unchanged files are skipped."""
    _call("upload", config, {"workdir": workdir, "s3.bucket": bucket, "s3.prefix": prefix,
                                         "s3.endpoint_url": endpoint_url, "s3.workers": workers}, set, json)


@app.command()
def tune(
    max_jobs: Annotated[Optional[int], typer.Option(min=1, help="Trials in total.")] = None,
    max_parallel_jobs: Annotated[Optional[int], typer.Option(min=1, help="Trials at once.")] = None,
    objective: Annotated[Optional[str], typer.Option(help="val_acc (maximise) or val_rmse (minimise).")] = None,
    epochs: Annotated[Optional[int], typer.Option(min=1, help="Epochs per trial.")] = None,
    wait: Annotated[Optional[bool], typer.Option("--wait/--no-wait", help="Wait for the tuning job to end.")] = None,
    backend: BackendOpt = None,
    config: ConfigOpt = None, workdir: WorkdirOpt = None, json: JsonOpt = False, set: SetOpt = None,
) -> None:
    """Search hyperparameters and record the best. SageMaker HyperparameterTuner, or Optuna locally."""
    _call("tune", config, {"workdir": workdir, "backend": backend, "tune.max_jobs": max_jobs,
                                     "tune.max_parallel_jobs": max_parallel_jobs, "tune.objective": objective,
                                     "tune.epochs": epochs, "tune.wait": wait}, set, json)


@app.command()
def train(
    epochs: Annotated[Optional[int], typer.Option(min=1, help="Epochs.")] = None,
    arch: Annotated[Optional[str], typer.Option(help="resnet18, resnet34, resnet50, mobilenet_v3_small, mobilenet_v3_large.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(min=1, help="Batch size.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate.")] = None,
    image_size: Annotated[Optional[int], typer.Option(help="Input size in pixels.")] = None,
    pretrained: Annotated[Optional[str], typer.Option(help="imagenet, none, or a local weights file.")] = None,
    use_best: Annotated[Optional[bool], typer.Option("--use-best/--no-use-best", help="Use the best hyperparameters from `bincount tune`.")] = None,
    wait: Annotated[Optional[bool], typer.Option("--wait/--no-wait", help="SageMaker: stream logs until the job ends.")] = None,
    backend: BackendOpt = None,
    config: ConfigOpt = None, workdir: WorkdirOpt = None, json: JsonOpt = False, set: SetOpt = None,
) -> None:
    """Train the counting model. Runs container/train.py and packages model.tar.gz."""
    _call("train", config, {"workdir": workdir, "backend": backend, "train.epochs": epochs,
                                      "train.arch": arch, "train.batch_size": batch_size, "train.lr": lr,
                                      "train.image_size": image_size, "train.pretrained": pretrained,
                                      "train.use_best": use_best, "train.wait": wait}, set, json)


@app.command()
def evaluate(
    manifest: Annotated[Optional[Path], typer.Option(help="Manifest to score (default splits/test.jsonl).")] = None,
    model: Annotated[Optional[Path], typer.Option(help="model.tar.gz or model dir (default: the last trained).")] = None,
    tta: Annotated[Optional[bool], typer.Option(
        "--tta/--no-tta", help="Test-time augmentation on or off for this run (default: as the model records it).")] = None,
    config: ConfigOpt = None, workdir: WorkdirOpt = None, json: JsonOpt = False, set: SetOpt = None,
) -> None:
    """Score a model on the test split. Accuracy, RMSE, MAE, within-one, per-count table, plots."""
    _call("evaluate", config, {"workdir": workdir}, set, json, manifest=manifest, model=model, tta=tta)


@app.command()
def deploy(
    mode: Annotated[Optional[str], typer.Option(help="realtime or serverless (SageMaker).")] = None,
    model_data: Annotated[Optional[str], typer.Option(help="model.tar.gz path or s3:// URI (default: the last trained).")] = None,
    endpoint_name: Annotated[Optional[str], typer.Option(help="SageMaker endpoint name.")] = None,
    port: Annotated[Optional[int], typer.Option(help="Local server port (0 = any free port).")] = None,
    backend: BackendOpt = None,
    config: ConfigOpt = None, workdir: WorkdirOpt = None, json: JsonOpt = False, set: SetOpt = None,
) -> None:
    """Start an endpoint for the model. The local server, or a SageMaker endpoint."""
    _call("deploy", config, {"workdir": workdir, "backend": backend, "deploy.mode": mode,
                                       "deploy.model_data": model_data, "deploy.endpoint_name": endpoint_name,
                                       "deploy.port": port}, set, json)


@app.command()
def predict(
    images: Annotated[list[str], typer.Argument(help="Image files, folders, or s3:// URIs.")],
    endpoint: Annotated[Optional[str], typer.Option(help="Endpoint URL or SageMaker endpoint name (default: the deployed one).")] = None,
    model: Annotated[Optional[Path], typer.Option(help="Predict with this model.tar.gz or model dir directly, no server.")] = None,
    format: Annotated[str, typer.Option("--format", "-f", help="table, json or csv.")] = "table",
    workers: Annotated[Optional[int], typer.Option(min=1, help="Concurrent requests.")] = None,
    backend: BackendOpt = None,
    config: ConfigOpt = None, workdir: WorkdirOpt = None, json: JsonOpt = False, set: SetOpt = None,
) -> None:
    """Count the objects in bin images. Uses the deployed endpoint or a model file."""
    _call("predict", config, {"workdir": workdir, "backend": backend, "deploy.workers": workers}, set, json,
          images=images, endpoint=endpoint, model=model, output_format="json" if json else format)


@app.command()
def audit(
    manifest: Annotated[Optional[Path], typer.Option(help="Bins with expected quantities (default splits/test.jsonl).")] = None,
    threshold: Annotated[float, typer.Option(min=0.0, max=1.0, help="Below this confidence a bin goes to a person for a recount.")] = 0.6,
    endpoint: Annotated[Optional[str], typer.Option(help="Endpoint URL or SageMaker endpoint name.")] = None,
    model: Annotated[Optional[Path], typer.Option(help="Use this model.tar.gz or model dir directly.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="CSV report (default reports/audit.csv).")] = None,
    top: Annotated[int, typer.Option(min=0, help="Rows of the list to print.")] = 15,
    backend: BackendOpt = None,
    config: ConfigOpt = None, workdir: WorkdirOpt = None, json: JsonOpt = False, set: SetOpt = None,
) -> None:
    """List bins whose count disagrees with the record. Ranked, with a recount threshold."""
    _call("audit", config, {"workdir": workdir, "backend": backend}, set, json,
          manifest=manifest, threshold=threshold, endpoint=endpoint, model=model, out=out, top=top)


@app.command()
def undeploy(
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    endpoint_name: Annotated[Optional[str], typer.Option(help="Endpoint to delete (default: the recorded one).")] = None,
    backend: BackendOpt = None,
    config: ConfigOpt = None, workdir: WorkdirOpt = None, json: JsonOpt = False, set: SetOpt = None,
) -> None:
    """Stop the endpoint. On SageMaker: delete endpoint, endpoint config and model."""
    _call("undeploy", config, {"workdir": workdir, "backend": backend,
                                         "deploy.endpoint_name": endpoint_name}, set, json, yes=yes)


@app.command()
def serve(
    model: Annotated[Optional[Path], typer.Option(help="model.tar.gz or model dir (default: the last trained).")] = None,
    host: Annotated[Optional[str], typer.Option(help="Bind address (default 127.0.0.1).")] = None,
    port: Annotated[Optional[int], typer.Option(help="Port (default 8080; 0 = any free port).")] = None,
    config: ConfigOpt = None, workdir: WorkdirOpt = None, set: SetOpt = None,
) -> None:
    """Run the local endpoint in the foreground. SageMaker contract: GET /ping, POST /invocations."""
    _call("serve", config, {"workdir": workdir, "deploy.host": host, "deploy.port": port}, set, False,
          model=model)


@app.command()
def status(
    backend: BackendOpt = None,
    config: ConfigOpt = None, workdir: WorkdirOpt = None, json: JsonOpt = False, set: SetOpt = None,
) -> None:
    """Show where the recorded data, jobs, model and endpoint stand."""
    _call("status", config, {"workdir": workdir, "backend": backend}, set, json)


@app.command()
def demo(
    images: Annotated[int, typer.Option(min=60, help="Synthetic bins to make.")] = 900,
    image_size: Annotated[int, typer.Option(min=32, help="Their size in pixels.")] = 128,
    budget: Annotated[float, typer.Option(min=0, help="Size training to take about this many seconds here (0 = as configured).")] = 120,
    config: ConfigOpt = None, workdir: WorkdirOpt = None, json: JsonOpt = False, set: SetOpt = None,
) -> None:
    """Run the whole pipeline offline on synthetic bins. Local S3 server, train, serve, audit."""
    _call("demo", config, {"workdir": workdir}, set, json, images=images, image_size=image_size, budget_s=budget)


@app.command("config")
def show_config(
    config: ConfigOpt = None, workdir: WorkdirOpt = None, json: JsonOpt = False, set: SetOpt = None,
) -> None:
    """Print the effective settings. Defaults < --config < BINCOUNT_* env < --set and flags."""
    _call("config", config, {"workdir": workdir}, set, json)
