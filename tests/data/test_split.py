import json
import random

from bincount.config import load_settings
from bincount.data.split import split, stratified_split
from bincount.workspace import SPLITS, read_jsonl, write_jsonl


def manifest(rng: random.Random, classes: int = 6) -> list[dict]:
    rows, n = [], 1
    for count in range(classes):
        for _ in range(rng.randint(0, 37)):
            rows.append({"id": f"{n:05d}", "count": count, "image": f"raw/bin-images/{n:05d}.jpg"})
            n += 1
    rng.shuffle(rows)
    return rows


def test_split_properties_over_many_seeds():
    rng = random.Random(0)
    for seed in range(12):
        rows = manifest(rng)
        for ratios in ({"train": 0.6, "val": 0.2, "test": 0.2}, {"train": 0.8, "val": 0.1, "test": 0.1},
                       {"train": 0.5, "val": 0.0, "test": 0.5}):
            parts = stratified_split(rows, ratios, seed)
            ids = [r["id"] for name in ratios for r in parts[name]]
            assert len(ids) == len(set(ids)) == len(rows)  # disjoint and covering
            for count in {r["count"] for r in rows}:
                total = sum(1 for r in rows if r["count"] == count)
                for name, ratio in ratios.items():
                    got = sum(1 for r in parts[name] if r["count"] == count)
                    assert abs(got - total * ratio) < 1, (seed, count, name)
            shuffled = rows[:]
            random.Random(seed + 100).shuffle(shuffled)
            assert stratified_split(shuffled, ratios, seed) == parts  # order of the manifest does not matter
        other = stratified_split(rows, {"train": 0.6, "val": 0.2, "test": 0.2}, seed + 1)
        assert other != stratified_split(rows, {"train": 0.6, "val": 0.2, "test": 0.2}, seed)


def test_split_stage_writes_files_and_table(tmp_path, cli):
    rows = manifest(random.Random(1))
    write_jsonl(tmp_path / "manifest.jsonl", rows)
    settings = load_settings(overrides={"workdir": tmp_path, "split.seed": 7}, environ={})
    result = split(settings)
    assert sum(result.sizes.values()) == len(rows)
    for name in SPLITS:
        assert [r["id"] for r in read_jsonl(tmp_path / "splits" / f"{name}.jsonl")] == sorted(
            r["id"] for r in rows if r["id"] in {x["id"] for x in read_jsonl(tmp_path / "splits" / f"{name}.jsonl")})
    first = {n: (tmp_path / "splits" / f"{n}.jsonl").read_text() for n in SPLITS}
    res = cli("split", "--workdir", tmp_path, "--seed", "7")
    assert res.exit_code == 0, res.stderr
    assert "count" in res.stdout and "train" in res.stdout and "total" in res.stdout
    assert {n: (tmp_path / "splits" / f"{n}.jsonl").read_text() for n in SPLITS} == first
    res = cli("split", "--workdir", tmp_path, "--train", "0.8", "--val", "0.1", "--test", "0.1", "--json")
    data = json.loads(res.stdout)
    assert data["ratios"]["train"] == 0.8 and set(data["per_count"]) == {str(r["count"]) for r in rows}


def test_split_errors(tmp_path, cli):
    res = cli("split", "--workdir", tmp_path)
    assert res.exit_code == 1 and "run `bincount fetch` first" in res.stderr
    write_jsonl(tmp_path / "manifest.jsonl", [{"id": "00001", "count": 1}, {"id": "00001", "count": 2}])
    res = cli("split", "--workdir", tmp_path)
    assert res.exit_code == 1 and "appears twice" in res.stderr
    res = cli("split", "--workdir", tmp_path, "--train", "0.9")
    assert res.exit_code == 1 and "sum to 1" in res.stderr


def test_a_split_with_an_empty_part_is_refused_at_split(tmp_path, cli, one_line_error):
    from bincount.workspace import write_jsonl

    one_line_error(cli("split", "--workdir", tmp_path, "--train", "0.8", "--val", "0.2", "--test", "0"), "split.test")
    one_line_error(cli("split", "--workdir", tmp_path, "--train", "0.8", "--val", "0", "--test", "0.2"), "split.val")
    write_jsonl(tmp_path / "manifest.jsonl", [{"id": f"{i:05d}", "count": i % 3, "image": f"raw/{i}.jpg"} for i in range(3)])
    one_line_error(cli("split", "--workdir", tmp_path), "would get 0 of the 3 items")
    assert not (tmp_path / "splits").exists()
