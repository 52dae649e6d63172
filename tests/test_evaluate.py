"""Metrics on a hand-made case, `evaluate` end to end on a small untrained model and on the session's trained run."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from bincount.artifacts import write_model_dir
from bincount.config import load_settings
from bincount.errors import BincountError
from bincount.evaluate import compute_metrics, evaluate, predict_counts
from bincount.state import LocalTraining
from bincount.workspace import Workspace, write_jsonl


def test_metrics_by_hand():
    truth = [0, 1, 1, 2, 3, 5, 5]
    predicted = [0, 1, 2, 2, 1, 5, 4]
    m = compute_metrics(truth, predicted, list(range(6)))
    assert m["n"] == 7
    assert m["accuracy"] == pytest.approx(4 / 7)  # float division, not 0
    assert m["mae"] == pytest.approx(4 / 7)  # |errors| = 0,0,1,0,2,0,1
    assert m["rmse"] == pytest.approx(math.sqrt(6 / 7))
    assert m["within_one"] == pytest.approx(6 / 7)
    per = {r["count"]: r for r in m["per_count"]}
    assert per[1]["accuracy"] == 0.5 and per[1]["rmse"] == pytest.approx(math.sqrt(0.5))
    assert per[3] == {"count": 3, "n": 1, "accuracy": 0.0, "rmse": 2.0}
    assert 4 not in per  # only counts present in the truth get a row
    assert m["confusion"][3][1] == 1 and m["confusion"][5][4] == 1 and sum(map(sum, m["confusion"])) == 7
    with pytest.raises(BincountError):
        compute_metrics([], [], [0, 1])


def _model_dir(dest: Path) -> Path:
    history = [{"epoch": 1, "train_loss": 1.7, "val_loss": 1.8, "val_acc": 0.2, "val_rmse": 1.9, "lr": 0.001},
               {"epoch": 2, "train_loss": 1.5, "val_loss": 1.6, "val_acc": 0.3, "val_rmse": 1.5, "lr": 0.0005}]
    return write_model_dir(dest, "mobilenet_v3_small", history=history)


def test_evaluate_writes_metrics_and_plots(synth_source, tmp_path):
    from bincount.artifacts import package_model

    ws = Workspace(tmp_path)
    rows = [{"id": p.stem, "count": json.loads((synth_source / "metadata" / f"{p.stem}.json").read_text())
             ["EXPECTED_QUANTITY"], "image": str(p)} for p in sorted((synth_source / "bin-images").glob("*.jpg"))[:20]]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not a jpeg")
    write_jsonl(ws.split("test"), rows + [{"id": "x", "count": 1, "image": str(broken)}])
    settings = load_settings(overrides={"workdir": str(tmp_path)}, environ={})

    with pytest.raises(BincountError, match="run `bincount train` first"):
        evaluate(settings)

    tar = package_model(_model_dir(tmp_path / "m"), tmp_path / "model.tar.gz")
    result = evaluate(settings, model=tar)
    assert result.n == 20 and result.skipped == 1
    # The metrics are those of the model's own per-image predictions, and the confusion matrix adds up to them.
    predicted, _ = predict_counts(tmp_path / "m", [Path(r["image"]) for r in rows])
    expected = compute_metrics([r["count"] for r in rows], predicted, list(range(6)))
    assert {key: getattr(result, key) for key in expected} == expected
    assert sum(map(sum, result.confusion)) == sum(r["n"] for r in result.per_count) == result.n
    assert result.accuracy == sum(result.confusion[i][i] for i in range(6)) / result.n
    folder = Path(result.reports["metrics"]).parent  # a model from outside the work dir's runs: its own folder
    assert folder.parent == tmp_path / "reports" and folder.name.startswith("model-")
    saved = json.loads((folder / "metrics.json").read_text())
    assert saved["accuracy"] == result.accuracy and saved["baseline"] == {"accuracy": 0.5567, "rmse": 0.93}
    for name in ("confusion-matrix.png", "training-curve.png"):
        assert (folder / name).read_bytes()[:4] == b"\x89PNG"

    # The model recorded in state.json is the default; its reports go to reports/<run>/ (issue 23.4).
    ws.update_state(training=LocalTraining(job="run", model_data=str(tar), model_dir=str(tmp_path / "gone")))
    again = evaluate(settings)
    assert again.accuracy == result.accuracy and again.reports["metrics"] == str(tmp_path / "reports" / "run" / "metrics.json")
    assert saved == json.loads((folder / "metrics.json").read_text())  # the other model's reports are kept


def test_evaluate_the_trained_run_from_the_state_then_its_archive(trained_run, cli, tmp_path):
    """The session's trained run: evaluate the recorded model on the test split, then the archive given."""
    workdir = shutil.copytree(trained_run.workdir, tmp_path / "w")  # evaluate writes reports/
    res = cli("evaluate", "--workdir", workdir, "--json")
    assert res.exit_code == 0, res.stderr
    metrics = json.loads(res.stdout)
    assert metrics["n"] == 24 and sum(r["n"] for r in metrics["per_count"]) == 24
    assert metrics["accuracy"] == pytest.approx(trained_run.out["metrics"]["test_acc"], abs=1e-6)
    for name in ("metrics.json", "confusion-matrix.png", "training-curve.png"):
        assert (workdir / "reports" / trained_run.run.name / name).stat().st_size > 0
    res = cli("evaluate", "--workdir", workdir, "--model", trained_run.out["model_data"])
    assert res.exit_code == 0, res.stderr
    assert "55.67% accuracy, RMSE 0.930" in res.stdout


