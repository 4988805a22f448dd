"""docs/getting-started.md is run as written: every `<!-- run: NAME -->` shell block, in order, in
`tunnel-lab sandbox`, with our connector (`cloudflared` read as `tunnel-lab connector`, as the page says)
and, when TUNNEL_LAB_CLOUDFLARED names the binary, with the real cloudflared, whose output must be what
the page's `<!-- output: NAME -->` blocks show (what changes from run to run replaced by placeholders).

Refresh those blocks from a real run with
`TUNNEL_LAB_CLOUDFLARED=PATH python -m tests.integration.test_getting_started --write`.
"""

from __future__ import annotations

import difflib
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tunnel_lab.lab.runner import netns

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "getting-started.md"
TIMEOUT = 240
OK, WHY = netns.available()
CLOUDFLARED = os.environ.get("TUNNEL_LAB_CLOUDFLARED")
MARK = "@@@ step "

_BLOCK = re.compile(r"<!-- (run|output): ([a-z0-9-]+) -->\n```(\w*)\n(.*?)```\n", re.DOTALL)


@dataclass(frozen=True)
class Block:
    kind: str  # run or output
    name: str
    text: str
    start: int  # the span of the fenced text in the page
    end: int


def blocks(page: str) -> list[Block]:
    """The page's marked blocks, in order."""
    out = []
    for m in _BLOCK.finditer(page):
        out.append(Block(m.group(1), m.group(2), m.group(4), m.start(4), m.end(4)))
    return out


def script(page: str, *, ours: bool) -> str:
    """One bash script: each run block after a marker line; stderr joins stdout, as in a terminal."""
    lines = ["exec 2>&1", "set -e", 'cd "$HOME"']
    for block in blocks(page):
        if block.kind != "run":
            continue
        text = block.text
        if ours:  # the command word only, not `~/.cloudflared`
            text = re.sub(r"(?<![\w./-])cloudflared\b", "tunnel-lab connector", text)
        lines += [f"echo '{MARK}{block.name}'", text]
    return "\n".join(lines) + "\n"


def run_page(state: Path, *, cloudflared: str | None
             ) -> tuple[subprocess.CompletedProcess[str], dict[str, str]]:
    """Run the page in a sandbox; the output of each run block by name."""
    page = PAGE.read_text()
    argv = [sys.executable, "-m", "tunnel_lab", "sandbox", "--quiet", "--state", str(state)]
    if cloudflared:
        argv += ["--cloudflared", str(Path(cloudflared).resolve())]
    proc = subprocess.run([*argv, "--", "bash", "-c", script(page, ours=cloudflared is None)],
                          capture_output=True, text=True, timeout=TIMEOUT)
    outputs: dict[str, str] = {}
    current = None
    for line in proc.stdout.splitlines(keepends=True):
        if line.startswith(MARK):
            current = line[len(MARK):].strip()
            outputs[current] = ""
        elif current is not None:
            outputs[current] += line
    return proc, outputs


