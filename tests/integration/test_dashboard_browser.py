"""The dashboard in a real headless browser (Playwright driving Debian's chromium) against
a real server: sign in, then watch its numbers move while a flex flood runs.

chromium comes from the system (`make test` installs it when run as root; see the
Makefile): Playwright cannot download its own browsers here. Set FLEXSERVE_SCREENSHOT to
a path to keep the screenshot taken under load (docs/dashboard.png is made that way).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from tests.conftest import ADMIN_KEY, KEY, OTHER_KEY, RunningServer

Serve = Callable[..., RunningServer]
MODEL = "smollm2-135m"
FLOOD = 24
WAIT_MS = 30_000
"""Bound for each wait on the page: it fails only if the number never changes."""


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    chromium = os.environ.get("FLEXSERVE_CHROMIUM") or shutil.which("chromium")
    if chromium is None:
        pytest.fail(
            "chromium not found: `apt-get install chromium` (Debian's package; `make test` "
            "does it when run as root), or set FLEXSERVE_CHROMIUM to its path"
        )
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=chromium, headless=True, args=["--no-sandbox", "--disable-gpu"]
        )
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    yield context.new_page()
    context.close()


def cell(tier: str, field: str) -> str:
    return f"#tier-{tier} [data-field={field}]"


# Functions, not expressions: the page's Content-Security-Policy forbids eval of strings.
READ_NUMBER = """([selector, op, than]) => {
    const shown = Number(document.querySelector(selector)?.textContent ?? NaN);
    return op === ">" ? shown > than : shown === than;
}"""
TEXT_HAS = "([selector, part]) => document.querySelector(selector)?.textContent.includes(part)"
TEXT_IS_NOT = "([selector, text]) => document.querySelector(selector)?.textContent !== text"


def wait_number(page: Page, selector: str, op: str, than: float) -> None:
    """Until the number shown at `selector` is `op` `than` (fails if it never is)."""
    page.wait_for_function(READ_NUMBER, arg=[selector, op, than], timeout=WAIT_MS)


def sign_in(page: Page, server: RunningServer, key: str) -> None:
    page.goto(server.base_url + "/dashboard")
    page.fill("#key", key)
    page.click("#login button[type=submit]")


def test_the_numbers_move_while_a_flex_flood_runs(serve: Serve, page: Page, tmp_path: Path) -> None:
    # Slow enough that two slots cannot keep up: flex queues, and the page must show it.
    server = serve(simulated={"ttft_ms": 20, "tpot_ms": 25, "natural_output_tokens": 24})
    sign_in(page, server, ADMIN_KEY)
    wait_number(page, cell("flex", "requests"), "===", 0)
    assert page.inner_text("#cost-total") == "$0.000000"

    with ThreadPoolExecutor(FLOOD) as pool:
        answers = [pool.submit(ask, server, KEY if i % 2 else OTHER_KEY) for i in range(FLOOD)]
        wait_number(page, cell("flex", "queued"), ">", 0)
        wait_number(page, cell("flex", "running"), ">", 0)
        wait_number(page, cell("flex", "requests"), ">", 0)
        screenshot = os.environ.get("FLEXSERVE_SCREENSHOT") or str(tmp_path / "dashboard.png")
        page.screenshot(path=screenshot, full_page=True)
        assert [answer.result() for answer in answers] == ["stop"] * FLOOD

    wait_number(page, cell("flex", "completed"), "===", FLOOD)
    wait_number(page, cell("flex", "queued"), "===", 0)
    page.wait_for_function(TEXT_IS_NOT, arg=["#cost-saved", "$0.000000"], timeout=WAIT_MS)
    p50 = page.inner_text(cell("flex", "p50"))
    assert p50.endswith(("ms", " s")), p50  # a time to first token was seen
    assert "slots busy now" in page.inner_text(f"#model-{MODEL}")


def ask(server: RunningServer, key: str) -> str | None:
    # max_tokens bounds what admission predicts (the default, 256, with the cold-start
    # rate, would predict waits past the client's patience and refuse the flood).
    with openai.OpenAI(base_url=server.url, api_key=key, max_retries=0, timeout=120) as c:
        answer = c.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            service_tier="flex",
            max_tokens=32,
        )
    return answer.choices[0].finish_reason


def test_a_tenant_key_is_refused_and_the_form_says_why(serve: Serve, page: Page) -> None:
    server = serve()
    sign_in(page, server, KEY)
    page.wait_for_function(TEXT_HAS, arg=["#login-error", "admin key"], timeout=WAIT_MS)
    assert page.is_hidden("#board")
    assert page.evaluate("sessionStorage.length") == 0  # a refused key is not kept


def test_signing_out_forgets_the_key(serve: Serve, page: Page) -> None:
    server = serve()
    sign_in(page, server, ADMIN_KEY)
    page.wait_for_selector("#tier-flex", timeout=WAIT_MS)
    page.click("#logout")
    assert page.is_visible("#login")
    assert page.evaluate("sessionStorage.length") == 0
