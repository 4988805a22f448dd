"""Every `tunnel-lab ...` command line in the README's and docs/ci.md's code blocks parses with the real
argument parser of its subcommand (nothing is executed)."""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable
from pathlib import Path

import pytest

from tunnel_lab.lab.cli import SUBCOMMANDS

ROOT = Path(__file__).resolve().parents[2]
DOCS = [
    ROOT / "README.md",
    ROOT / "docs" / "ci.md",
    ROOT / "docs" / "up.md",
    ROOT / "docs" / "cloudflared.md",
    ROOT / "docs" / "sandbox.md",
]


def code_blocks(text: str) -> list[str]:
    return re.findall(r"^```[a-z]*\n(.*?)^```", text, flags=re.M | re.S)


def tunnel_lab_commands(block: str) -> list[str]:
    """The `tunnel-lab ...` command lines of a code block: continuation lines joined, YAML `>` folded,
    GitHub expressions and shell variables replaced by sample values, comments and `&` dropped."""
    text = re.sub(r"\\\n\s*", " ", block)
    text = re.sub(
        r"run: >\n((?:\s{10,}.*\n?)+)", lambda m: "run: " + " ".join(m.group(1).split()) + "\n", text
    )
    text = re.sub(r"\$\{\{\s*matrix\.shard\s*\}\}", "1", text)
    text = text.replace("$(cat lab-state/api-token)", "TOKEN")
    commands = []
    for line in text.splitlines():
        m = re.search(r"(?:^|[\s/(])tunnel-lab (\S.*)$", line)
        if not m or line.lstrip().startswith(("#", "usage")):
            continue
        command = re.sub(r"\s+#.*$", "", m.group(1)).split(" | ")[0].strip().rstrip("&").strip()
        if command.split(" ")[0].endswith(":") or " [" in command:
            continue  # printed output (`tunnel-lab up: ...`) or a synopsis with [OPTIONS]
        commands.append(command)
    return commands


def all_commands() -> list[tuple[str, str]]:
    found = []
    for doc in DOCS:
        for block in code_blocks(doc.read_text(encoding="utf-8")):
            found += [(doc.name, c) for c in tunnel_lab_commands(block)]
    return found


class Refused(Exception):
    pass


def _argparse(build: Callable[[], object]) -> Callable[[list[str]], None]:
    def parse(argv: list[str]) -> None:
        try:
            build().parse_args(argv)  # type: ignore[attr-defined]
        except SystemExit as exc:
            raise Refused(f"exit {exc.code}") from exc

    return parse


def _connector(argv: list[str]) -> None:
    from tunnel_lab.connector import cli

    cli.parse_command(argv)


def _admin(which: str) -> Callable[[list[str]], None]:
    def parse(argv: list[str]) -> None:
        from tunnel_lab.lab import admin

        parser = admin._tunnel_parser() if which == "tunnel" else admin._pki_parser()
        if which == "tunnel":
            argv = admin._expand_route_ip_shorthand(argv)
        try:
            parser.parse_args(argv)
        except (SystemExit, admin._UsageError) as exc:
            raise Refused(str(exc)) from exc

    return parse


def _netns(argv: list[str]) -> None:
    if not argv or (argv[0] == "--" and len(argv) == 1):
        raise Refused("no COMMAND")


def parsers() -> dict[str, Callable[[list[str]], None]]:
    from tunnel_lab.edge.cli import build_parser as edge_parser
    from tunnel_lab.lab.login import _parser as login_parser
    from tunnel_lab.lab.runner.cli import build_parser as run_parser
    from tunnel_lab.lab.sandbox import _parser as sandbox_parser
    from tunnel_lab.lab.up import build_parser as up_parser
    from tunnel_lab.origin_fixtures.cli import _parser as origin_parser

    return {
        "run": _argparse(run_parser),
        "up": _argparse(up_parser),
        "edge": _argparse(edge_parser),
        "origin": _argparse(origin_parser),
        "connector": _connector,
        "tunnel": _admin("tunnel"),
        "pki": _admin("pki"),
        "netns": _netns,
        "sandbox": _argparse(sandbox_parser),
        "login": _argparse(login_parser),
    }


COMMANDS = all_commands()


def test_the_docs_have_commands_to_check() -> None:
    names = {shlex.split(c)[0] for _, c in COMMANDS}
    assert {"run", "up", "netns", "tunnel", "edge", "connector", "origin"} <= names


@pytest.mark.parametrize(("doc", "command"), COMMANDS, ids=[f"{d}: {c[:60]}" for d, c in COMMANDS])
def test_documented_command_parses(doc: str, command: str) -> None:
    argv = shlex.split(command.replace("<UUID>", "6f1c1d4e-0b8a-4a57-9a43-2f8f6f1c1d4e"))
    name, rest = argv[0], argv[1:]
    assert name in SUBCOMMANDS, f"{doc}: `tunnel-lab {name}` is not a command"
    known = parsers()
    assert name in known, f"{doc}: no parser check for `tunnel-lab {name}` (add one here)"
    known[name](rest)


def test_a_wrong_command_is_refused() -> None:
    with pytest.raises(Refused):
        parsers()["run"](["--shard"])
    with pytest.raises(Refused):
        parsers()["up"](["--no-such-flag"])
