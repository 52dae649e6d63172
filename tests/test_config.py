import json
from pathlib import Path

import pytest

from bincount.config import load_settings
from bincount.errors import BincountError


def test_defaults():
    s = load_settings(environ={})
    assert s.backend == "local"
    assert s.data.source == "s3://aft-vbi-pds"
    assert s.data.count_set() == [0, 1, 2, 3, 4, 5]
    assert (s.split.train, s.split.val, s.split.test) == (0.6, 0.2, 0.2)


def test_precedence_defaults_yaml_env_flags(tmp_path: Path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  epochs: 3\n  lr: 0.5\n  batch_size: 8\ndata:\n  workers: 4\n")
    env = {"BINCOUNT_TRAIN__LR": "0.25", "BINCOUNT_TRAIN__BATCH_SIZE": "16"}
    s = load_settings(cfg, {"train.batch_size": 32}, environ=env)
    assert s.train.epochs == 3  # yaml over default
    assert s.train.lr == 0.25  # env over yaml
    assert s.train.batch_size == 32  # flag over env
    assert s.data.workers == 4
    assert s.train.weight_decay == 1e-4  # untouched default


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ("trian:\n  epochs: 3\n", "invalid setting trian: unknown key"),
        ("train:\n  epoch: 3\n", "invalid setting train.epoch: unknown key"),
        ("train:\n  epochs: zero\n", "invalid setting train.epochs"),
        ("split:\n  train: 0.7\n", "split ratios must sum to 1"),
        ("deploy:\n  memory_size_mb: 3000\n", "multiple of 1024"),
        ("sagemaker:\n  role: admin\n", "IAM role ARN"),
        ("data:\n  counts: one-five\n", "invalid setting data.counts"),
        ("- a\n- b\n", "expected a mapping"),
        ("train: [\n", "invalid YAML"),
    ],
)
def test_bad_config_is_one_line_error(tmp_path: Path, yaml_text: str, expected: str):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml_text)
    with pytest.raises(BincountError) as info:
        load_settings(cfg, environ={})
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_env_value_names_key():
    with pytest.raises(BincountError, match="train.epochs"):
        load_settings(environ={"BINCOUNT_TRAIN__EPOCHS": "-1"})


def test_missing_config_file(tmp_path: Path):
    with pytest.raises(BincountError, match="not found"):
        load_settings(tmp_path / "nope.yaml", environ={})


