"""Pure helpers of the data plane: ids, id files, label parsing, balanced selection, manifest rows.

No I/O beyond reading an id file; no heavy imports. fetch/split/upload build on these.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from bincount.errors import BincountError

IMAGES = "bin-images"
LABELS = "metadata"

# Reasons an item is rejected (reports/fetch-rejects.jsonl); never in the manifest.
MISSING_LABEL = "missing_label"
BAD_LABEL = "bad_label"  # not JSON, or not a JSON object
MISSING_KEY = "missing_key"  # no EXPECTED_QUANTITY
BAD_COUNT = "bad_count"  # EXPECTED_QUANTITY is not an integer >= 0
COUNT_NOT_SELECTED = "count_not_selected"  # a valid count outside --counts / 0..max_count
MISSING_IMAGE = "missing_image"
BAD_IMAGE = "bad_image"  # undecodable or truncated JPEG
FETCH_ERROR = "fetch_error"  # the request kept failing after all retries

# Note (reports/fetch-notes.jsonl): the item stays usable, EXPECTED_QUANTITY is the target.
COUNT_MISMATCH = "count_mismatch"

_PATH_RE = re.compile(r"^(?:.*/)?(\d+)\.(?:jpg|jpeg|json)$", re.IGNORECASE)


class LabelError(ValueError):
    """A label that cannot give a count: `reason` is one of the reject reasons above."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Label:
    count: int
    note: str | None = None  # set when EXPECTED_QUANTITY disagrees with the sum of quantities


def image_id(number: int) -> str:
    """ABID ids are zero-padded to at least five digits: 4 -> '00004', 100313 -> '100313'."""
    return f"{number:05d}"


def normalize_id(text: str) -> str:
    """An id as written in an id file or on the command line.

    A bare number is zero-padded to five digits, the ABID convention ('4' -> '00004'); a key path or
    file name keeps its stem verbatim ('data/metadata/1044.json' -> '1044'), since the capstone list
    names a few unpadded keys beside their padded namesakes (1044 and 01044 are different items).
    """
    text = str(text).strip()
    if text.isdigit():
        return image_id(int(text)) if len(text) < 5 else text
    match = _PATH_RE.match(text)
    if not match:
        raise ValueError(f"{text!r} is not an image id (digits, or a key path like metadata/00004.json)")
    return match.group(1)


def id_key(ident: str) -> tuple[int, str]:
    """Sort ids by number, then as text (01044 before 1044: arbitrary but fixed)."""
    return (int(ident), ident) if ident.isdigit() else (-1, ident)


def image_key(ident: str) -> str:
    return f"{IMAGES}/{ident}.jpg"


def label_key(ident: str) -> str:
    return f"{LABELS}/{ident}.json"


