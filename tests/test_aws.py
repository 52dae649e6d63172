"""bincount.aws: the error code and message of a real S3 error, and None for anything else."""

from __future__ import annotations

import pytest

from bincount.aws import client, error_code, error_message


def test_error_code_and_message_of_a_real_s3_error(s3_server):
    from botocore.exceptions import ClientError

    s3 = client("s3", endpoint_url=s3_server, max_attempts=1)
    s3.create_bucket(Bucket="aws-errors")
    with pytest.raises(ClientError) as missing_key:
        s3.get_object(Bucket="aws-errors", Key="nope")
    assert error_code(missing_key.value) == "NoSuchKey"
    assert "does not exist" in error_message(missing_key.value)
    with pytest.raises(ClientError) as missing_bucket:
        s3.head_object(Bucket="no-such-bucket-here", Key="k")  # HEAD: a bare status code, no message
    assert error_code(missing_bucket.value) == "404"

    for other in (ValueError("x"), OSError(5, "io"), type("Odd", (Exception,), {"response": "not a dict"})()):
        assert error_code(other) is None and error_message(other) is None
