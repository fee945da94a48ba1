"""Fixtures of the ENI tests: one FakeEC2 (moto's EC2 server behind its EC2-like layer) per
module, on a free loopback port; each test makes its own VPC in it."""

from __future__ import annotations

import pytest
from tests.support.fake_ec2 import ACCESS_KEY, SECRET_KEY, FakeEC2


@pytest.fixture(scope="module")
def fake_ec2():
    fake = FakeEC2().start()
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture
def ec2(fake_ec2, monkeypatch):
    """The module's FakeEC2 with fresh knobs and counters, and boto3's credentials set."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    fake_ec2.latency.clear()
    fake_ec2.refused_keys.clear()
    fake_ec2.reset_counts()
    yield fake_ec2
    fake_ec2.latency.clear()
