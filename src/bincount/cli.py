"""The `bincount` command line: thin commands that parse options, call one stage, print its result.

The output contract: stdout carries the result and nothing else (a table in a terminal, ASCII tables
when piped, `--json` for the documented JSON of every result, see docs/schemas/); stderr carries what
is meant for people (progress, logs, the one-line `error: ...`). Exit 0 on success, 1 on an error the
user can fix (or a partial failure a result reports), 130 on Ctrl-C.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
import typer.core

from bincount.errors import BincountError

GLOBAL_FLAGS = ("-q", "--quiet", "-v", "--verbose")


class Group(typer.core.TyperGroup):
    """The command group: -q/--quiet and -v/--verbose work after the command too (`bincount audit -q`)."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        end = args.index("--") if "--" in args else len(args)
        hoisted = [a for a in args[:end] if a in GLOBAL_FLAGS]
        rest = [a for a in args[:end] if a not in GLOBAL_FLAGS] + args[end:]
        return super().parse_args(ctx, hoisted + rest)

    def get_command(self, ctx: Any, name: str) -> Any:
        """The command, its arguments' help without typer's Python type (`IMAGE <list[str]>`: the metavar says it),
        and each option that sets a setting naming it and its default (`[setting train.epochs, default 30]`)."""
        command = super().get_command(ctx, name)
        settings = option_settings(name)
        for param in getattr(command, "params", []):
            if isinstance(param, typer.core.TyperArgument):
                param.display_type_rich = lambda ctx: None
            elif param.name in settings and "[setting" not in (param.help or ""):
                key = settings[param.name]
                default = "" if "default" in (param.help or "") else setting_default(key)
                param.help = f"{param.help or ''} [setting {key}{default}]"
        return command


def option_settings(command: str) -> dict[str, str]:
    """{option's parameter name: the setting it sets}, read from the dict the command passes to _call."""
    import ast
    import inspect
    import textwrap

    for info in app.registered_commands:
        callback = info.callback
        if callback is None or (info.name or callback.__name__.replace("_", "-")) != command:
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(callback)))
        except (OSError, TypeError, SyntaxError):
            return {}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "_call" and len(node.args) > 2
                    and isinstance(node.args[2], ast.Dict)):
                return {v.id: k.value for k, v in zip(node.args[2].keys, node.args[2].values)
                        if isinstance(k, ast.Constant) and isinstance(v, ast.Name)}
    return {}


def setting_default(key: str) -> str:
    """', default 30' for a dotted setting key ('' when it has none worth showing)."""
    from bincount.config import Settings

    value: Any = Settings.model_construct()
    for part in key.split("."):
        field = type(value).model_fields.get(part) if hasattr(type(value), "model_fields") else None
        if field is None:
            return ""
        value = getattr(value, part, None)
        if value is None:
            value = field.get_default(call_default_factory=True)
    return "" if value is None or key == "workdir" else f", default {value}"


app = typer.Typer(
    cls=Group,
    help="Count the objects in warehouse bin photos, locally or on AWS SageMaker.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)

ConfigOpt = Annotated[Optional[Path], typer.Option(
    "--config", "-c", metavar="FILE",
    help="YAML config file (default: $BINCOUNT_CONFIG, else ./bincount.yaml, else <workdir>/bincount.yaml).")]
WorkdirOpt = Annotated[Optional[Path], typer.Option(
    "--workdir", "-w", metavar="DIR", help="Work dir holding raw/, splits/, state.json, models/, reports/.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout (progress goes to stderr).")]
def _choices(*values: str) -> Callable[[str], list[str]]:
    """Shell completion of an option's values."""
    return lambda incomplete: [v for v in values if v.startswith(incomplete)]


def setting_keys(incomplete: str) -> list[str]:
    """Shell completion of --set: every setting's dotted key, with its `=`."""
    from bincount.config import Settings

    def keys(model: Any, prefix: str) -> list[str]:
        out = []
        for name, field in model.model_fields.items():
            sub = field.annotation
            out += keys(sub, f"{prefix}{name}.") if hasattr(sub, "model_fields") else [f"{prefix}{name}="]
        return out

    return [k for k in keys(Settings, "") if k.startswith(incomplete)]


SetOpt = Annotated[Optional[list[str]], typer.Option(
    "--set", metavar="KEY=VALUE", autocompletion=setting_keys,
    help="Override any setting: --set train.epochs=3 (repeatable).")]
BackendOpt = Annotated[Optional[str], typer.Option("--backend", "-b", metavar="local|sagemaker",
                                                   autocompletion=_choices("local", "sagemaker"),
                                                   help="Where to run (default: the backend setting, local).")]


def examples(*lines: str) -> str:
    """A --help epilog of example command lines (kept as written, not rewrapped)."""
    return "\b\nExamples:\n" + "\n".join(f"  {line}" for line in lines)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"bincount {version('bincount')}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", "-V", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Results and errors only: no progress or logs.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Also the AWS and SageMaker SDKs' own logs.")] = False,
) -> None:
    """Count the objects in warehouse bin photos, locally or on AWS SageMaker."""
    from bincount.console import configure

    configure(quiet=quiet, verbose=verbose)