# What differs from run to run, in the order applied.
_NORMAL = [
    (re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"), "<uuid>"),
    (re.compile(r"\b[0-9a-f]{32}\b"), "<hex32>"),
    (re.compile(r"\b[0-9a-f]{16}-LAB\d\b"), "<ray>"),
    (re.compile(r"Checksum [0-9a-f]{64}"), "Checksum <sha256>"),
    (re.compile(r"lab-[A-Za-z0-9_-]{20,}"), "<api-token>"),
    (re.compile(r'"TunnelSecret":"[^"]+"'), '"TunnelSecret":"<base64>"'),
    (re.compile(r"(login\.cloudflareaccess\.org%2F)[A-Za-z0-9%_-]+"), r"\1<key>"),
    (re.compile(r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(Z| \+0000 UTC)?"), "<time>"),
    (re.compile(r"\w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d GMT"), "<date>"),
    (re.compile(r"Python/[0-9.]+"), "Python/<version>"),
    (re.compile(r"remote=\S+"), "remote=<address:port>"),
    (re.compile(r'"time": [0-9.]+'), '"time": <time>'),
    (re.compile(r'"duration_ms": [0-9.]+'), '"duration_ms": <ms>'),
    (re.compile(r"\b\d+xLAB\d(, \d+xLAB\d)*"), "<connections>"),
    # `tunnel info`'s ORIGIN IP: the connector's side of the connection the API lists first.
    (re.compile(r"(linux_amd64\s+\S+\s+)(127\.0\.0\.1|2001:db8:[12]::[12])\b"), r"\1<origin ip>"),
    # Which data centre and connIndex answer first is a race.
    (re.compile(r"location=LAB\d"), "location=LAB<n>"),
    (re.compile(r'"location": "LAB\d"'), '"location": "LAB<n>"'),
    (re.compile(r"connIndex=\d"), "connIndex=<n>"),
    (re.compile(r"ip=(127\.0\.[12]\.[12]|2001:db8:[12]::[12])\b"), "ip=<edge address>"),
]


def normalise(text: str, state: Path) -> str:
    text = text.replace(str(state / "home"), "~").replace(str(state), "$TUNNEL_LAB_STATE")
    for pattern, replacement in _NORMAL:
        text = pattern.sub(replacement, text)
    # Column widths follow the values; placeholders make them uneven.
    return "\n".join(line.rstrip() for line in text.splitlines()) + ("\n" if text else "")


def expected_outputs(page: str) -> dict[str, str]:
    return {b.name: b.text for b in blocks(page) if b.kind == "output"}


def write_outputs(page: str, outputs: dict[str, str]) -> str:
    """The page with each output block replaced by the run's."""
    for block in reversed([b for b in blocks(page) if b.kind == "output"]):
        page = page[:block.start] + outputs[block.name] + page[block.end:]
    return page


needs_netns = pytest.mark.skipif(not OK, reason=f"no private network namespaces here: {WHY}")


def test_every_output_block_follows_its_run_block() -> None:
    page = PAGE.read_text()
    found = blocks(page)
    runs = [b.name for b in found if b.kind == "run"]
    assert len(set(runs)) == len(runs), runs
    for block in found:
        if block.kind == "output":
            assert block.name in runs, f"output {block.name} has no run block"
    assert "cloudflared tunnel login" in script(page, ours=False)
    assert "tunnel-lab connector tunnel login" in script(page, ours=True)


@needs_netns
def test_the_page_runs_with_our_connector(tmp_path: Path) -> None:
    proc, outputs = run_page(tmp_path / "state", cloudflared=None)
    detail = proc.stdout[-4000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, detail
    assert set(outputs) == {b.name for b in blocks(PAGE.read_text()) if b.kind == "run"}, detail
    assert "You have successfully logged in" in outputs["login"], detail
    assert "Created tunnel app with id" in outputs["create"], detail
    assert "hello from localhost:8000" in outputs["curl"], detail
    assert '"host": "app.example.com"' in outputs["history"], detail
    # The page says where our connector's output differs from cloudflared's; everywhere else it is the same.
    differs = {"version", "login", "registration", "info"}
    for name, want in expected_outputs(PAGE.read_text()).items():
        if name not in differs:
            assert normalise(outputs[name], tmp_path / "state") == want, (name, outputs[name])


@needs_netns
@pytest.mark.skipif(not CLOUDFLARED, reason="needs a real cloudflared: set TUNNEL_LAB_CLOUDFLARED=PATH")
def test_the_page_shows_what_the_real_cloudflared_prints(tmp_path: Path) -> None:
    assert CLOUDFLARED is not None
    state = tmp_path / "state"
    proc, outputs = run_page(state, cloudflared=CLOUDFLARED)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    diffs = []
    for name, want in expected_outputs(PAGE.read_text()).items():
        got = normalise(outputs.get(name, ""), state)
        if got != want:
            diffs += difflib.unified_diff(want.splitlines(), got.splitlines(), f"page: {name}",
                                          f"run: {name}", lineterm="")
    assert not diffs, ("docs/getting-started.md differs from a real run; refresh with TUNNEL_LAB_CLOUDFLARED="
                       "PATH python -m tests.integration.test_getting_started --write\n" + "\n".join(diffs))


def main() -> int:
    """`--write`: refresh the page's output blocks from a run with the real cloudflared."""
    import tempfile

    if sys.argv[1:] != ["--write"] or not CLOUDFLARED:
        print("usage: TUNNEL_LAB_CLOUDFLARED=PATH python -m tests.integration.test_getting_started --write",
              file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "state"
        proc, outputs = run_page(state, cloudflared=CLOUDFLARED)
        if proc.returncode != 0:
            print(proc.stdout[-4000:] + proc.stderr[-2000:], file=sys.stderr)
            return 1
        page = PAGE.read_text()
        PAGE.write_text(write_outputs(page, {k: normalise(v, state) for k, v in outputs.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
