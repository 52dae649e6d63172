import json
from pathlib import Path

import pytest

from bincount.data import manifest as mf
from bincount.errors import BincountError

# shared/ lies beside the checkout (for developers and CI alike)
CAPSTONE = Path(__file__).resolve().parents[3] / "shared" / "data" / "capstone_file_list.json"


def test_normalize_id():
    for text in ("4", "00004", "bin-images/00004.jpg", "data/metadata/00004.json", " 0004 "):
        assert mf.normalize_id(text) == "00004"
    assert mf.normalize_id("100313") == "100313"
    assert mf.normalize_id("data/metadata/1044.json") == "1044"  # an unpadded key stays as it is
    assert sorted(["01044", "1044", "00005", "100313"], key=mf.id_key) == ["00005", "01044", "1044", "100313"]
    with pytest.raises(ValueError):
        mf.normalize_id("abc")


def test_plain_id_file(tmp_path):
    path = tmp_path / "ids.txt"
    path.write_text("# header\n9915\n00004  # a comment\n\nmetadata/100313.json\n4\nbin-images/00004.jpg\n")
    assert mf.parse_id_file(path) == {"09915": None, "00004": None, "100313": None}
    path.write_text("1\nnot-an-id\n")
    with pytest.raises(BincountError, match=r"ids.txt:2"):
        mf.parse_id_file(path)
    with pytest.raises(BincountError, match="not found"):
        mf.parse_id_file(tmp_path / "missing.txt")


def test_capstone_json_id_file(tmp_path):
    path = tmp_path / "list.json"
    path.write_text(json.dumps({"1": ["data/metadata/100313.json", "data/metadata/09915.json"],
                                "3": ["data/metadata/00004.json"]}))
    assert mf.parse_id_file(path) == {"100313": 1, "09915": 1, "00004": 3}
    path.write_text('{"one": ["data/metadata/1.json"]}')
    with pytest.raises(BincountError, match="not a count"):
        mf.parse_id_file(path)
    path.write_text('{"1": [')
    with pytest.raises(BincountError, match="not valid JSON"):
        mf.parse_id_file(path)


@pytest.mark.skipif(not CAPSTONE.exists(), reason="the shared capstone list is not here")
def test_real_capstone_file():
    ids = mf.parse_id_file(CAPSTONE)
    per_count = {c: sum(1 for v in ids.values() if v == c) for c in range(1, 6)}
    assert per_count == {1: 1228, 2: 2299, 3: 2666, 4: 2373, 5: 1875}
    assert ids["100313"] == 1 and ids["09915"] == 1
    assert ids["01044"] == 1 and ids["1044"] == 5  # distinct keys in the real list


def test_parse_label():
    label = {"BIN_FCSKU_DATA": {"A": {"quantity": 2}, "B": {"quantity": 1}}, "EXPECTED_QUANTITY": 3}
    assert mf.parse_label(json.dumps(label).encode()) == mf.Label(3)
    assert mf.parse_label(b'{"BIN_FCSKU_DATA": {}, "EXPECTED_QUANTITY": 0}') == mf.Label(0)
    assert mf.parse_label(b'{"EXPECTED_QUANTITY": 2.0}').count == 2
    odd = mf.parse_label(json.dumps({**label, "EXPECTED_QUANTITY": 4}).encode())
    assert odd.count == 4 and "sum of BIN_FCSKU_DATA quantities 3" in odd.note
    for raw, reason in [(b"{nope", mf.BAD_LABEL), (b"[1, 2]", mf.BAD_LABEL), (b"\xff\xfe", mf.BAD_LABEL),
                        (b'{"BIN_FCSKU_DATA": {}}', mf.MISSING_KEY), (b'{"EXPECTED_QUANTITY": -1}', mf.BAD_COUNT),
                        (b'{"EXPECTED_QUANTITY": "3"}', mf.BAD_COUNT), (b'{"EXPECTED_QUANTITY": true}', mf.BAD_COUNT),
                        (b'{"EXPECTED_QUANTITY": 1.5}', mf.BAD_COUNT)]:
        with pytest.raises(mf.LabelError) as info:
            mf.parse_label(raw)
        assert info.value.reason == reason, raw


def test_balanced_pools_are_seeded_and_order_free():
    by_count = {0: ["00003", "00001", "00009"], 1: ["00002", "00004"]}
    a = mf.balanced_pools(by_count, [0, 1], seed=5)
    b = mf.balanced_pools({0: ["00009", "00001", "00003"], 1: ["00004", "00002"]}, [0, 1], seed=5)
    assert a == b and sorted(a[0]) == ["00001", "00003", "00009"]
    assert mf.balanced_size(by_count, [0, 1], None) == 2
    assert mf.balanced_size(by_count, [0, 1], 2) == 1
    assert mf.balanced_size(by_count, [0, 1, 2], None) == 0


def test_allocate_within_one_of_ideal():
    for n in range(0, 40):
        for ratios in ([0.6, 0.2, 0.2], [0.7, 0.15, 0.15], [0.5, 0.5, 0.0], [1 / 3] * 3):
            sizes = mf.allocate(n, ratios)
            assert sum(sizes) == n
            assert all(abs(s - n * r) < 1 for s, r in zip(sizes, ratios))