# Every command and, per backend, the function it runs ("module:function"; "*": any backend). A function
# is imported only when its command runs, so --help stays instant. The backend is settings.backend
# (--backend, default local); a command with no row for it is a one-line error. docs/architecture.md's
# command table is generated from this map (bincount.docs).
COMMANDS: dict[str, dict[str, str]] = {
    "synth": {"*": "bincount.data.synth:synth"},
    "index": {"*": "bincount.data.index:index"},
    "fetch": {"*": "bincount.data.fetch:fetch"},
    "split": {"*": "bincount.data.split:split"},
    "shard": {"local": "bincount.data.shard:shard", "sagemaker": "bincount.backends.sagemaker.processing:shard"},
    "upload": {"*": "bincount.data.upload:upload"},
    "tune": {"local": "bincount.backends.local.tune:tune", "sagemaker": "bincount.backends.sagemaker.tuning:tune"},
    "train": {"local": "bincount.backends.local.train:train", "sagemaker": "bincount.backends.sagemaker.training:train"},
    "evaluate": {"*": "bincount.evaluate:evaluate"},
    "deploy": {"local": "bincount.backends.local.endpoint:deploy_local",
               "sagemaker": "bincount.backends.sagemaker.endpoint:deploy"},
    "predict": {"local": "bincount.predict:predict", "sagemaker": "bincount.backends.sagemaker.endpoint:predict"},
    "audit": {"local": "bincount.audit.local:audit", "sagemaker": "bincount.backends.sagemaker.transform:audit"},
    "undeploy": {"local": "bincount.backends.local.endpoint:undeploy_local",
                 "sagemaker": "bincount.backends.sagemaker.endpoint:undeploy"},
    "doctor": {"*": "bincount.doctor:doctor"},
    "stop": {"*": "bincount.backends.sagemaker.jobs:stop"},
    "cleanup": {"*": "bincount.backends.sagemaker.cleanup:cleanup"},
    "serve": {"*": "bincount.serve:serve_forever"},
    "status": {"*": "bincount.status:status"},
    "runs": {"*": "bincount.runs:runs"},
    "demo": {"*": "bincount.demo:demo"},
    "config": {"*": "bincount.config:show"},
}
BACKENDS = ("local", "sagemaker")


def stage(command: str, backend: str = "local") -> Callable[..., Any]:
    """The function `command` runs with settings.backend = `backend`; a BincountError if it has none there."""
    rows = COMMANDS[command]
    target = rows.get(backend) or rows.get("*")
    if target is None:
        raise BincountError(f"`bincount {command}` has no {backend} backend: use --backend {' or '.join(rows)}")
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)


def _call(command: str, config: Path | None, options: dict[str, Any], sets: list[str] | None, json_out: bool,
          **kwargs: Any) -> Any:
    """Load settings (defaults < --config < env < --set < flags), run the command's stage, print its result."""
    import os

    from bincount.config import find_config, load_settings
    from bincount.config_layers import parse_set_option

    try:
        overrides = parse_set_option(sets or [])
        overrides.update({k: v for k, v in options.items() if v is not None})
        config = find_config(config, dict(os.environ), overrides.get("workdir") or os.environ.get("BINCOUNT_WORKDIR"))
        settings = load_settings(config, overrides)
        if command == "config":
            kwargs["config_file"] = config
        from bincount.workspace import command_lock

        with command_lock(settings.workdir, command):  # two writers on one work dir: the second refuses
            result = stage(command, settings.backend)(settings, **kwargs)
    except BincountError as exc:
        _fail(str(exc))
    except KeyboardInterrupt as exc:  # a stage may say what its interruption left behind (a running job)
        _fail(str(exc) or "interrupted (work done so far is kept; run the command again to resume)", code=130)
    _print(result, json_out)
    return result