def _leaves(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_shipped_configs_load_with_their_values():
    import yaml

    paths = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
    assert {"default.yaml", "demo.yaml"} <= {p.name for p in paths}
    for path in paths:
        written = _leaves(yaml.safe_load(path.read_text()))
        loaded = _leaves(load_settings(path, environ={}).model_dump(mode="json"))
        assert written, path.name
        for key, value in written.items():  # YAML reads 1e-06 as a string; Settings makes it the float
            assert loaded[key] == (float(value) if isinstance(loaded[key], float) else value), f"{path.name}: {key}"
    demo = load_settings(paths[[p.name for p in paths].index("demo.yaml")], environ={})
    assert demo.train.image_size == 96 and demo.data.source == "s3://demo-bins"  # not the defaults


def test_a_weights_file_reaches_train_py_as_an_absolute_path(tmp_path, monkeypatch):
    from bincount.config import TrainSettings

    monkeypatch.chdir(tmp_path)
    (tmp_path / "w.pth").write_bytes(b"w")
    assert TrainSettings(pretrained="w.pth").hyperparameters(5)["pretrained"] == str(tmp_path / "w.pth")
    for name in ("imagenet", "none"):
        assert TrainSettings(pretrained=name).weights_file is None
        assert TrainSettings(pretrained=name).hyperparameters(5)["pretrained"] == name


def test_counts_beyond_max_count():
    s = load_settings(overrides={"data.counts": "1-7"}, environ={})
    with pytest.raises(BincountError, match="max_count"):
        s.data.count_set()


def test_config_discovery_env_var_then_working_dir_then_work_dir(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    work = tmp_path / "run1"
    work.mkdir()
    (work / "bincount.yaml").write_text("train:\n  epochs: 3\n")
    res = cli("config", "--json", "--workdir", work)
    assert json.loads(res.stdout)["settings"]["train"]["epochs"] == 3  # <workdir>/bincount.yaml
    assert json.loads(res.stdout)["config_file"] == str(work / "bincount.yaml")

    res = cli("config", "--workdir", work)  # the table view names the file too
    assert res.stdout.splitlines()[0] == f"# read from {work / 'bincount.yaml'}"

    (tmp_path / "bincount.yaml").write_text("train:\n  epochs: 4\n")
    res = cli("config", "--json", "--workdir", work)
    assert json.loads(res.stdout)["settings"]["train"]["epochs"] == 4  # ./bincount.yaml comes first
    # ... and says so: the work dir's file is not read silently
    assert f"{work / 'bincount.yaml'} is not read" in " ".join(res.stderr.split())

    (tmp_path / "aws.yaml").write_text("train:\n  epochs: 5\n")
    monkeypatch.setenv("BINCOUNT_CONFIG", "aws.yaml")  # a path, not a setting called "config"
    res = cli("config", "--json")
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["settings"]["train"]["epochs"] == 5

    (tmp_path / "other.yaml").write_text("train:\n  epochs: 6\n")
    res = cli("config", "--json", "--config", "other.yaml")  # --config wins over everything
    assert json.loads(res.stdout)["settings"]["train"]["epochs"] == 6

    monkeypatch.setenv("BINCOUNT_CONFIG", "missing.yaml")
    res = cli("config")
    assert res.exit_code == 1 and "BINCOUNT_CONFIG=missing.yaml: config file not found" in res.stderr


def test_a_bad_value_names_where_it_came_from(cli, tmp_path, monkeypatch):
    (tmp_path / "c.yaml").write_text("train:\n  epochs: 0\n")
    res = cli("config", "--config", tmp_path / "c.yaml")
    assert res.exit_code == 1 and f"invalid setting train.epochs: " in res.stderr and f"(from {tmp_path / 'c.yaml'})" in res.stderr
    monkeypatch.setenv("BINCOUNT_TRAIN__LR", "-1")
    res = cli("config")
    assert res.exit_code == 1 and "invalid setting train.lr: " in res.stderr and "(from BINCOUNT_TRAIN__LR)" in res.stderr
    res = cli("config", "--set", "train.batch_size=0")
    assert "(from --set or a flag)" in res.stderr


def test_non_finite_floats_are_refused_everywhere():
    for key, raw in [("TRAIN__LR", "inf"), ("TRAIN__LR", ".nan"), ("TRAIN__WEIGHT_DECAY", "-.inf"),
                     ("SPLIT__TRAIN", "nan"), ("TUNE__LR__MAX", "inf"), ("DATA__TIMEOUT", "inf")]:
        with pytest.raises(BincountError, match="finite"):
            load_settings(environ={f"BINCOUNT_{key}": raw})
    with pytest.raises(BincountError, match="train.lr: Input should be a finite number"):
        load_settings(overrides={"train.lr": float("inf")}, environ={})


@pytest.mark.parametrize("content", [
    b"train:\n  epochs: \xff\xfe\n",  # not UTF-8
    b"\x00\x01\x02",
    b"[" * 20000 + b"]" * 20000,  # nested 20,000 deep
    b"a: " + b"{b: " * 20000 + b"1" + b"}" * 20000,
])
def test_undecodable_or_deeply_nested_yaml_is_one_line(tmp_path: Path, content: bytes):
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(content)
    with pytest.raises(BincountError, match=r"^config file .*c\.yaml: ") as info:
        load_settings(cfg, environ={})
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("first, second", [({"train": 3}, {"train.epochs": 3}), ({"train.epochs": 3}, {"train": 3})])
def test_a_key_set_as_both_value_and_section_is_one_line(first, second):
    with pytest.raises(BincountError, match="conflict: train cannot be both a value and a section"):
        load_settings(overrides={**first, **second}, environ={})
    env = {f"BINCOUNT_{k.upper().replace('.', '__')}": str(v) for k, v in {**first, **second}.items()}
    with pytest.raises(BincountError, match="BINCOUNT_TRAIN.* conflict"):
        load_settings(environ=env)


def test_endpoint_urls_must_be_urls():
    for bad in ("notaurl", "ftp://x", "http://", "http://host:99999", "http://a b"):
        with pytest.raises(BincountError, match="endpoint_url"):
            load_settings(overrides={"data.endpoint_url": bad}, environ={})
        with pytest.raises(BincountError, match="endpoint_url"):
            load_settings(overrides={"s3.endpoint_url": bad}, environ={})
    assert load_settings(overrides={"s3.endpoint_url": "https://s3.example.com:9000/x"}, environ={}).s3.endpoint_url


def test_huge_id_ranges_are_not_materialised():
    import time

    from bincount.ranges import IntRanges

    started = time.perf_counter()
    settings = load_settings(overrides={"data.ids": "1-100000000,5,200000000-200000001"}, environ={})
    ranges = IntRanges(settings.data.ids)
    assert len(ranges) == 100_000_002 and ranges.pairs[0] == (1, 100_000_000)
    assert time.perf_counter() - started < 2
    with pytest.raises(BincountError, match="data.counts"):
        load_settings(overrides={"data.counts": "0-100000000000"}, environ={}).data.count_set()


def test_pretrained_is_resolved_once_imagenet_none_s3_or_an_existing_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights.pth").write_bytes(b"w")
    resolved = load_settings(overrides={"train.pretrained": "weights.pth"}, environ={}).train.pretrained
    assert resolved == str(tmp_path / "weights.pth")  # absolute: train.py runs in its run dir
    for value in ("imagenet", "none", "s3://bucket/weights/resnet18.pth"):
        assert load_settings(overrides={"train.pretrained": value}, environ={}).train.pretrained == value
    for bad, words in (("weights.bin", "imagenet, none"), ("s3://bucket.pth", "s3://bucket/key")):
        with pytest.raises(BincountError, match=words) as err:
            load_settings(overrides={"train.pretrained": bad}, environ={})
        assert "\n" not in str(err.value) and str(err.value).startswith("invalid setting train.pretrained: ")
    missing = load_settings(overrides={"train.pretrained": "missing.pth"}, environ={})  # loads: checked where used
    assert missing.train.pretrained == str(tmp_path / "missing.pth")
    for use in (lambda: missing.train.weights_file, lambda: missing.train.hyperparameters(5)):
        with pytest.raises(BincountError, match=f"train.pretrained: weights file {tmp_path / 'missing.pth'} not found") as err:
            use()
        assert "\n" not in str(err.value)


def test_status_works_from_another_directory_with_a_relative_weights_file(cli, one_line_error, tmp_path, monkeypatch):
    """Settings validation does not open the weights file (issue 20.11): a work dir whose bincount.yaml names
    `w.pth` works from any directory; only training needs the file, and says so in one line."""
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    (work / "w.pth").write_bytes(b"w")
    (work / "bincount.yaml").write_text("train:\n  pretrained: w.pth\n")
    monkeypatch.chdir(work)
    assert cli("status", "--workdir", work).exit_code == 0
    monkeypatch.chdir(elsewhere)
    res = cli("status", "--workdir", work)
    assert res.exit_code == 0, res.stderr
    res = cli("config", "--json", "--workdir", work)
    assert res.exit_code == 0 and json.loads(res.stdout)["settings"]["train"]["pretrained"] == str(elsewhere / "w.pth")
    from bincount.data.manifest import manifest_row

    (work / "splits").mkdir()
    for split in ("train", "val"):  # training gets as far as its hyperparameters, and stops there in one line
        row = manifest_row("00001", 1, "raw/bin-images/00001.jpg", "raw/metadata/00001.json", 10, "0" * 64)
        (work / "splits" / f"{split}.jsonl").write_text(json.dumps(row) + "\n")
    one_line_error(cli("train", "--workdir", work), f"train.pretrained: weights file {elsewhere / 'w.pth'} not found")
