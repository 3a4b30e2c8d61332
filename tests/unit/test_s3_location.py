"""s3://BUCKET/PREFIX parsing: what reaches a bucket key is checked before any request."""

from __future__ import annotations

import pytest

from controller.images.s3 import S3Error, S3Location


@pytest.mark.parametrize(
    ("url", "bucket", "prefix", "key"),
    [
        ("s3://images", "images", "", "chunks/aa/x"),
        ("s3://images/", "images", "", "chunks/aa/x"),
        ("s3://my.bucket-1/fleet/store/", "my.bucket-1", "fleet/store", "fleet/store/chunks/aa/x"),
    ],
)
def test_good_locations(url: str, bucket: str, prefix: str, key: str) -> None:
    loc = S3Location.parse(url)
    assert (loc.bucket, loc.prefix, loc.key("chunks/aa/x")) == (bucket, prefix, key)
    assert S3Location.parse(str(loc)) == loc


@pytest.mark.parametrize(
    "url",
    [
        "images",
        "http://images/x",
        "s3://",
        "s3://UPPER",
        "s3://a",
        "s3://-x-/p",
        "s3://b/a//c",
        "s3://b/../c",
    ],
)
def test_bad_locations_are_refused_with_the_url(url: str) -> None:
    with pytest.raises(S3Error, match="object store"):
        S3Location.parse(url)