def _fail(message: str, code: int = 1) -> None:
    from rich.markup import escape

    from bincount.console import error_console

    message = message.replace("\r", "\\r").replace("\n", "\\n")  # one line, whatever the input held
    error_console().print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


PIPE_WIDTH = 100_000  # a table's width when stdout is not a terminal: its natural width, never cut


def _print(result: Any, json_out: bool) -> None:
    """The result on stdout: JSON, or its view (ASCII tables when stdout is not a terminal)."""
    if result is None:
        return
    if json_out:
        sys.stdout.write(result.model_dump_json(indent=2) + "\n")
    else:
        from bincount.console import make_console
        from bincount.results import plain_boxes

        # markup off: paths, ids and errors in results are printed as they are (`[/]` in a file name is no tag);
        # a result styles its cells with rich Text, not markup; control characters are shown escaped
        # piped (a file, `| grep`, CI): as wide as the widest line, so no path or ARN is cut to `…`
        tty = sys.stdout.isatty()
        console = make_console(soft_wrap=not tty, markup=False, **({} if tty else {"width": PIPE_WIDTH}))
        view = result.rich()
        console.print(view if console.is_terminal else plain_boxes(view))
    sys.stdout.flush()
    exit_code = getattr(result, "exit_code", 0)
    if exit_code:
        raise typer.Exit(exit_code)


@app.command(epilog=examples("bincount synth --images 600 --out bins/", "bincount synth -n 60 --counts 1-5 --image-size 64"))
def synth(
    out: Annotated[Optional[Path], typer.Option(metavar="DIR", help="Output folder (bucket layout). Default: <workdir>/synth.")] = None,
    images: Annotated[int, typer.Option("--images", "-n", metavar="N", min=1, help="How many bins to draw.")] = 600,
    image_size: Annotated[int, typer.Option(metavar="PX", min=32, help="Image width and height in pixels.")] = 128,
    counts: Annotated[Optional[str], typer.Option(metavar="RANGE", help="Counts to draw, e.g. 1-5 (default 0..data.max_count).")] = None,
    seed: Annotated[int, typer.Option(metavar="N", help="Random seed: the same seed makes the same files.")] = 0,
    start_id: Annotated[int, typer.Option(metavar="ID", min=1, help="First image id.")] = 1,
    config: ConfigOpt = None, workdir: WorkdirOpt = None, json: JsonOpt = False, set: SetOpt = None,
) -> None:
    """Make synthetic bin photos in the ABID layout. No network needed: for tests and demos."""
    _call("synth", config, {"workdir": workdir}, set, json,
          out=out, n=images, image_size=image_size, counts=counts, seed=seed, start_id=start_id)


@app.command(epilog=examples("bincount index -w run1 --workers 64",
                             "bincount index --source s3://my-bucket/abid --endpoint-url http://127.0.0.1:9000"))
def index(
    source: Annotated[Optional[str], typer.Option(metavar="URI|DIR", help="s3://bucket[/prefix] or a local folder in the bucket layout.")] = None,
    endpoint_url: Annotated[Optional[str], typer.Option(metavar="URL", help="S3 API endpoint (as the AWS CLI's --endpoint-url), e.g. http://127.0.0.1:9000.")] = None,
    workers: Annotated[Optional[int], typer.Option(metavar="N", min=1, help="Concurrent requests.")] = None,
    config: ConfigOpt = None, workdir: WorkdirOpt = None, json: JsonOpt = False, set: SetOpt = None,
) -> None:
    """Read every label of the bucket once into <workdir>/index.sqlite. Concurrent and resumable."""
    _call("index", config, {"workdir": workdir, "data.source": source, "data.endpoint_url": endpoint_url,
                            "data.workers": workers}, set, json)


