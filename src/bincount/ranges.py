"""Integer ranges as users write them (`0-5`, `1,2,4`, `1-3,5`): data.counts, data.ids, --counts."""

from __future__ import annotations


def parse_ranges(spec: str) -> list[tuple[int, int]]:
    """Parse `0-5`, `1,2,4` or `1-3,5` into sorted, merged, inclusive (start, end) ranges of integers >= 0.

    Nothing is materialised: `1-100000000` is one pair (see IntRanges for iterating them).
    """
    pairs: list[tuple[int, int]] = []
    for part in str(spec).replace(" ", "").split(","):
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()) or len(lo) > 12 or len(hi) > 12:
            raise ValueError(f"{spec!r} is not a list of integers or ranges like 0-5 or 1,2,3")
        start, end = (int(lo), int(hi)) if sep else (int(lo), int(lo))
        if end < start:
            raise ValueError(f"bad range {part!r} in {spec!r}")
        pairs.append((start, end))
    if not pairs:
        raise ValueError(f"{spec!r} selects nothing")
    merged: list[tuple[int, int]] = []
    for start, end in sorted(pairs):
        if merged and start <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


class IntRanges:
    """The integers of parse_ranges(spec), in order, with len() and iteration but no list behind them."""

    def __init__(self, spec: str):
        self.pairs = parse_ranges(spec)

    def __len__(self) -> int:
        return sum(end - start + 1 for start, end in self.pairs)

    def __iter__(self):
        for start, end in self.pairs:
            yield from range(start, end + 1)

    @property
    def last(self) -> int:
        return self.pairs[-1][1]


def parse_int_set(spec: str, max_size: int = 10_000) -> list[int]:
    """Parse `0-5`, `1,2,4` or `1-3,5` into a sorted list of distinct non-negative integers (at most max_size)."""
    ranges = IntRanges(spec)
    if len(ranges) > max_size:
        raise ValueError(f"{spec!r} selects {len(ranges):,} values, over the limit of {max_size:,}")
    return list(ranges)
