"""--json names agree across commands and the schemas say what a field is and its unit (issue 23.8)."""

from __future__ import annotations

import pytest

from bincount.results import Result, field_comments


def schema(cls: type) -> dict:
    return cls.model_json_schema(mode="serialization")["properties"]


def test_train_results_of_both_backends_name_the_run_and_its_seconds():
    from bincount.backends.local.train import TrainResult
    from bincount.backends.sagemaker.training import TrainJobResult

    for cls in (TrainResult, TrainJobResult):
        assert {"run", "seconds"} <= set(schema(cls)), cls.__name__
    assert TrainJobResult(job="bincount-1", status="Completed").run == "bincount-1"  # `jq .run` works for both


def test_evaluate_reports_seconds_and_demo_says_recount_like_audit():
    from bincount.audit.core import AuditResult
    from bincount.demo import DemoResult
    from bincount.evaluate import EvalResult

    assert "seconds" in schema(EvalResult)
    assert "recount" in schema(DemoResult) and "to_recount" not in schema(DemoResult)
    assert "recount" in schema(AuditResult)


def test_audit_agree_is_a_boolean_in_json_and_true_false_in_the_csv():
    from bincount.audit.core import AuditRow, csv_line

    assert schema(AuditRow)["agree"]["anyOf"][0]["type"] == "boolean"
    row = {"id": "a", "image": "a.jpg", "expected": 1, "predicted": 1, "confidence": 0.9, "agree": True,
           "action": "ok", "error": None}
    assert csv_line(row).split(",")[5] == "true"
    assert csv_line({**row, "agree": False}).split(",")[5] == "false"


def test_trailing_comments_become_schema_descriptions():
    class Sample(Result):
        seconds: float  # wall time, seconds
        plain: int
        described: str = "x"  # from the comment

    props = schema(Sample)
    assert props["seconds"]["description"] == "wall time, seconds"
    assert "description" not in props["plain"] and props["described"]["description"] == "from the comment"
    assert field_comments(Sample) == {"seconds": "wall time, seconds", "described": "from the comment"}


@pytest.mark.parametrize("unit_word", ["second", "byte", "pixel"])
def test_every_timed_or_sized_result_field_says_its_unit(unit_word):
    from bincount.docs import result_schemas
    import json

    suffixes = {"second": ("seconds", "_per_second", "_s"), "byte": ("bytes", "_bytes"), "pixel": ("image_size",)}
    missing = []
    for name, text in result_schemas().items():
        doc = json.loads(text)
        for model in [doc, *doc.get("$defs", {}).values()]:
            for field, prop in model.get("properties", {}).items():
                if field.endswith(suffixes[unit_word]) and unit_word not in prop.get("description", ""):
                    missing.append(f"{model.get('title')}.{field}")
    assert not missing, f"fields without their unit ({unit_word}): {missing}"


def test_every_result_field_says_what_it_is():
    """A script reading --json finds each field described in docs/schemas/ (a trailing comment on the field)."""
    from bincount.docs import result_schemas
    import json

    missing = []
    for name, text in result_schemas().items():
        doc = json.loads(text)
        for model in [doc, *doc.get("$defs", {}).values()]:
            missing += [f"{model.get('title')}.{field}" for field, prop in model.get("properties", {}).items()
                        if not prop.get("description")]
    assert not missing, f"result fields without a description: {sorted(set(missing))}"
