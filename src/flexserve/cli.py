"""`flexserve serve | keys | batch`: the command line (batch commands: batch_cli.py)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, get_args

import click

from flexserve.batch_cli import batch
from flexserve.config import EngineName, InvalidSettings, Settings, load_settings

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
ENGINES = get_args(EngineName)
EXIT_BAD_SETTINGS = 2
"""As for a bad flag: the command cannot run as configured (a supervisor should not retry)."""


@click.group()
def main() -> None:
    """flexserve: an OpenAI-compatible LLM server with service tiers."""


class BadSettings(click.ClickException):
    exit_code = EXIT_BAD_SETTINGS


def _settings(config: Path | None, **overrides: Any) -> Settings:
    """Checked in full before anything starts: one line naming the setting, exit 2."""
    try:
        return load_settings(config, **overrides)
    except InvalidSettings as error:
        raise BadSettings(f"invalid settings: {error}") from None


@main.command()
@click.option("--host", default=None, help="Address to bind (default 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Port (default 8000).")
@click.option("--backend", type=click.Choice(["simulated", "embedded"]), default=None)
@click.option("--slots", type=int, default=None, help="Concurrent sequences on the backend.")
@click.option("--model-name", default=None, help="Name clients pass as `model`.")
@click.option("--sim-ttft-ms", type=float, default=None, help="Simulated time to first token.")
@click.option("--sim-tpot-ms", type=float, default=None, help="Simulated time per token.")
@click.option(
    "--upstream",
    default=None,
    help="Serve every model of this OpenAI-compatible server (its /v1 URL).",
)
@click.option(
    "--upstream-engine",
    type=click.Choice(ENGINES),
    default=None,
    help="The engine behind --upstream (its priority and continuation styles).",
)
@click.option("--data-dir", type=click.Path(path_type=Path), default=None)
@click.option("--config", type=click.Path(exists=True, path_type=Path), default=None)
@click.option(
    "--log-level",
    type=click.Choice(LOG_LEVELS, case_sensitive=False),
    default="info",
    show_default=True,
)
def serve(
    host: str | None,
    port: int | None,
    backend: str | None,
    slots: int | None,
    model_name: str | None,
    sim_ttft_ms: float | None,
    sim_tpot_ms: float | None,
    upstream: str | None,
    upstream_engine: str | None,
    data_dir: Path | None,
    config: Path | None,
    log_level: str,
) -> None:
    """Start the server (SIGTERM drains it, then exits 0; a runtime failure exits 1)."""
    from flexserve.api import create_app, open_store
    from flexserve.api.server import run_server
    from flexserve.backends.model_files import ModelNotFoundError
    from flexserve.keys import create_key, ensure_config_keys

    simulated = {"ttft_ms": sim_ttft_ms, "tpot_ms": sim_tpot_ms}
    settings = _settings(
        config,
        host=host,
        port=port,
        backend=backend,
        slots=slots,
        model_name=model_name,
        data_dir=data_dir,
        simulated={k: v for k, v in simulated.items() if v is not None} or None,
        upstream=upstream,
        upstream_engine=upstream_engine,
    )
    log_level = log_level.lower()
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    try:
        app = create_app(settings)
    except ModelNotFoundError as error:  # the embedded default model is not installed
        raise BadSettings(f"invalid settings: embedded.model_path: {error}") from None
    except InvalidSettings as error:  # e.g. an upstream that lists no model
        raise BadSettings(f"invalid settings: {error}") from None
    store = open_store(settings)
    store.migrate()
    ensure_config_keys(store, settings.api_keys, settings.admin_keys)
    if not store.list_keys():
        new = create_key(store, "default")
        # Printed once to the terminal, never logged: only its hash is stored.
        click.echo(
            f"\nCreated the first API key (tenant 'default'); it is shown only once:\n\n"
            f"    {new.secret}\n\nexport OPENAI_API_KEY={new.secret}\n"
            f"export OPENAI_BASE_URL=http://{settings.host}:{settings.port}/v1\n"
        )
    store.close()
    for served in app.state.flexserve.fleet:
        click.echo(
            f"flexserve: model '{served.name}' on the {served.backend.name} backend, "
            f"{served.backend.slots} slots, http://{settings.host}:{settings.port}/v1"
        )
    status = run_server(app, settings, log_level)
    if status != 0:
        raise SystemExit(status)


@main.group()
def keys() -> None:
    """Manage API keys (stored hashed)."""


@keys.command("create")
@click.option("--tenant", required=True, help="Tenant the key belongs to.")
@click.option("--admin", is_flag=True, help="Allow admin routes.")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None)
@click.option("--config", type=click.Path(exists=True, path_type=Path), default=None)
def keys_create(tenant: str, admin: bool, data_dir: Path | None, config: Path | None) -> None:
    """Create a key and print it once."""
    from flexserve.api import open_store
    from flexserve.keys import create_key

    store = open_store(_settings(config, data_dir=data_dir))
    store.migrate()
    new = create_key(store, tenant, is_admin=admin)
    store.close()
    click.echo(new.secret)


@keys.command("list")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None)
@click.option("--config", type=click.Path(exists=True, path_type=Path), default=None)
def keys_list(data_dir: Path | None, config: Path | None) -> None:
    """List keys (id, tenant, prefix; never the secret)."""
    from flexserve.api import open_store

    store = open_store(_settings(config, data_dir=data_dir))
    store.migrate()
    for key in store.list_keys():
        state = "revoked" if key.revoked else ("admin" if key.is_admin else "active")
        click.echo(f"{key.key_id}\t{key.tenant}\t{key.prefix}…\t{state}")
    store.close()


main.add_command(batch)

if __name__ == "__main__":
    main()