@app.command(epilog=examples(
    "bincount fetch --balanced --limit 3000 --counts 0-5 -w run1",
    "bincount fetch --id-file capstone_file_list.json --counts 1-5 -w run1",
    "bincount fetch --ids 1-20000 --limit 5000",
    "bincount fetch --source s3://my-bucket/abid --endpoint-url http://127.0.0.1:9000"))
def fetch(
    source: Annotated[Optional[str], typer.Option(metavar="URI|DIR", help="s3://bucket[/prefix] or a local folder in the bucket layout.")] = None,
    endpoint_url: Annotated[Optional[str], typer.Option(metavar="URL", help="S3 API endpoint (as the AWS CLI's --endpoint-url), e.g. http://127.0.0.1:9000.")] = None,
    limit: Annotated[Optional[int], typer.Option(metavar="N", min=1, help="At most this many usable items.")] = None,
    ids: Annotated[Optional[str], typer.Option(metavar="RANGE", help="Id range or list: 1-5000 or 4,9915,100313.")] = None,
    id_file: Annotated[Optional[Path], typer.Option(metavar="FILE", help="File of ids, one a line, or the capstone JSON list.")] = None,
    counts: Annotated[Optional[str], typer.Option(metavar="RANGE", help="Keep only these counts, e.g. 1-5 (default 0..max_count).")] = None,
    balanced: Annotated[Optional[bool], typer.Option("--balanced/--no-balanced", help="Equal numbers per count.")] = None,
    workers: Annotated[Optional[int], typer.Option(metavar="N", min=1, help="Concurrent requests.")] = None,
    max_count: Annotated[Optional[int], typer.Option(metavar="N", min=1, help="Classes are counts 0..N (data.max_count).")] = None,
    use_index: Annotated[Optional[bool], typer.Option(
        "--index/--no-index", help="Select from index.sqlite (default: when complete and from this source).")] = None,
    config: ConfigOpt = None, workdir: WorkdirOpt = None, json: JsonOpt = False, set: SetOpt = None,
) -> None:
    """Download bin images and labels, write manifest.jsonl. Concurrent and resumable."""
    _call("fetch", config, {
        "workdir": workdir, "data.source": source, "data.endpoint_url": endpoint_url, "data.limit": limit,
        "data.ids": ids, "data.id_file": id_file, "data.counts": counts, "data.balanced": balanced,
        "data.workers": workers, "data.max_count": max_count, "data.index": use_index}, set, json)


@app.command(epilog=examples("bincount split -w run1", "bincount split --train 0.7 --val 0.1 --test 0.2 --seed 1"))
def split(
    train: Annotated[Optional[float], typer.Option(metavar="SHARE", help="Train share (default 0.6).")] = None,
    val: Annotated[Optional[float], typer.Option(metavar="SHARE", help="Validation share (default 0.2).")] = None,
    test: Annotated[Optional[float], typer.Option(metavar="SHARE", help="Test share (default 0.2).")] = None,
    seed: Annotated[Optional[int], typer.Option(metavar="N", help="Random seed.")] = None,
    from_index: Annotated[bool, typer.Option("--from-index", help="Split the indexed bins (no fetch): for `bincount shard`.")] = False,
    counts: Annotated[Optional[str], typer.Option(metavar="RANGE", help="--from-index: only these counts, e.g. 1-5.")] = None,
    limit: Annotated[Optional[int], typer.Option(metavar="N", min=1, help="--from-index: at most this many bins.")] = None,
    balanced: Annotated[Optional[bool], typer.Option("--balanced/--no-balanced", help="--from-index: equal numbers per count.")] = None,
    config: ConfigOpt = None, workdir: WorkdirOpt = None, json: JsonOpt = False, set: SetOpt = None,
) -> None:
    """Split the manifest into train/val/test. Stratified by count and seeded."""
    _call("split", config, {"workdir": workdir, "split.train": train, "split.val": val,
                            "split.test": test, "split.seed": seed, "data.counts": counts,
                            "data.limit": limit, "data.balanced": balanced}, set, json, from_index=from_index)


