"""Score a trained model on the test split (or any manifest): metrics, per-count table, plots.

Writes reports/<run>/metrics.json, confusion-matrix.png and training-curve.png: one folder per run scored (the run
the other commands use, or the run whose model --model names; reports/model-<digest>/ for a model from elsewhere),
so evaluating another run never overwrites the reports of the last.
The per-count table has the form the public ABID challenge reports its baseline in
(counts 0..5: 55.67% accuracy, RMSE 0.930), shown beside ours for comparison.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bincount.config import Settings
from bincount.errors import BincountError
from bincount.results import Result, key_value_table, per_class_table
from bincount.workspace import Workspace, atomic_write_bytes, atomic_write_text, read_jsonl, read_manifest

ABID_BASELINE = {"accuracy": 0.5567, "rmse": 0.930}  # ABID challenge baseline, moderate task (counts 0..5)
BATCH = 64


class EvalResult(Result):
    model: str  # the model dir scored (an archive or s3:// model is unpacked into models/cache/)
    manifest: str  # the manifest scored (default splits/test.jsonl)
    n: int  # images scored (readable ones; skipped images are left out of every metric)
    accuracy: float  # share of images whose predicted count is exact, 0..1
    rmse: float  # root mean squared error of the predicted count, in objects
    mae: float  # mean absolute error of the predicted count, in objects
    within_one: float  # share of images whose predicted count is off by at most one, 0..1
    per_count: list[dict[str, Any]]  # per true count present: count, n (images), accuracy (0..1) and rmse
    confusion: list[list[int]]  # [i][j]: images of true count classes[i] predicted as classes[j]
    classes: list[int]  # the counts the model predicts (meta.json), the confusion matrix's row and column labels
    baseline: dict[str, float] = ABID_BASELINE  # fixed ABID challenge baseline (counts 0..5): accuracy 0..1, rmse
    tta: bool = False  # whether test-time augmentation (8 views per image) was used
    skipped: int = 0  # images that could not be read (or were too large), left out of the metrics
    reports: dict[str, str] = {}  # file written -> its path: metrics, confusion_matrix, training_curve (with history)
    seconds: float | None = None  # the evaluation's wall time, seconds

    def rich(self) -> Any:
        from rich.console import Group

        summary = key_value_table(title=f"evaluation on {self.n} images")
        summary.add_row("accuracy", f"{self.accuracy:.2%}")
        summary.add_row("RMSE", f"{self.rmse:.3f}")
        summary.add_row("MAE", f"{self.mae:.3f}")
        summary.add_row("within one", f"{self.within_one:.2%}")
        summary.add_row("test-time augmentation", "on (8 views)" if self.tta else "off")
        if self.skipped:
            summary.add_row("skipped (unreadable)", str(self.skipped))
        for name, path in self.reports.items():
            summary.add_row(name, path)
        rows = [[r["count"], r["n"], f"{r['accuracy']:.2%}", r["rmse"]] for r in self.per_count]
        rows.append(["all", self.n, f"{self.accuracy:.2%}", self.rmse])  # accuracy in % everywhere, as above
        table = per_class_table("per count", ["count", "images", "accuracy", "RMSE"], rows)
        table.caption = (f"ABID challenge baseline (counts 0..5): {self.baseline['accuracy']:.2%} accuracy, "
                         f"RMSE {self.baseline['rmse']:.3f}")
        return Group(summary, table)


def compute_metrics(truth: list[int], predicted: list[int], classes: list[int]) -> dict[str, Any]:
    """Accuracy, RMSE, MAE, within-one accuracy, per-count accuracy/RMSE and the confusion matrix."""
    n = len(truth)
    if n == 0 or n != len(predicted):
        raise BincountError("nothing to evaluate (no predictions)")
    errors = [p - t for t, p in zip(truth, predicted)]
    index = {c: i for i, c in enumerate(classes)}
    confusion = [[0] * len(classes) for _ in classes]
    for t, p in zip(truth, predicted):
        if t in index and p in index:
            confusion[index[t]][index[p]] += 1
    per_count = []
    for c in sorted(set(truth)):
        errs = [e for t, e in zip(truth, errors) if t == c]
        per_count.append({"count": c, "n": len(errs), "accuracy": sum(e == 0 for e in errs) / len(errs),
                          "rmse": math.sqrt(sum(e * e for e in errs) / len(errs))})
    return {
        "n": n,
        "accuracy": sum(e == 0 for e in errors) / n,
        "rmse": math.sqrt(sum(e * e for e in errors) / n),
        "mae": sum(abs(e) for e in errors) / n,
        "within_one": sum(abs(e) <= 1 for e in errors) / n,
        "per_count": per_count,
        "confusion": confusion,
        "classes": list(classes),
    }


def _image_path(ws: Workspace, manifest: Path, image: str) -> Path:
    path = Path(image)
    if path.is_absolute():
        return path
    for base in (ws.root, manifest.parent):
        if (base / path).exists():
            return base / path
    return ws.root / path


def predict_counts(model_dir: Path, paths: list[Path], tta: bool | None = None,
                   advance: Callable[[int], None] | None = None) -> tuple[list[int | None], dict]:
    """Predicted counts (None for an unreadable image), batched under inference_mode; each image decoded once.

    tta: test-time augmentation; None = as the model records it (meta.json), as serving does.
    advance: called with the number of images after each batch (a progress bar's step).
    """
    import os
    from concurrent.futures import ThreadPoolExecutor

    import torch
    from PIL import Image

    from bincount.container import net

    try:
        model, meta = net.load_model(model_dir)
        size, mean, std, classes = meta["image_size"], meta["mean"], meta["std"], meta["classes"]
        tta = bool(meta.get("tta")) if tta is None else tta
    except Exception as exc:  # noqa: BLE001 - a broken model.pth or meta.json: one line, not a traceback
        from bincount.artifacts import load_error

        raise load_error(model_dir, exc) from None

    from bincount.container.inference import MAX_PIXELS

    def load(path: Path):
        try:
            with Image.open(path) as image:
                if image.width * image.height > MAX_PIXELS:  # from the header: a decompression bomb is not decoded
                    return None
                return net.decode(image, size)  # the decode training, serving and the shard reader use
        except Exception:  # noqa: BLE001 - unreadable, truncated or a bomb PIL refuses: skipped and counted
            return None

    out: list[int | None] = []
    with ThreadPoolExecutor(min(os.cpu_count() or 1, 8)) as pool, torch.inference_mode():
        for start in range(0, len(paths), BATCH):
            tensors = list(pool.map(load, paths[start:start + BATCH]))
            good = [t for t in tensors if t is not None]
            preds = iter([])
            if good:
                preds = iter(net.probabilities(model, torch.stack(good), mean, std, tta).argmax(1).tolist())
            out += [None if t is None else classes[next(preds)] for t in tensors]
            if advance is not None:
                advance(len(tensors))
    return out, {**meta, "tta": tta}


def load_history(model_dir: Path, meta: dict) -> list[dict[str, float]]:
    """Epoch metrics of the run: meta.json's history, else the run's epochs.jsonl."""
    history = meta.get("history") or []
    if not history:
        path = Path(model_dir).parent / "epochs.jsonl"
        if path.is_file():
            rows = {int(r["epoch"]): r for r in read_jsonl(path)}
            history = [rows[e] for e in sorted(rows)]
    return history


def plot_confusion(confusion: list[list[int]], classes: list[int], path: Path) -> None:
    _save(confusion_figure(confusion, classes), path)


def confusion_figure(confusion: list[list[int]], classes: list[int]) -> Any:
    """Counts beside the row-normalised matrix (each true count's row sums to 1), with n and accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = sum(map(sum, confusion))
    correct = sum(confusion[i][i] for i in range(len(classes)))
    rates = [[value / max(sum(row), 1) for value in row] for row in confusion]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
    views = ((axes[0], confusion, "images", lambda v: str(v)), (axes[1], rates, "share of the true count's row",
                                                                lambda v: f"{v:.2f}" if v else "0"))
    for ax, matrix, label, fmt in views:
        peak = max(max(row) for row in matrix) or 1
        image = ax.imshow(matrix, cmap="Blues", vmin=0, vmax=peak)
        for i, row in enumerate(matrix):
            for j, value in enumerate(row):
                ax.text(j, i, fmt(value), ha="center", va="center", fontsize=8,
                        color="white" if value > peak / 2 else "black")
        ax.set_xticks(range(len(classes)), classes)
        ax.set_yticks(range(len(classes)), [f"{c} (n={sum(confusion[i])})" for i, c in enumerate(classes)])
        ax.set_xlabel("predicted count")
        ax.set_ylabel("true count")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label=label)
    axes[0].set_title("images")
    axes[1].set_title("row-normalised (recall per count on the diagonal)")
    fig.suptitle(f"confusion matrix: n={n}, accuracy {correct / max(n, 1):.1%}")
    return fig


def plot_history(history: list[dict[str, float]], path: Path, kept_epoch: int | None = None) -> None:
    _save(history_figure(history, kept_epoch), path)


def history_figure(history: list[dict[str, float]], kept_epoch: int | None = None) -> Any:
    """Four panels on integer epochs: losses (log scale), val accuracy (0..1), val RMSE (counts), learning rate.

    The kept epoch is marked; a loss spike more than 10x the bulk of the curve is clipped (and marked) so it
    cannot flatten the rest.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    epochs = [h["epoch"] for h in history]
    series = lambda key: [h.get(key, math.nan) for h in history]  # noqa: E731
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5), sharex=True)
    (loss_ax, acc_ax), (rmse_ax, lr_ax) = axes
    losses = [v for key in ("train_loss", "val_loss") for v in series(key) if math.isfinite(v)]
    for key in ("train_loss", "val_loss"):
        loss_ax.plot(epochs, series(key), marker="o", markersize=3, label=key)
    if losses:  # log scale: the early epochs and the end both stay readable; a spike >10x the bulk is clipped
        ordered = sorted(losses)
        top = min(max(losses), 10 * ordered[int(0.75 * (len(ordered) - 1))])
        low = max(min(losses), 1e-6)
        loss_ax.set_yscale("log")
        loss_ax.set_ylim(low / 1.2, top * 1.2)
        clipped = [e for key in ("train_loss", "val_loss") for e, v in zip(epochs, series(key)) if v > top]
        if clipped:
            loss_ax.plot(clipped, [top * 1.1] * len(clipped), "r^", label=f"clipped ({len(clipped)})")
    loss_ax.set_title("loss")
    acc_ax.plot(epochs, series("val_acc"), marker="o", markersize=3, color="tab:green")
    acc_ax.set_ylim(0, 1)
    acc_ax.set_title("validation accuracy (exact count)")
    rmse_ax.plot(epochs, series("val_rmse"), marker="o", markersize=3, color="tab:red")
    rmse_ax.set_ylim(bottom=0)
    rmse_ax.set_title("validation RMSE (counts)")
    lr_ax.plot(epochs, series("lr"), marker="o", markersize=3, color="tab:purple")
    lr_ax.set_title("learning rate (at the start of each epoch)")
    lr_ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:.2e}"))
    for ax in axes.flat:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if kept_epoch is not None:
            ax.axvline(kept_epoch, color="gray", linestyle="--", linewidth=1, label=f"kept (epoch {kept_epoch})")
    for ax in (rmse_ax, lr_ax):
        ax.set_xlabel("epoch")
    loss_ax.legend(fontsize=8)
    acc_ax.legend(fontsize=8)
    return fig


def _save(fig, path: Path) -> None:
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def evaluate(settings: Settings, manifest: Path | None = None, model: Path | None = None,
             tta: bool | None = None) -> EvalResult:
    """Score the model on `manifest` (default splits/test.jsonl); write reports/<run>/metrics.json and the plots.

    tta overrides the model's recorded test-time augmentation for this evaluation (None: as recorded).
    """
    import time

    started = time.perf_counter()
    ws = Workspace(settings.workdir)
    manifest = Path(manifest) if manifest else ws.require(ws.split("test"), "run `bincount split` first")
    rows = read_manifest(manifest)
    if not rows:
        raise BincountError(f"{manifest} is empty")
    from bincount.artifacts import resolve_model

    model_dir = resolve_model(settings, model)
    from bincount.console import progress

    with progress() as bar:
        task = bar.add_task("scoring", total=len(rows))
        predicted, meta = predict_counts(model_dir, [_image_path(ws, manifest, r["image"]) for r in rows], tta,
                                         advance=lambda k: bar.advance(task, k))
    pairs = [(int(r["count"]), p) for r, p in zip(rows, predicted) if p is not None]
    if not pairs:
        raise BincountError(f"none of the {len(rows)} images in {manifest} could be read")
    result = compute_metrics([t for t, _ in pairs], [p for _, p in pairs], meta["classes"])
    from bincount.runs import report_dir

    folder = report_dir(ws, model)
    reports = {"metrics": folder / "metrics.json", "confusion_matrix": folder / "confusion-matrix.png"}
    plot_confusion(result["confusion"], result["classes"], reports["confusion_matrix"])
    history = load_history(model_dir, meta)
    if history:
        reports["training_curve"] = folder / "training-curve.png"
        kept = (meta.get("metrics") or {}).get("epoch")
        plot_history(history, reports["training_curve"], int(kept) if kept is not None else None)
    out = EvalResult(model=str(model_dir), manifest=str(manifest), skipped=len(rows) - len(pairs), tta=meta["tta"],
                     reports={k: str(v) for k, v in reports.items()}, **result,
                     seconds=round(time.perf_counter() - started, 3))
    atomic_write_text(reports["metrics"], out.model_dump_json(indent=2) + "\n")
    from bincount import tracking

    if folder != ws.reports and tracking.enabled(settings):  # the run's MLflow run gets the test metrics and reports
        tracking.log_run(settings, folder.name, metrics={f"eval_{k}": v for k, v in result.items()
                                                         if isinstance(v, (int, float))},
                         files=[Path(p) for p in reports.values()])
    return out
