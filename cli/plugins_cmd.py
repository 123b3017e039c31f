"""`marble plugins`: every registered reward, balancer and policy."""

from __future__ import annotations

import typer
from rich.table import Table

from marble_cli.common import console, print_json, user_errors
from marble_kit.registry import get_registry


@user_errors
def plugins(json_output: bool = typer.Option(False, "--json", help="Print JSON for scripts.")):
    """List installed rewards, balancers and policies with their provider package."""
    infos = get_registry().all()
    if json_output:
        print_json([
            {"kind": i.kind, "name": i.name, "provider": i.provider, "module": i.module,
             "description": i.description}
            for i in infos
        ])
        return
    table = Table(title="marble plugins")
    for column in ("kind", "name", "provider", "description"):
        table.add_column(column)
    for info in infos:
        table.add_row(info.kind, info.name, info.provider, info.description)
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command("plugins")(plugins)
