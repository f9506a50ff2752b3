"""Percentiles from histogram buckets, estimated as PromQL's histogram_quantile does."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry, Histogram

from flexserve.metrics_view import histogram_quantile, read_samples, tier_stats

INF = math.inf


def test_a_rank_inside_a_bucket_is_interpolated_linearly() -> None:
    buckets = [(0.1, 0.0), (0.5, 10.0), (1.0, 20.0), (INF, 20.0)]
    assert histogram_quantile(0.5, buckets) == 0.5  # rank 10: the top of (0.1, 0.5]
    assert histogram_quantile(0.25, buckets) == pytest.approx(0.3)  # rank 5 of 10 in (0.1, 0.5]
    assert histogram_quantile(0.75, buckets) == pytest.approx(0.75)


def test_the_first_bucket_starts_at_zero() -> None:
    assert histogram_quantile(0.5, [(0.2, 4.0), (INF, 4.0)]) == pytest.approx(0.1)


def test_a_rank_in_the_inf_bucket_is_the_highest_finite_bound() -> None:
    assert histogram_quantile(0.99, [(1.0, 1.0), (2.0, 1.0), (INF, 10.0)]) == 2.0


def test_no_observations_have_no_percentile() -> None:
    assert histogram_quantile(0.5, [(1.0, 0.0), (INF, 0.0)]) is None
    assert histogram_quantile(0.5, []) is None


def test_tier_percentiles_read_the_registrys_histogram() -> None:
    registry = CollectorRegistry()
    ttft = Histogram(
        "flexserve_time_to_first_token_seconds",
        "",
        ["tier"],
        buckets=(0.1, 1.0),
        registry=registry,
    )
    for seconds in (0.05, 0.5, 0.5, 0.5):
        ttft.labels("flex").observe(seconds)
    flex = tier_stats(read_samples(registry))["flex"]["ttft_seconds"]
    assert flex["count"] == 4
    assert flex["p50"] == pytest.approx(0.1 + 0.9 * (2 - 1) / 3)  # rank 2 of the 3 in (0.1, 1.0]
    assert flex["p99"] is not None and flex["p99"] <= 1.0
