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


def test_image_uri_lookups_read_the_endpoint_data_once(monkeypatch):
    """The SDK builds a resolver from botocore's endpoints.json at every image URI lookup (80 ms each, several
    per job): load_sdk keeps the first one, and the URIs stay what the SDK answers."""
    import botocore.loaders

    from bincount.backends.sagemaker.jobs import load_sdk

    sagemaker = load_sdk()
    reads = []
    real = botocore.loaders.Loader.load_data
    monkeypatch.setattr(botocore.loaders.Loader, "load_data",
                        lambda self, name: reads.append(name) or real(self, name))
    uris = {region: sagemaker.image_uris.retrieve("pytorch", region, version="2.3", py_version="py311",
                                                  instance_type="ml.g5.xlarge", image_scope="training")
            for region in ("us-east-1", "cn-north-1", "us-east-1")}
    assert reads.count("endpoints") <= 1
    assert uris["us-east-1"].endswith(".dkr.ecr.us-east-1.amazonaws.com/pytorch-training:2.3-gpu-py311")
    assert ".dkr.ecr.cn-north-1.amazonaws.com.cn/" in uris["cn-north-1"]  # the partition's DNS suffix still applies