@app.command(epilog=examples("bincount upload --bucket my-bincount-bucket -w run1", "bincount upload -c aws.yaml"))
def upload(
    bucket: Annotated[Optional[str], typer.Option(metavar="NAME", help="Destination bucket.")] = None,
    prefix: Annotated[Optional[str], typer.Option(metavar="PREFIX", help="Key prefix (default bincount).")] = None,
    endpoint_url: Annotated[Optional[str], typer.Option(metavar="URL", help="S3 API endpoint (as the AWS CLI's --endpoint-url).")] = None,
    workers: Annotated[Optional[int], typer.Option(metavar="N", min=1, help="Concurrent uploads.")] = None,
    config: ConfigOpt = None, workdir: WorkdirOpt = None, json: JsonOpt = False, set: SetOpt = None,
) -> None:
    """Sync the splits to S3 as training channels. Unchanged files are skipped."""
    _call("upload", config, {"workdir": workdir, "s3.bucket": bucket, "s3.prefix": prefix,
                             "s3.endpoint_url": endpoint_url, "s3.workers": workers}, set, json)


@app.command(epilog=examples("bincount shard -w run1 --set shard.max_side=448",
                             "bincount shard -c aws.yaml --backend sagemaker --no-wait"))
def shard(
    items_per_shard: Annotated[Optional[int], typer.Option(metavar="N", min=1, help="Items per tar file.")] = None,
    max_side: Annotated[Optional[int], typer.Option(metavar="PX", min=16, help="Longest image side kept (default 2 x train.image_size).")] = None,
    workers: Annotated[Optional[int], typer.Option(metavar="N", min=1, help="Concurrent image reads and encodes.")] = None,
    wait: Annotated[Optional[bool], typer.Option("--wait/--no-wait", help="SageMaker: wait for the Processing job.")] = None,
    backend: BackendOpt = None,
    config: ConfigOpt = None, workdir: WorkdirOpt = None, json: JsonOpt = False, set: SetOpt = None,
) -> None:
    """Pack the splits into tar shards for streaming. Locally, or bucket to bucket by a Processing job."""
    _call("shard", config, {"workdir": workdir, "backend": backend, "shard.items_per_shard": items_per_shard,
                            "shard.max_side": max_side, "shard.workers": workers, "shard.wait": wait}, set, json)


@app.command(epilog=examples("bincount tune -w run1 --max-jobs 8 --epochs 5",
                             "bincount tune -c aws.yaml --max-jobs 8 --max-parallel-jobs 2 --no-wait"))
def tune(
    max_jobs: Annotated[Optional[int], typer.Option(metavar="N", min=1, help="Trials in total.")] = None,
    max_parallel_jobs: Annotated[Optional[int], typer.Option(metavar="N", min=1, help="Trials at once.")] = None,
    objective: Annotated[Optional[str], typer.Option(metavar="val_acc|val_rmse", help="val_acc (maximise) or val_rmse (minimise).")] = None,
    epochs: Annotated[Optional[int], typer.Option(metavar="N", min=1, help="Epochs per trial.")] = None,
    wait: Annotated[Optional[bool], typer.Option("--wait/--no-wait", help="Wait for the tuning job to end.")] = None,
    backend: BackendOpt = None,
    config: ConfigOpt = None, workdir: WorkdirOpt = None, json: JsonOpt = False, set: SetOpt = None,
) -> None:
    """Search hyperparameters and record the best. SageMaker HyperparameterTuner, or Optuna locally."""
    _call("tune", config, {"workdir": workdir, "backend": backend, "tune.max_jobs": max_jobs,
                           "tune.max_parallel_jobs": max_parallel_jobs, "tune.objective": objective,
                           "tune.epochs": epochs, "tune.wait": wait}, set, json)


@app.command(epilog=examples("bincount train -w run1 --epochs 30", "bincount train -w run1 --use-best",
                             "bincount train -c aws.yaml --use-best --no-wait"))
