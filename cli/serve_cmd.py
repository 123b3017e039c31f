"""`marble serve-reward NAME`: one installed reward over HTTP (marble_kit.serve)."""

from __future__ import annotations

import typer

from marble_cli.common import console, err_console, user_errors
from marble_kit.errors import MarbleError
from marble_kit.options import parse_plugin_options
from marble_kit.reward_protocol import DEFAULT_MAX_BATCH, DEFAULT_MAX_REQUEST_MB, DEFAULT_PORT, TOKEN_ENV


@user_errors
def serve_reward(
    name: str = typer.Argument(..., help="The reward plugin to serve (`marble plugins` lists them)."),
    reward_opt: list[str] | None = typer.Option(None, "--reward-opt", help="Reward option NAME.OPTION=VALUE (repeatable), as for `marble train`."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (loopback by default; another needs a --token to be safe)."),
    port: int = typer.Option(DEFAULT_PORT, "--port", help="Port to listen on (0: a free one, shown in the startup line)."),
    token: str | None = typer.Option(None, "--token", envvar=TOKEN_ENV, show_envvar=True, help="Require `Authorization: Bearer TOKEN` (prefer the env var: a flag shows in `ps`)."),
    max_request_mb: float = typer.Option(DEFAULT_MAX_REQUEST_MB, "--max-request-mb", help="Largest request body accepted (MiB); the client splits batches to fit."),
    max_batch: int = typer.Option(DEFAULT_MAX_BATCH, "--max-batch", help="Most images per request; the client splits batches to fit."),
    device: str | None = typer.Option(None, "--device", help="Run the reward model here (cpu, cuda:0)."),
    log_level: str = typer.Option("warning", "--log-level", help="uvicorn's log level (warning, info, debug)."),
):
    """Serve a reward plugin over HTTP for `--rewards remote:NAME` (docs/reward-services.md)."""
    from marble_kit.serve import is_loopback
    from marble_kit.serve import serve_reward as run_server

    options = parse_plugin_options(reward_opt, "--reward-opt")
    stray = sorted(set(options) - {name})
    if stray:
        raise MarbleError(f"--reward-opt names reward {stray[0]!r}, but this server serves {name!r}; "
                          f"write --reward-opt {name}.OPTION=VALUE")
    if not is_loopback(host) and token is None:
        err_console.print(f"[yellow]warning:[/] serving on {host} without a token: anyone who reaches this port "
                          f"can use the reward; set {TOKEN_ENV} (or --token)", highlight=False)

    def ready(url: str, info: dict) -> None:
        auth = "token required" if token else "no token"
        console.print(f"marble serve-reward: {name} ({info['provider']} {info['version']}) at {url} "
                      f"(protocol v{info['protocol']}, {auth}; Ctrl-C stops)", highlight=False, soft_wrap=True)
        console.file.flush()

    run_server(name, options.get(name, {}), host=host, port=port, token=token, max_request_mb=max_request_mb,
               max_batch=max_batch, device=device, log_level=log_level, on_ready=ready)


def register(app: typer.Typer) -> None:
    app.command("serve-reward")(serve_reward)
