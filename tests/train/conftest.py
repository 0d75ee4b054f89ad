"""Fixtures of the training tests."""

from __future__ import annotations

import pytest

from tests.train.slurm_cluster import SlurmCluster, unavailable_reason


@pytest.fixture(scope="module")
def cluster():
    """A running one-node Slurm for the tests of a module (skipped, with the reason, where it cannot start)."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    with SlurmCluster() as c:
        yield c
