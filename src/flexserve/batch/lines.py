"""Checking a batch input file line by line, as it streams in (never held whole).

What can be known from the file alone is known at upload, so that `batches.create`
answers 400 at once for a file that could never run (OpenAI's batch accepts it and fails
minutes later): broken JSON, a missing or repeated `custom_id`, a method other than POST,
a `url` that is not a generation endpoint or differs between lines, more than one model,
too many lines or bytes. A line whose *body* is a bad request is not the file's problem:
it becomes that line's error while the rest runs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/responses")
"""Generation endpoints a batch may target."""
MAX_LINES = 50_000
MAX_FILE_BYTES = 200 * 1024 * 1024
MAX_CUSTOM_ID = 512
MAX_MODEL_NAME = 200
CHUNK_BYTES = 1024 * 1024
"""Stored chunk size (and read size) of file content."""
CHARS_PER_TOKEN = 4
DEFAULT_OUTPUT_ESTIMATE = 256


@dataclass
class LineChecker:
    """Feed it every line; `problem` is the first reason the file cannot be a batch."""

    line_count: int = 0
    model: str | None = None
    endpoint: str | None = None
    estimated_tokens: int = 0
    problem: str | None = None
    _custom_ids: set[str] = field(default_factory=set)

    def feed(self, raw: bytes) -> None:
        if self.problem is not None or not raw.strip():
            return  # blank lines (a trailing newline) are not requests
        self.line_count += 1
        if self.line_count > MAX_LINES:
            self.problem = f"a batch file may hold at most {MAX_LINES} requests"
            return
        try:
            self._check(raw)
        except _BadLine as bad:
            self.problem = f"line {self.line_count}: {bad}"

    def _check(self, raw: bytes) -> None:
        line = _object(raw)
        custom_id = line.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            raise _BadLine("'custom_id' must be a non-empty string")
        if len(custom_id) > MAX_CUSTOM_ID:
            raise _BadLine(f"'custom_id' is longer than {MAX_CUSTOM_ID} characters")
        if custom_id in self._custom_ids:
            raise _BadLine(f"'custom_id' {custom_id!r} is used by an earlier line")
        self._custom_ids.add(custom_id)
        if line.get("method") != "POST":
            raise _BadLine("'method' must be \"POST\"")
        self._same("endpoint", line.get("url"), "'url'")
        if self.endpoint not in ENDPOINTS:
            raise _BadLine(f"'url' must be one of {', '.join(ENDPOINTS)}")
        body = line.get("body")
        if not isinstance(body, dict):
            raise _BadLine("'body' must be a JSON object")
        self._same("model", body.get("model"), "'body.model'")
        if len(self.model or "") > MAX_MODEL_NAME:
            raise _BadLine(f"'body.model' is longer than {MAX_MODEL_NAME} characters")
        self.estimated_tokens += _estimate(body)

    def _same(self, name: str, value: Any, label: str) -> None:
        if not isinstance(value, str) or not value:
            raise _BadLine(f"{label} must be a non-empty string")
        first = getattr(self, name)
        if first is None:
            setattr(self, name, value)
        elif value != first:
            raise _BadLine(f"{label} is {value!r}, but earlier lines use {first!r} (one per file)")


class _BadLine(Exception):
    pass


def _object(raw: bytes) -> dict[str, Any]:
    try:
        line = json.loads(raw)
    except RecursionError:
        raise _BadLine("nested too deeply") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise _BadLine(
            f"not valid JSON ({error.msg if hasattr(error, 'msg') else error})"
        ) from None
    if not isinstance(line, dict):
        raise _BadLine("each line must be a JSON object")
    return line


def _estimate(body: dict[str, Any]) -> int:
    """Prompt (about 4 characters a token) plus the output cap: for the tenant's limit."""
    text = body.get("messages") or body.get("prompt") or body.get("input") or ""
    prompt = math.ceil(len(json.dumps(text)) / CHARS_PER_TOKEN)
    cap = (
        body.get("max_completion_tokens") or body.get("max_tokens") or body.get("max_output_tokens")
    )
    output = cap if isinstance(cap, int) and cap > 0 else DEFAULT_OUTPUT_ESTIMATE
    return prompt + output


MAX_LINE_BYTES = 16 * 1024 * 1024
"""A longer line is cut (and fails as broken JSON): memory stays bounded."""


class LineSplitter:
    """Lines of a stream of blocks (a line may span blocks), without their newline."""

    def __init__(self) -> None:
        self._rest = b""

    def push(self, block: bytes) -> list[bytes]:
        *lines, self._rest = (self._rest + block).split(b"\n")
        if len(self._rest) > MAX_LINE_BYTES:
            lines.append(self._rest)
            self._rest = b""
        return lines

    def finish(self) -> list[bytes]:
        rest, self._rest = self._rest, b""
        return [rest] if rest else []


def split_lines(blocks: Iterable[bytes]) -> Iterator[bytes]:
    splitter = LineSplitter()
    for block in blocks:
        yield from splitter.push(block)
    yield from splitter.finish()


def parse_items(blocks: Iterable[bytes]) -> Iterator[tuple[int, str, str]]:
    """(line_no, custom_id, body JSON) of a file that passed the checks."""
    line_no = 0
    for raw in split_lines(blocks):
        if not raw.strip():
            continue
        line = json.loads(raw)
        yield line_no, line["custom_id"], json.dumps(line["body"], separators=(",", ":"))
        line_no += 1