def test_a_broken_model_is_a_one_line_error(tmp_path):
    model = _model_dir(tmp_path / "m")
    (model / "model.pth").write_bytes(b"not a state dict")
    write_jsonl(tmp_path / "m.jsonl", [{"id": "1", "count": 1, "image": str(tmp_path / "any.jpg")}])
    settings = load_settings(overrides={"workdir": str(tmp_path)}, environ={})
    with pytest.raises(BincountError, match="cannot load the model in .*: UnpicklingError") as err:
        evaluate(settings, manifest=tmp_path / "m.jsonl", model=model)
    assert "\n" not in str(err.value)


def test_evaluate_predicts_as_the_served_model_does_with_tta(synth_source, tmp_path):
    from bincount.container import inference
    from bincount.evaluate import predict_counts

    paths = sorted((synth_source / "bin-images").glob("*.jpg"))[:12]
    model = write_model_dir(tmp_path / "m", "resnet18", seed=5, tta=True)
    counts, meta = predict_counts(model, paths)
    bundle = inference.model_fn(str(model))
    served = [inference.predict_fn(inference.input_fn(p.read_bytes(), "image/jpeg"), bundle)[0]["count"] for p in paths]
    assert meta["tta"] is True and counts == served


def test_evaluate_can_switch_the_models_tta_for_one_run(synth_source, tmp_path):
    rows = [{"id": p.stem, "count": 1, "image": str(p)} for p in sorted((synth_source / "bin-images").glob("*.jpg"))[:8]]
    write_jsonl(tmp_path / "m.jsonl", rows)
    settings = load_settings(overrides={"workdir": str(tmp_path)}, environ={})
    model = write_model_dir(tmp_path / "m", "resnet18", seed=5, tta=True)
    assert evaluate(settings, manifest=tmp_path / "m.jsonl", model=model).tta is True  # as recorded
    off = evaluate(settings, manifest=tmp_path / "m.jsonl", model=model, tta=False)
    assert off.tta is False and json.loads(Path(off.reports["metrics"]).read_text())["tta"] is False


def test_training_curve_separates_scales_marks_the_kept_epoch_and_survives_a_spike():
    from bincount.evaluate import history_figure

    history = [{"epoch": e, "train_loss": 2 / e, "val_loss": 2.2 / e + (500 if e == 3 else 0),
                "val_acc": 0.1 * e, "val_rmse": 1 / e, "lr": 1e-3 / e} for e in range(1, 6)]
    fig = history_figure(history, kept_epoch=4)
    axes = {ax.get_title(): ax for ax in fig.axes}
    assert set(axes) == {"loss", "validation accuracy (exact count)", "validation RMSE (counts)",
                         "learning rate (at the start of each epoch)"}
    assert axes["validation accuracy (exact count)"].get_ylim() == (0, 1)  # accuracy is not drawn on the RMSE axis
    loss = axes["loss"]
    assert loss.get_yscale() == "log" and loss.get_ylim()[1] < 100  # the spike (500) does not flatten the panel
    assert any(line.get_label() == "clipped (1)" for line in loss.get_lines())
    for ax in fig.axes:  # the kept epoch is marked on every panel, ticks are whole epochs
        assert any(line.get_label() == "kept (epoch 4)" for line in ax.get_lines())
        assert all(float(t).is_integer() for t in ax.get_xticks())


def test_confusion_matrix_shows_n_accuracy_and_a_row_normalised_view():
    from bincount.evaluate import confusion_figure

    fig = confusion_figure([[8, 2], [1, 9]], [0, 1])
    assert fig._suptitle.get_text() == "confusion matrix: n=20, accuracy 85.0%"
    counts, rates = [ax for ax in fig.axes if ax.get_title()]
    assert [t.get_text() for t in counts.texts] == ["8", "2", "1", "9"]
    assert [t.get_text() for t in rates.texts] == ["0.80", "0.20", "0.10", "0.90"]
    assert [t.get_text() for t in rates.get_yticklabels()] == ["0 (n=10)", "1 (n=10)"]


def _claims(width: int, height: int) -> bytes:
    """A tiny valid JPEG whose frame header claims width x height pixels (a decompression bomb's header)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def test_a_decompression_bomb_is_skipped_not_a_crash(synth_source, tmp_path):
    rows = [{"id": p.stem, "count": 1, "image": str(p)} for p in sorted((synth_source / "bin-images").glob("*.jpg"))[:3]]
    for name, (w, h) in {"bomb": (20000, 20000), "big": (9000, 9000)}.items():
        (tmp_path / f"{name}.jpg").write_bytes(_claims(w, h))
        rows.append({"id": name, "count": 1, "image": str(tmp_path / f"{name}.jpg")})
    write_jsonl(tmp_path / "m.jsonl", rows)
    settings = load_settings(overrides={"workdir": str(tmp_path)}, environ={})
    result = evaluate(settings, manifest=tmp_path / "m.jsonl", model=_model_dir(tmp_path / "m"))
    assert result.n == 3 and result.skipped == 2


def test_meta_classes_that_do_not_match_the_head_are_one_line(tmp_path, cli, one_line_error):
    model = write_model_dir(tmp_path / "m", "mobilenet_v3_small", classes=[0, 1, 2])
    write_jsonl(tmp_path / "m.jsonl", [{"id": "1", "count": 1, "image": str(tmp_path / "any.jpg")}])
    settings = load_settings(overrides={"workdir": str(tmp_path)}, environ={})
    with pytest.raises(BincountError, match=r"meta\.json: classes is \[0, 1, 2\]; expected num_classes distinct whole numbers"):
        evaluate(settings, manifest=tmp_path / "m.jsonl", model=model)
    from PIL import Image

    Image.new("RGB", (16, 16)).save(tmp_path / "a.jpg")
    one_line_error(cli("predict", "--workdir", tmp_path, "--model", model, tmp_path / "a.jpg"), "classes is [0, 1, 2]; expected num_classes")