def train(
    epochs: Annotated[Optional[int], typer.Option(metavar="N", min=1, help="Epochs.")] = None,
    arch: Annotated[Optional[str], typer.Option(metavar="NAME", autocompletion=_choices(
        "resnet18", "resnet34", "resnet50", "mobilenet_v3_small", "mobilenet_v3_large"), help="resnet18, resnet34, resnet50, mobilenet_v3_small, mobilenet_v3_large.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(metavar="N", min=1, help="Batch size.")] = None,
    lr: Annotated[Optional[float], typer.Option(metavar="RATE", help="Peak learning rate.")] = None,
    image_size: Annotated[Optional[int], typer.Option(metavar="PX", help="Input size in pixels.")] = None,
    pretrained: Annotated[Optional[str], typer.Option(metavar="imagenet|none|FILE", help="ImageNet weights, none, or a local weights file.")] = None,
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


@app.command(epilog=examples("bincount evaluate -w run1", "bincount evaluate -w run1 --model model.tar.gz --no-tta",
                             "bincount evaluate -w run1 --json | jq .accuracy"))
def evaluate(
    manifest: Annotated[Optional[Path], typer.Option(metavar="FILE", help="Manifest to score (default splits/test.jsonl).")] = None,
    model: Annotated[Optional[Path], typer.Option(metavar="PATH", help="model.tar.gz or model dir (default: the last trained).")] = None,
    tta: Annotated[Optional[bool], typer.Option(
        "--tta/--no-tta", help="Test-time augmentation on or off for this run (default: as the model records it).")] = None,
    config: ConfigOpt = None, workdir: WorkdirOpt = None, json: JsonOpt = False, set: SetOpt = None,
) -> None:
    """Score a model on the test split. Accuracy, RMSE, MAE, within-one, per-count table, plots."""
    _call("evaluate", config, {"workdir": workdir}, set, json, manifest=manifest, model=model, tta=tta)


@app.command(epilog=examples("bincount deploy -w run1", "bincount deploy -w run1 --port 0",
                             "bincount deploy -c aws.yaml --mode serverless --endpoint bincount-prod"))
def deploy(
    mode: Annotated[Optional[str], typer.Option(metavar="realtime|serverless", help="Endpoint kind (serverless: SageMaker only).")] = None,
    model: Annotated[Optional[str], typer.Option("--model", metavar="PATH|URI", help="model.tar.gz path or s3:// URI (default: the last trained).")] = None,
    endpoint: Annotated[Optional[str], typer.Option(metavar="NAME", help="SageMaker endpoint name (default bincount-<timestamp>).")] = None,
    port: Annotated[Optional[int], typer.Option(metavar="PORT", help="Local server port (0 = any free port).")] = None,
    backend: BackendOpt = None,
    config: ConfigOpt = None, workdir: WorkdirOpt = None, json: JsonOpt = False, set: SetOpt = None,
) -> None:
    """Start an endpoint for the model. The local server, or a SageMaker endpoint."""
    _call("deploy", config, {"workdir": workdir, "backend": backend, "deploy.mode": mode,
                             "deploy.model_data": model, "deploy.endpoint_name": endpoint,
                             "deploy.port": port}, set, json)


@app.command(epilog=examples("bincount predict -w run1 bins/ some.jpg s3://aft-vbi-pds/bin-images/00004.jpg",
                             "bincount predict --model model.tar.gz bins/ -f csv > counts.csv",
                             "bincount predict --endpoint http://127.0.0.1:8080 bin.jpg --json"))
def predict(
    images: Annotated[list[str], typer.Argument(metavar="IMAGE", help="Image files, folders, or s3:// URIs.")],
    endpoint: Annotated[Optional[str], typer.Option(metavar="URL|NAME", help="Endpoint URL or SageMaker endpoint name (default: the deployed one).")] = None,
    model: Annotated[Optional[Path], typer.Option(metavar="PATH", help="Predict with this model.tar.gz or model dir directly, no server.")] = None,
    format: Annotated[Optional[str], typer.Option("--format", "-f", metavar="table|json|csv", autocompletion=_choices("table", "json", "csv"), help="Output format (default table; --json is -f json).")] = None,
    workers: Annotated[Optional[int], typer.Option(metavar="N", min=1, help="Concurrent requests.")] = None,
    backend: BackendOpt = None,
    config: ConfigOpt = None, workdir: WorkdirOpt = None, json: JsonOpt = False, set: SetOpt = None,
) -> None:
    """Count the objects in bin images. Uses the deployed endpoint or a model file."""
    if json and format not in (None, "json"):
        _fail(f"--json and --format {format} disagree: give one of them")
    if format not in (None, "table", "json", "csv"):
        _fail(f"--format {format}: expected table, json or csv")
    output = "json" if json else format or "table"
    _call("predict", config, {"workdir": workdir, "backend": backend, "deploy.workers": workers}, set, False,
          images=images, endpoint=endpoint, model=model, output_format=output)


@app.command(epilog=examples("bincount audit -w run1 --threshold 0.6", "bincount audit -w run1 --source tonight.jsonl --out audit.csv",
                             "bincount audit --model model.tar.gz --source s3://my-bucket/warehouse-7/ --json",
                             "bincount audit -c aws.yaml --source s3://my-bucket/warehouse-7/ --no-wait"))
def audit(
    source: Annotated[Optional[str], typer.Option(metavar="FILE|DIR|S3URI", help="Bins to audit: a manifest (.jsonl), a folder or an s3:// prefix in the bucket layout (default splits/test.jsonl).")] = None,
    manifest: Annotated[Optional[Path], typer.Option(metavar="FILE", help="A manifest of bins with expected quantities (same as --source FILE).")] = None,
    threshold: Annotated[float, typer.Option(metavar="P", min=0.0, max=1.0, help="Below this confidence a bin goes to a person for a recount.")] = 0.6,
    endpoint: Annotated[Optional[str], typer.Option(metavar="URL|NAME", help="Endpoint URL or SageMaker endpoint name.")] = None,
    model: Annotated[Optional[Path], typer.Option(metavar="PATH", help="Use this model.tar.gz or model dir directly.")] = None,
    out: Annotated[Optional[Path], typer.Option(metavar="FILE", help="CSV report (default reports/audit.csv).")] = None,
    top: Annotated[Optional[int], typer.Option(metavar="N", min=0, help="Rows of the ranking to print (default audit.top).")] = None,
    workers: Annotated[Optional[int], typer.Option(metavar="N", min=1, help="Local scoring workers (default: one per core).")] = None,
    wait: Annotated[Optional[bool], typer.Option("--wait/--no-wait", help="SageMaker: wait for the Batch Transform job, or return at once.")] = None,
    collect: Annotated[bool, typer.Option("--collect", help="SageMaker: join the outputs of the recorded Batch Transform job.")] = False,
    backend: BackendOpt = None,
    config: ConfigOpt = None, workdir: WorkdirOpt = None, json: JsonOpt = False, set: SetOpt = None,
) -> None:
    """List bins whose count disagrees with the record. Ranked, resumable; Batch Transform on SageMaker."""
    _call("audit", config, {"workdir": workdir, "backend": backend, "audit.workers": workers,
                            "transform.wait": wait}, set, json,
          manifest=manifest, threshold=threshold, endpoint=endpoint, model=model, out=out, top=top, source=source,
          collect=collect)


@app.command(epilog=examples("bincount undeploy -w run1", "bincount undeploy -c aws.yaml --yes"))
def undeploy(
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    endpoint: Annotated[Optional[str], typer.Option(metavar="NAME", help="SageMaker endpoint to delete (default: the recorded one).")] = None,
    backend: BackendOpt = None,
    config: ConfigOpt = None, workdir: WorkdirOpt = None, json: JsonOpt = False, set: SetOpt = None,
) -> None:
    """Stop the endpoint. On SageMaker: delete endpoint, endpoint config and model."""
    _call("undeploy", config, {"workdir": workdir, "backend": backend,
                               "deploy.endpoint_name": endpoint}, set, json, yes=yes)


@app.command(epilog=examples("bincount doctor -c aws.yaml", "bincount doctor -c aws.yaml --json"))
def doctor(
    config: ConfigOpt = None, workdir: WorkdirOpt = None, json: JsonOpt = False, set: SetOpt = None,
) -> None:
    """Check the AWS setup before spending money. Credentials, region, role, bucket, instances, weights, quota."""
    _call("doctor", config, {"workdir": workdir}, set, json)


@app.command(epilog=examples("bincount stop -c aws.yaml", "bincount stop --job bincount-2026-01-01-00-00-00-000 --yes"))
def stop(
    job: Annotated[Optional[str], typer.Option(metavar="NAME", help="Training or tuning job name (default: the recorded ones still running).")] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    config: ConfigOpt = None, workdir: WorkdirOpt = None, json: JsonOpt = False, set: SetOpt = None,
) -> None:
    """Stop a SageMaker training or tuning job (one started with --no-wait, or any by name)."""
    _call("stop", config, {"workdir": workdir}, set, json, job=job, yes=yes)


@app.command(epilog=examples("bincount cleanup -c aws.yaml", "bincount cleanup -c aws.yaml --yes"))
def cleanup(
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    config: ConfigOpt = None, workdir: WorkdirOpt = None, json: JsonOpt = False, set: SetOpt = None,
) -> None:
    """Delete what bincount made on AWS. Stops jobs; deletes endpoints, configs, models and its S3 data."""
    _call("cleanup", config, {"workdir": workdir}, set, json, yes=yes)


@app.command(epilog=examples("bincount serve -w run1", "bincount serve --model model.tar.gz --port 0"))
def serve(
    model: Annotated[Optional[Path], typer.Option(metavar="PATH", help="model.tar.gz or model dir (default: the last trained).")] = None,
    host: Annotated[Optional[str], typer.Option(metavar="ADDR", help="Bind address (default 127.0.0.1).")] = None,
    port: Annotated[Optional[int], typer.Option(metavar="PORT", help="Port (default 8080; 0 = any free port).")] = None,
    config: ConfigOpt = None, workdir: WorkdirOpt = None, json: JsonOpt = False, set: SetOpt = None,
) -> None:
    """Run the local endpoint in the foreground. SageMaker contract: GET /ping, POST /invocations.

    gunicorn, one worker process with deploy.threads threads. SIGTERM or Ctrl-C: finishes the requests it took,
    exits 0 (with --json, after printing the URL, model and what stopped it).
    """
    _call("serve", config, {"workdir": workdir, "deploy.host": host, "deploy.port": port}, set, json,
          model=model)


@app.command(epilog=examples("bincount status -w run1", "bincount status -c aws.yaml --json"))
def status(
    backend: BackendOpt = None,
    config: ConfigOpt = None, workdir: WorkdirOpt = None, json: JsonOpt = False, set: SetOpt = None,
) -> None:
    """Show where the recorded data, jobs, model and endpoint stand."""
    _call("status", config, {"workdir": workdir, "backend": backend}, set, json)


@app.command(epilog=examples("bincount runs -w run1", "bincount runs -w run1 --use best",
                             "bincount runs -w run1 --use 20260101-120000", "bincount runs -w run1 --use latest --json"))
def runs(
    use: Annotated[Optional[str], typer.Option(metavar="NAME|best|latest", help=(
        "The run evaluate, deploy, predict and audit use: a run's name, best (by tune.objective among runs on the "
        "same val data) or latest (the newest run, the default; follows new runs)."))] = None,
    config: ConfigOpt = None, workdir: WorkdirOpt = None, json: JsonOpt = False, set: SetOpt = None,
) -> None:
    """List every training run (metrics, time, size on disk) and choose the one the other commands use."""
    _call("runs", config, {"workdir": workdir}, set, json, use=use)


@app.command(epilog=examples("bincount demo --config configs/demo.yaml", "bincount demo --images 300 --budget 60"))
def demo(
    images: Annotated[int, typer.Option("--images", "-n", metavar="N", min=60, help="Synthetic bins to make.")] = 900,
    image_size: Annotated[int, typer.Option(metavar="PX", min=32, help="Their size in pixels.")] = 128,
    budget: Annotated[float, typer.Option(metavar="SECONDS", min=0, help="Size training to take about this long here (0 = as configured).")] = 120,
    config: ConfigOpt = None, workdir: WorkdirOpt = None, json: JsonOpt = False, set: SetOpt = None,
) -> None:
    """Run the whole pipeline offline on synthetic bins. Local S3 server, train, serve, audit."""
    _call("demo", config, {"workdir": workdir}, set, json, images=images, image_size=image_size, budget_s=budget)


@app.command("config", epilog=examples("bincount config", "BINCOUNT_CONFIG=aws.yaml bincount config --json"))
def show_config(
    config: ConfigOpt = None, workdir: WorkdirOpt = None, json: JsonOpt = False, set: SetOpt = None,
) -> None:
    """Print the effective settings. Defaults < config file < BINCOUNT_* env < --set and flags."""
    _call("config", config, {"workdir": workdir}, set, json)
