"""`flexserve batch submit | wait | status | list | cancel | results`: the Batch API from
the command line, through the official `openai` client, against this server (local or
remote) or any other that speaks OpenAI's Batch API.

`openai` is imported only when a batch command runs: `flexserve serve` need not pay for it.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import click
from rich.console import Console

from flexserve.batch_view import Snapshot, Watch, details, listing, summary

if TYPE_CHECKING:
    from openai import APIStatusError, OpenAI
    from openai.types import Batch

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
DEFAULT_ENDPOINT = "/v1/chat/completions"
FINAL = ("completed", "failed", "expired", "cancelled")
EXIT_ERROR = 1
"""The server refused a call (its message is printed) or could not be reached."""
EXIT_FOR_STATUS = {"completed": 0, "failed": 3, "expired": 4, "cancelled": 5}
"""How a watched batch ended (`submit --wait`, `wait`). `completed` is 0 even when some
lines failed: they are in the error file and the counts."""
EXIT_INTERRUPTED = 130

F = TypeVar("F", bound=Callable[..., Any])


@click.group()
def batch() -> None:
    """Run batches (OpenAI's Batch API) on a flexserve server, local or remote.

    The server is --base-url or OPENAI_BASE_URL (default http://127.0.0.1:8000/v1), the key
    --api-key or OPENAI_API_KEY. Exit status: 0 done; 1 the server refused (one line says
    why) or could not be reached; 2 bad usage; after watching a batch (`submit --wait`,
    `wait`): 3 it failed, 4 it expired, 5 it was cancelled.
    """


def _connection(command: F) -> F:
    command = click.option(
        "--api-key",
        envvar="OPENAI_API_KEY",
        show_envvar=True,
        help="API key (a flexserve key: `flexserve keys create`).",
    )(command)
    return click.option(
        "--base-url",
        envvar="OPENAI_BASE_URL",
        default=DEFAULT_BASE_URL,
        show_default=True,
        show_envvar=True,
        help="The server's /v1 URL.",
    )(command)


def _watching(command: F) -> F:
    command = click.option(
        "--interval",
        type=click.FloatRange(min=0.05),
        default=2.0,
        show_default=True,
        help="Seconds between polls while waiting.",
    )(command)
    return click.option(
        "--out",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help="When it ends, download its output and error files into this directory.",
    )(command)


@contextmanager
def _client(base_url: str, api_key: str | None) -> Iterator[OpenAI]:
    """The official client; whatever goes wrong talking to the server becomes one line
    and exit status 1, never a traceback."""
    import openai

    if not api_key:
        raise click.UsageError("no API key: pass --api-key or set OPENAI_API_KEY")
    client = openai.OpenAI(base_url=base_url, api_key=api_key, timeout=60.0)
    try:
        yield client
    except openai.APIStatusError as error:
        raise click.ClickException(_refusal(error)) from None
    except openai.APIConnectionError as error:
        cause = error.__cause__ or error
        raise click.ClickException(f"cannot reach {base_url}: {cause}") from None
    finally:
        client.close()


def _refusal(error: APIStatusError) -> str:
    body = error.body
    message = body.get("message") if isinstance(body, dict) else None
    text = " ".join(str(message or error.response.text or error.message).split())
    hint = " (check --api-key or OPENAI_API_KEY)" if error.status_code == 401 else ""
    return f"the server answered {error.status_code}: {text}{hint}"


def _pairs(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE")
        pairs[key] = value
    return pairs


def _console(stderr: bool = False) -> Console:
    console = Console(stderr=stderr, highlight=False, soft_wrap=stderr)
    if not console.is_terminal:  # a log or a pipe: long lines stay whole for grep
        console.width = max(console.width, 200)
    return console


def _err() -> Console:
    return _console(stderr=True)


@batch.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--endpoint", default=None, help="Default: the `url` of the file's first request.")
@click.option("--window", default="24h", show_default=True, help="Completion window.")
@click.option(
    "--metadata",
    multiple=True,
    callback=_pairs,
    metavar="KEY=VALUE",
    help="Kept on the batch (repeatable).",
)
@click.option("--wait", is_flag=True, help="Watch it to the end, then print a summary.")
@_watching
@_connection
def submit(
    file: Path,
    endpoint: str | None,
    window: str,
    metadata: dict[str, str],
    wait: bool,
    interval: float,
    out: Path | None,
    base_url: str,
    api_key: str | None,
) -> None:
    """Upload FILE (JSONL, one request a line) and start a batch; print its id."""
    if out is not None and not wait:
        raise click.UsageError("--out needs --wait (or run `flexserve batch results ID`)")
    endpoint = endpoint or _first_url(file)
    with _client(base_url, api_key) as client:
        created = _create(client, file, endpoint, window, metadata)
        _err().print(
            f"submitted {file.name} as {created.id}: {Snapshot.of(created).total} requests "
            f"to {endpoint}, model {created.model or '-'}, window {window}"
        )
        click.echo(created.id)
        if wait:
            _watch_to_the_end(client, created.id, interval, out)


def _first_url(file: Path) -> str:
    """The `url` of the first request, when it can be read; otherwise the server says
    what is wrong with the file once it is uploaded."""
    with file.open("rb") as data:
        for raw in data:
            if raw.strip():
                try:
                    url = json.loads(raw).get("url")
                except (ValueError, AttributeError):
                    return DEFAULT_ENDPOINT
                return url if isinstance(url, str) else DEFAULT_ENDPOINT
    return DEFAULT_ENDPOINT


def _create(
    client: OpenAI, file: Path, endpoint: str, window: str, metadata: dict[str, str]
) -> Batch:
    import openai

    with file.open("rb") as data:
        uploaded = client.files.create(file=(file.name, data), purpose="batch")
    try:
        return client.batches.create(
            input_file_id=uploaded.id,
            endpoint=cast(Any, endpoint),  # the client's Literal lists OpenAI's endpoints
            completion_window=cast(Any, window),
            metadata=metadata or None,
        )
    except openai.APIStatusError:
        # Refused: no batch will ever read it. The refusal is what the user must see,
        # so a failure to clean up does not replace it.
        with contextlib.suppress(openai.APIError):
            client.files.delete(uploaded.id)
        raise


@batch.command("wait")
@click.argument("batch_id")
@_watching
@_connection
def wait_command(
    batch_id: str, interval: float, out: Path | None, base_url: str, api_key: str | None
) -> None:
    """Watch a batch to the end, print a summary; exit status says how it ended."""
    with _client(base_url, api_key) as client:
        _watch_to_the_end(client, batch_id, interval, out)


def _watch_to_the_end(client: OpenAI, batch_id: str, interval: float, out: Path | None) -> None:
    console = _err()
    try:
        with Watch(console) as watch:
            while True:
                current = client.batches.retrieve(batch_id)
                watch.show(Snapshot.of(current))
                if current.status in FINAL:
                    break
                time.sleep(interval)
    except KeyboardInterrupt:
        console.print(f"stopped watching; {batch_id} goes on (`flexserve batch wait {batch_id}`)")
        sys.exit(EXIT_INTERRUPTED)
    for line in summary(Snapshot.of(current)):
        click.echo(line)
    if out is not None:
        _download(client, current, out)
    if EXIT_FOR_STATUS[current.status]:
        sys.exit(EXIT_FOR_STATUS[current.status])


@batch.command()
@click.argument("batch_id")
@click.option("--json", "as_json", is_flag=True, help="The batch object as JSON.")
@_connection
def status(batch_id: str, as_json: bool, base_url: str, api_key: str | None) -> None:
    """Show a batch: status, counts, pace, cost, files."""
    with _client(base_url, api_key) as client:
        current = client.batches.retrieve(batch_id)
    if as_json:
        click.echo(current.model_dump_json(indent=2))
    else:
        _console().print(details(current))


@batch.command("list")
@click.option("--limit", type=click.IntRange(1, 100), default=20, show_default=True)
@click.option("--after", default=None, help="Start after this batch id (the next page).")
@click.option("--json", "as_json", is_flag=True, help="JSON lines, one batch object each.")
@_connection
def list_command(
    limit: int, after: str | None, as_json: bool, base_url: str, api_key: str | None
) -> None:
    """List your batches, newest first."""
    with _client(base_url, api_key) as client:
        page = (
            client.batches.list(limit=limit, after=after)
            if after
            else client.batches.list(limit=limit)
        )
    if as_json:
        for item in page.data:
            click.echo(item.model_dump_json())
    else:
        _console().print(listing(page.data))


@batch.command()
@click.argument("batch_id")
@_connection
def cancel(batch_id: str, base_url: str, api_key: str | None) -> None:
    """Cancel a batch: lines not started end in the error file; finished ones are kept."""
    with _client(base_url, api_key) as client:
        current = client.batches.cancel(batch_id)
    click.echo(f"{current.id} {current.status}: {Snapshot.of(current).counts()}")


@batch.command()
@click.argument("batch_id")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
    show_default=True,
    help="Directory for <batch>_output.jsonl and <batch>_errors.jsonl.",
)
@_connection
def results(batch_id: str, out: Path, base_url: str, api_key: str | None) -> None:
    """Download a finished batch's output and error files."""
    with _client(base_url, api_key) as client:
        _download(client, client.batches.retrieve(batch_id), out)


def _download(client: OpenAI, finished: Batch, out: Path) -> None:
    wanted = [
        (file_id, out / f"{finished.id}_{suffix}.jsonl")
        for file_id, suffix in (
            (finished.output_file_id, "output"),
            (finished.error_file_id, "errors"),
        )
        if file_id
    ]
    if not wanted:
        if finished.status not in FINAL:
            raise click.ClickException(
                f"{finished.id} is {finished.status}: its files are written when it ends "
                f"(`flexserve batch wait {finished.id}`)"
            )
        raise click.ClickException(f"{finished.id} ended {finished.status} with no files")
    out.mkdir(parents=True, exist_ok=True)
    for file_id, path in wanted:
        lines = _save(client, file_id, path)
        click.echo(f"wrote {path} ({lines} lines)")


def _save(client: OpenAI, file_id: str, path: Path) -> int:
    """Streamed to disk (outputs can be large); a partial download never takes the
    final name."""
    partial = path.with_name(path.name + ".part")
    lines = 0
    with (
        client.files.with_streaming_response.content(file_id) as response,
        partial.open("wb") as sink,
    ):
        for block in response.iter_bytes():
            sink.write(block)
            lines += block.count(b"\n")
    partial.replace(path)
    return lines
