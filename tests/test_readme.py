"""The README's `qkit ...` examples use options the CLI has (parsed by click, never run)."""
from __future__ import annotations

import shlex
from pathlib import Path

import click
import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_commands() -> list[str]:
    out = []
    for line in README.read_text().splitlines():
        s = line.strip()
        if s.startswith("qkit ") and not s.startswith("qkit never"):
            out.append(s.split("#", 1)[0].strip())
    return out


def resolve(args: list[str]):
    """Walk the groups to the leaf command; returns (command, its own args)."""
    from qkit.cli.main import cli

    cmd, ctx = cli, None
    while isinstance(cmd, click.Group) and args and not args[0].startswith("-"):
        ctx = click.Context(cmd, parent=ctx, info_name=cmd.name)
        sub = cmd.get_command(ctx, args[0])
        assert sub is not None, f"no command {args[0]!r}"
        cmd, args = sub, args[1:]
    return cmd, args


def test_readme_has_commands():
    cmds = readme_commands()
    assert len(cmds) > 20 and any(c.startswith("qkit ann build") for c in cmds)


@pytest.mark.parametrize("line", readme_commands())
def test_readme_command_parses(line):
    cmd, args = resolve(shlex.split(line)[1:])
    if cmd.context_settings.get("ignore_unknown_options"):
        return  # forwards its arguments to a benchmark script
    try:
        cmd.make_context(cmd.name, list(args), resilient_parsing=False)
    except click.exceptions.Exit:
        pass  # --help
    except (click.NoSuchOption, click.BadOptionUsage, click.MissingParameter) as e:
        pytest.fail(f"{line}: {e.format_message()}")
    except click.BadParameter as e:
        # values checked against the file system (MODEL paths, index files) are the reader's, not the README's
        if "does not exist" not in e.format_message():
            pytest.fail(f"{line}: {e.format_message()}")