def parse_id_file(path: Path) -> dict[str, int | None]:
    """Read an id file: plain ids or key paths one a line (# comments allowed), or the capstone JSON
    `{"1": ["data/metadata/100313.json", ...], ...}` whose keys are the expected counts.

    Returns {id: count hint or None} in file order, without duplicates.
    """
    path = Path(path)
    if not path.is_file():
        raise BincountError(f"id file {path} not found")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BincountError(f"id file {path}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise BincountError(f"id file {path}: cannot read it ({exc.strerror})") from None
    if text.lstrip().startswith(("{", "[")):
        return _parse_json_ids(path, text)
    out: dict[str, int | None] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            out.setdefault(normalize_id(line), None)
        except ValueError as exc:
            raise BincountError(f"{path}:{number}: {exc}") from None
    if not out:
        raise BincountError(f"id file {path} holds no ids")
    return out


def _parse_json_ids(path: Path, text: str) -> dict[str, int | None]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BincountError(f"id file {path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except RecursionError:
        raise BincountError(f"id file {path}: not valid JSON (nested too deeply)") from None
    groups: list[tuple[int | None, object]]
    if isinstance(data, list):
        groups = [(None, data)]
    elif isinstance(data, dict):
        groups = []
        for key, value in data.items():
            try:
                groups.append((int(key), value))
            except ValueError:
                raise BincountError(f"id file {path}: key {key!r} is not a count (expected {{\"1\": [...], ...}})") from None
    else:
        raise BincountError(f"id file {path}: expected a JSON object of count -> list of paths, or a list")
    out: dict[str, int | None] = {}
    for hint, items in groups:
        if not isinstance(items, list):
            raise BincountError(f"id file {path}: the value of {hint!r} is not a list")
        for item in items:
            try:
                out.setdefault(normalize_id(str(item)), hint)
            except ValueError as exc:
                raise BincountError(f"id file {path}: {exc}") from None
    if not out:
        raise BincountError(f"id file {path} holds no ids")
    return out


def parse_label(raw: bytes) -> Label:
    """Read the count from an ABID label; raise LabelError (with a reject reason) if there is none.

    The target is EXPECTED_QUANTITY. If it disagrees with the sum of BIN_FCSKU_DATA quantities the
    item stays usable and `note` says so (reported in reports/fetch-notes.jsonl).
    """
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LabelError(BAD_LABEL, f"not valid JSON ({exc})") from None
    except RecursionError:  # a cached label like this must not crash every rerun
        raise LabelError(BAD_LABEL, "not valid JSON (nested too deeply)") from None
    if not isinstance(data, dict):
        raise LabelError(BAD_LABEL, f"expected a JSON object, got {type(data).__name__}")
    if "EXPECTED_QUANTITY" not in data:
        raise LabelError(MISSING_KEY, "no EXPECTED_QUANTITY")
    count = data["EXPECTED_QUANTITY"]
    if isinstance(count, float) and count.is_integer():
        count = int(count)
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise LabelError(BAD_COUNT, f"EXPECTED_QUANTITY is {count!r}, not an integer >= 0")
    note = None
    items = data.get("BIN_FCSKU_DATA")
    if isinstance(items, dict):
        try:
            total = sum(int(v.get("quantity", 0)) for v in items.values() if isinstance(v, dict))
        except (TypeError, ValueError):
            total = None
        if total is None:
            note = "BIN_FCSKU_DATA has a non-integer quantity"
        elif total != count:
            note = f"EXPECTED_QUANTITY {count} != sum of BIN_FCSKU_DATA quantities {total}"
    elif items is not None:
        note = "BIN_FCSKU_DATA is not an object"
    return Label(count=count, note=note)


def balanced_pools(by_count: dict[int, list[str]], counts: Iterable[int], seed: int) -> dict[int, list[str]]:
    """Each class's candidate ids in a seeded random order (independent of input order): --balanced
    takes the first `balanced_size` of each; the rest are spares that replace items whose image is bad."""
    pools = {}
    for c in counts:
        pool = sorted(set(by_count.get(c, [])), key=id_key)
        random.Random(f"{seed}-{c}").shuffle(pool)
        pools[c] = pool
    return pools


def balanced_size(by_count: dict[int, list[str]], counts: Iterable[int], limit: int | None) -> int:
    """How many items per class --balanced takes: the smallest class, capped at limit // classes."""
    counts = list(counts)
    smallest = min((len(by_count.get(c, [])) for c in counts), default=0)
    return smallest if limit is None else min(smallest, limit // len(counts))


def manifest_row(ident: str, count: int, image: str, label: str, size: int, sha256: str,
                 **extra: object) -> dict:
    """One manifest line (the shared contract): id, count, image, label, bytes, sha256 (+ extras)."""
    row = {"id": ident, "count": count, "image": image, "label": label, "bytes": size, "sha256": sha256}
    row.update({k: v for k, v in extra.items() if v is not None})
    return row


def allocate(n: int, ratios: list[float]) -> list[int]:
    """Split n items by ratios with largest remainders: each share within one item of n * ratio."""
    ideal = [n * r for r in ratios]
    sizes = [int(x) for x in ideal]
    order = sorted(range(len(ratios)), key=lambda i: (-(ideal[i] - sizes[i]), i))
    for i in order[: n - sum(sizes)]:
        sizes[i] += 1
    return sizes
