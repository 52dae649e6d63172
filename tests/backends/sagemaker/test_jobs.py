"""backends/sagemaker/jobs.py: the SDK as bincount loads it."""

from __future__ import annotations

import pytest


def test_the_sdk_config_is_still_validated_but_the_schema_is_not_checked_at_every_lookup(monkeypatch):
    """The SDK's own jsonschema.validate checks its whole schema at every config lookup (0.18 s each, 16 s
    of a tuning job's 25): one validator, made once, validates each lookup the same way."""
    import jsonschema

    from bincount.backends.sagemaker.jobs import load_sdk

    sagemaker = load_sdk()
    from sagemaker.config.config_schema import SAGEMAKER_PYTHON_SDK_CONFIG_SCHEMA, TELEMETRY_OPT_OUT_PATH

    checks = []
    validator = jsonschema.validators.validator_for(SAGEMAKER_PYTHON_SDK_CONFIG_SCHEMA)
    monkeypatch.setattr(validator, "check_schema", classmethod(lambda cls, schema: checks.append(schema)))
    config = {"SchemaVersion": "1.0", "SageMaker": {"PythonSDK": {"Modules": {"TelemetryOptOut": True}}}}
    for _ in range(20):
        assert sagemaker.utils.get_sagemaker_config_value(None, TELEMETRY_OPT_OUT_PATH, sagemaker_config=config) is True
    assert checks == []
    config["SageMaker"]["PythonSDK"]["Modules"]["TelemetryOptOut"] = "yes"  # not a boolean: still refused
    with pytest.raises(jsonschema.ValidationError, match="boolean"):
        sagemaker.utils.get_sagemaker_config_value(None, TELEMETRY_OPT_OUT_PATH, sagemaker_config=config)
    with pytest.raises(jsonschema.ValidationError):
        sagemaker.session.validate_sagemaker_config({"SchemaVersion": "2.0"})
