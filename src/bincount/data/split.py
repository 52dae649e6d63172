"""`bincount split`: manifest.jsonl -> splits/{train,val,test}.jsonl, stratified by count and seeded.

Within each count the ids are sorted, then shuffled with a generator seeded by (seed, count), and
cut by largest-remainder shares, so every class is within one item of its ideal share in every
split, and the same manifest and seed always give the same files (whatever the manifest's order).

--from-index splits the usable bins of <workdir>/index.sqlite instead (data.counts, data.ids or
data.id_file, data.balanced and data.limit select as in fetch): rows {id, count, skus, bytes}
with no local image, for `bincount shard` to build shard channels straight from the source bucket.
"""

from __future__ import annotations

import random
from typing import Any

from bincount.config import Settings
from bincount.data.manifest import allocate, id_key
from bincount.errors import BincountError
from bincount.results import Result, per_class_table
from bincount.workspace import SPLITS, Workspace, read_manifest, write_jsonl


class SplitResult(Result):
    seed: int  # split.seed: the seed of the per-count shuffles
    ratios: dict[str, float]  # the configured split ratios: train, val, test -> share of each count's items
    sizes: dict[str, int]  # bins per split (train, val, test)
    per_count: dict[int, dict[str, int]]  # per count: count -> {train, val, test: items}
    files: dict[str, str]  # split -> path of its JSON Lines file (<workdir>/splits/<split>.jsonl)

    def rich(self) -> Any:
        rows = [[c, *(v[s] for s in SPLITS), sum(v.values())] for c, v in self.per_count.items()]
        rows.append(["all", *(self.sizes[s] for s in SPLITS), sum(self.sizes.values())])
        return per_class_table(f"split (seed {self.seed})", ["count", *SPLITS, "total"], rows)


def stratified_split(rows: list[dict], ratios: dict[str, float], seed: int) -> dict[str, list[dict]]:
    """Split rows per count by `ratios` (keys in SPLITS order); each split sorted by id."""
    by_count: dict[int, list[dict]] = {}
    for row in rows:
        by_count.setdefault(int(row["count"]), []).append(row)
    out: dict[str, list[dict]] = {name: [] for name in ratios}
    for count, group in sorted(by_count.items()):
        group = sorted(group, key=lambda r: id_key(str(r["id"])))
        random.Random(f"{seed}-{count}").shuffle(group)
        start = 0
        for name, size in zip(ratios, allocate(len(group), list(ratios.values()))):
            out[name].extend(group[start:start + size])
            start += size
    return {name: sorted(part, key=lambda r: id_key(str(r["id"]))) for name, part in out.items()}


def index_rows(settings: Settings) -> list[dict]:
    """The rows `split --from-index` splits: usable indexed bins, selected like fetch selects."""
    from bincount.ranges import parse_int_set
    from bincount.data.index import open_index
    from bincount.data.manifest import balanced_pools, balanced_size, image_id, parse_id_file

    data = settings.data
    counts = data.count_set()
    if data.ids and data.id_file:
        raise BincountError("give --ids or --id-file, not both")
    named = set(parse_id_file(data.id_file)) if data.id_file else (
        {image_id(n) for n in parse_int_set(data.ids)} if data.ids else None)
    index = open_index(settings, required=True)
    assert index is not None
    try:
        marks = ",".join("?" * len(counts))
        rows = [{"id": i, "count": c, "skus": k, "bytes": b} for i, c, k, b in index.db.execute(
            f"SELECT id, count, skus, image_bytes FROM bins WHERE status = 'ok' AND count IN ({marks}) ORDER BY num, id",
            counts) if named is None or i in named]
    finally:
        index.close()
    if data.balanced:
        by_count: dict[int, list[str]] = {}
        for row in rows:
            by_count.setdefault(row["count"], []).append(row["id"])
        n = balanced_size(by_count, counts, data.limit)
        keep = {i for pool in balanced_pools(by_count, counts, data.seed).values() for i in pool[:n]}
        rows = [r for r in rows if r["id"] in keep]
    elif data.limit is not None:
        rows = rows[: data.limit]
    return rows


def split(settings: Settings, from_index: bool = False) -> SplitResult:
    """Write splits/{train,val,test}.jsonl from manifest.jsonl (or from the index)."""
    ws = Workspace(settings.workdir)
    if from_index:
        rows = index_rows(settings)
        if not rows:
            raise BincountError("the index holds no usable bins for this selection (check --counts/--ids)")
    else:
        if not ws.manifest.exists():
            raise BincountError(f"{ws.manifest} not found: run `bincount fetch` first (or split --from-index)")
        rows = read_manifest(ws.manifest, need=("id", "count"))
    if not rows:
        raise BincountError(f"{ws.manifest} is empty: run `bincount fetch` first")
    seen: set[str] = set()
    for number, row in enumerate(rows, 1):
        if row["id"] in seen:
            raise BincountError(f"{ws.manifest}:{number}: id {row['id']} appears twice")
        seen.add(row["id"])
    s = settings.split
    ratios = {"train": s.train, "val": s.val, "test": s.test}
    parts = stratified_split(rows, ratios, s.seed)
    need = {"train": 2, "val": 1, "test": 1}  # training needs a batch of two and a validation image
    for name, least in need.items():
        if len(parts[name]) < least:
            raise BincountError(f"split: {name} would get {len(parts[name])} of the {len(rows)} items (it needs at least "
                                f"{least}); fetch more items or change the shares (now {s.train:g}/{s.val:g}/{s.test:g})")
    files = {}
    for name in SPLITS:
        write_jsonl(ws.split(name), parts[name])
        files[name] = str(ws.split(name))
    counts = sorted({int(r["count"]) for r in rows})
    per_count = {c: {name: sum(1 for r in parts[name] if r["count"] == c) for name in SPLITS} for c in counts}
    return SplitResult(seed=s.seed, ratios=ratios, sizes={n: len(parts[n]) for n in SPLITS},
                       per_count=per_count, files=files)


def stale_note(ws: Workspace) -> str | None:
    """One line when splits/ are older than manifest.jsonl and no longer split it (a fetch since the split added or
    dropped items): training goes on with the old split, and says so with the fix. None when they agree."""
    paths = [ws.split(name) for name in SPLITS if ws.split(name).is_file()]
    if not ws.manifest.is_file() or not paths:
        return None
    if ws.manifest.stat().st_mtime <= min(p.stat().st_mtime for p in paths):
        return None
    split_ids = {str(r["id"]) for p in paths for r in read_manifest(p, need=("id",))}
    manifest_ids = {str(r["id"]) for r in read_manifest(ws.manifest, need=("id",))}
    new, gone = len(manifest_ids - split_ids), len(split_ids - manifest_ids)
    if not new and not gone:
        return None
    return (f"note: splits/ are older than manifest.jsonl ({new} item(s) of the manifest in no split, {gone} split "
            "item(s) no longer in it): training on the old split; `bincount split` makes a new one")
