"""Render the CLI reference (docs/cli.md) from the commands' own --help, so it cannot go stale."""

from __future__ import annotations

import click
import typer


def render() -> str:
    from bincount.cli import app

    group = typer.main.get_command(app)
    parts = ["# bincount CLI reference", "",
             "Generated from `--help` by `make docs` (`python -m bincount.clidoc > docs/cli.md`);",
             "a test fails when this file and the CLI disagree.", ""]
    root = click.Context(group, info_name="bincount", terminal_width=100, max_content_width=100)
    parts += ["```text", group.get_help(root).rstrip(), "```", ""]
    for name in group.list_commands(root):
        command = group.get_command(root, name)
        ctx = click.Context(command, info_name=name, parent=root, terminal_width=100, max_content_width=100)
        parts += [f"## bincount {name}", "", "```text", command.get_help(ctx).rstrip(), "```", ""]
    return "\n".join(parts)


if __name__ == "__main__":
    print(render(), end="")
