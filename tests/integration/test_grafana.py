"""grafana/flexserve.json queries only what /metrics has: every metric name (with the
suffix its type gives: `_total`, `_bucket`, `_sum`, `_count`) and every label it groups,
joins, matches or names in a legend, checked against a live scrape."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import KEY, RunningServer

Serve = Callable[..., RunningServer]
MODEL = "smollm2-135m"
BOARD = Path(__file__).parents[2] / "grafana" / "flexserve.json"
SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "gauge": ("",),
}
METRIC = re.compile(r"\bflexserve_[a-zA-Z0-9_]+")
GROUPING = re.compile(r"\b(?:by|on|without|ignoring)\s*\(([^)]*)\)")
MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*\"")
LEGEND = re.compile(r"\{\{\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}")


def targets(node: Any) -> Iterator[dict[str, Any]]:
    """Every query of the board, in panels and in rows' nested panels."""
    if isinstance(node, dict):
        if "expr" in node:
            yield node
        for value in node.values():
            yield from targets(value)
    elif isinstance(node, list):
        for item in node:
            yield from targets(item)


def exposed(text: str) -> dict[str, set[str]]:
    """Sample name -> its label names, from a /metrics scrape: for every family, the
    names its type gives (a counter never incremented still says `# TYPE`)."""
    names: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        labels = {label for s in family.samples for label in s.labels}
        for suffix in SUFFIXES.get(family.type, ("",)):
            names[family.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return names


def test_the_board_parses_and_has_queries() -> None:
    board = json.loads(BOARD.read_text())
    exprs = [t["expr"] for t in targets(board)]
    assert len(exprs) >= 10 and all(METRIC.search(e) for e in exprs)


def test_every_metric_and_label_the_board_queries_is_in_metrics(serve: Serve) -> None:
    server = serve(slots=1, simulated={"ttft_ms": 5, "tpot_ms": 20, "natural_output_tokens": 30})
    make_every_series(server)
    names = exposed(scrape(server))
    for target in targets(json.loads(BOARD.read_text())):
        expr = target["expr"]
        queried = METRIC.findall(expr)
        missing = [name for name in queried if name not in names]
        assert not missing, f"{expr}: not in /metrics: {missing}"
        labels = set().union(*(names[name] for name in queried))
        used = {label.strip() for group in GROUPING.findall(expr) for label in group.split(",")}
        used |= set(MATCHER.findall(expr)) | set(LEGEND.findall(target.get("legendFormat", "")))
        assert used - {""} <= labels, f"{expr}: labels {used - labels} are not on {queried}"


def make_every_series(server: RunningServer) -> None:
    """A completed request in each interactive tier, a flex request shed (429) and a
    flex stream preempted by a default request, so every labelled series exists."""
    with openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0, timeout=30) as c:
        ask(c, "priority")
        flex = c.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hold"}],
            stream=True,
            service_tier="flex",
        )
        chunks = iter(flex)
        next(chunks)  # the flex stream holds the only slot
        with pytest.raises(openai.RateLimitError):
            ask(c, "flex", extra_headers={"X-Flex-Max-Wait": "0"})
        ask(c, "default")  # pauses the flex stream
        list(chunks)
    # the preemption is counted when the flex job settles, just after its stream ends
    server.wait_until(lambda: 'flexserve_preemptions_total{tier="flex"}' in scrape(server))


def scrape(server: RunningServer) -> str:
    return httpx.get(server.base_url + "/metrics", timeout=10).text


def ask(c: openai.OpenAI, tier: str, **options: Any) -> None:
    c.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        service_tier=tier,  # type: ignore[arg-type]
        **options,
    )
