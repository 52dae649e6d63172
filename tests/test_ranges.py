import pytest

from bincount.ranges import IntRanges, parse_int_set


def test_parse_int_set():
    assert parse_int_set("0-2,5") == [0, 1, 2, 5]
    assert parse_int_set("3") == [3]
    with pytest.raises(ValueError):
        parse_int_set("5-1")
    with pytest.raises(ValueError, match="over the limit"):
        parse_int_set("0-20000")


def test_int_ranges_merge_and_iterate_without_a_list():
    ranges = IntRanges("7, 1-3,2-5,9-9")
    assert ranges.pairs == [(1, 5), (7, 7), (9, 9)] and len(ranges) == 7 and ranges.last == 9
    assert list(ranges) == [1, 2, 3, 4, 5, 7, 9]
