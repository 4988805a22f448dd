"""Bringing a cloudflared binary: the probe against stand-ins of several releases, and every kind of bad
`--cloudflared` (missing, not executable, not cloudflared, too old, refusing the lab's flags) for both
`tunnel-lab run` and `tunnel-lab bench`: one line naming the binary and what was wrong, exit 2, nothing left
running."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.standin import logged_argvs, write_standin
from tunnel_lab.lab.runner import cloudflared, netns
from tunnel_lab.lab.runner.cloudflared import BinaryError

ROOT = Path(__file__).resolve().parents[2]
NETNS_OK, NETNS_WHY = netns.available()
needs_netns = pytest.mark.skipif(not NETNS_OK, reason=f"no private network namespace here: {NETNS_WHY}")


def _script(body: str) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        path = tmp / "cloudflared"
        path.write_text(body)
        path.chmod(0o755)
        return path

    return make


def _standin(release: str) -> Callable[[Path], Path]:
    return lambda tmp: write_standin(tmp / "cloudflared", release)


def _not_executable(tmp: Path) -> Path:
    path = write_standin(tmp / "cloudflared", "2026.8.2")
    path.chmod(0o644)
    return path


def _refuses_edge(tmp: Path) -> Path:
    """A cloudflared-like binary whose hidden flags lack --edge: it exits on the lab's minimal flags."""
    path = write_standin(tmp / "cloudflared", "2024.6.0")
    path.write_text(path.read_text().replace('"--edge", ', ""))
    return path


# (case id, how to make the binary, what the one line must say after "--cloudflared PATH: ")
BAD = [
    ("missing", lambda tmp: tmp / "nope", "no such file"),
    ("directory", lambda tmp: tmp, "is a directory, not a cloudflared binary"),
    ("not-executable", _not_executable, "is not executable (chmod +x?)"),
    ("true", lambda _tmp: Path("/bin/true"), "is not cloudflared: `--version` printed 'true (GNU"),
    ("echo", lambda _tmp: Path("/bin/echo"), "is not cloudflared: `--version` printed"),
    ("garbage", _script("#!/bin/sh\necho 'zz top \x7f'\nsleep 0.1 &\n"), "is not cloudflared"),
    ("not-a-program", _script("\x7fELF garbage"), "cannot be started (Exec format error)"),
    ("too-old", _standin("2023.10.0"), "cloudflared 2023.10.0 is too old: tunnel-lab needs 2024.1.0"),
    ("no-tunnel-help", _script("#!/bin/sh\necho 'cloudflared version 2025.1.0 (built x)'\n"),
     "says it is cloudflared 2025.1.0, but `tunnel --help` exited with code 0"),
    ("refuses-flags", _refuses_edge,
     "cloudflared 2024.6.0 refuses the lab's minimal command line: flag provided but not defined: -edge"),
]


def _leftovers(marker: str) -> list[str]:
    """Command lines of live processes that mention `marker` (our temp dir), except this test's own."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            found.append(f"{pid}: {cmdline}")
    return found


@pytest.mark.parametrize(("make", "says"), [pytest.param(m, s, id=i) for i, m, s in BAD])
def test_probe_refuses_a_bad_binary(tmp_path: Path, make: Callable[[Path], Path], says: str) -> None:
    binary = make(tmp_path)
    with pytest.raises(BinaryError) as caught:
        cloudflared.probe(str(binary))
    assert str(caught.value).startswith(f"--cloudflared {binary}: {says}"), str(caught.value)
    assert "\n" not in str(caught.value)
    assert _leftovers(str(tmp_path)) == []


def test_probe_gives_up_on_a_binary_that_never_answers(tmp_path: Path) -> None:
    binary = _script("#!/bin/sh\nsleep 60 &\nsleep 60\n")(tmp_path)
    with pytest.raises(BinaryError, match=r"did not answer `--version` within 0.5s \(is it cloudflared\?\)"):
        cloudflared.probe(str(binary), timeout=0.5)
    assert _leftovers(str(tmp_path)) == []


@pytest.mark.parametrize(
    ("release", "prechecks", "resolvers"),
    [("2024.1.0", False, False), ("2025.1.0", False, False), ("2025.7.0", False, True),
     ("2026.5.0", True, True), ("2026.8.2", True, True)],
)
def test_probe_classifies_releases(tmp_path: Path, release: str, prechecks: bool, resolvers: bool) -> None:
    caps = cloudflared.probe(str(write_standin(tmp_path / "cloudflared", release)))
    assert str(caps.release) == release
    assert caps.supports("--no-prechecks") is prechecks
    assert caps.supports("--dns-resolver-addrs") is resolvers
    assert caps.supports("--edge") and caps.supports("--cacert")  # hidden: from the release table
    assert caps.version_line == f"cloudflared version {release} (built 2025-01-01-0000 UTC)"


def test_the_probe_runs_once_per_binary_until_the_file_changes(tmp_path: Path) -> None:
    real = write_standin(tmp_path / "standin", "2025.7.0")
    calls = tmp_path / "calls"
    wrapper = _script(f'#!/bin/sh\necho "$1" >> {calls}\nexec {real} "$@"\n')(tmp_path)
    first = cloudflared.probe(str(wrapper))
    assert cloudflared.probe(str(wrapper)) is first
    assert calls.read_text().split() == ["--version", "tunnel", "tunnel", "tunnel"]
    wrapper.write_text(wrapper.read_text() + "# changed\n")
    os.utime(wrapper, ns=(0, 0))
    assert cloudflared.probe(str(wrapper)) == first
    assert len(calls.read_text().split()) == 8


def _run_lab(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tunnel_lab", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "COLUMNS": "200"},
        check=False,
    )


@needs_netns
@pytest.mark.parametrize("command", ["run", "bench"])
@pytest.mark.parametrize(("make", "says"), [pytest.param(m, s, id=i) for i, m, s in BAD])
def test_a_bad_binary_is_one_line_and_exit_2(
    tmp_path: Path, command: str, make: Callable[[Path], Path], says: str
) -> None:
    binary = make(tmp_path)
    args = ["--connector", "cloudflared", str(ROOT / "scenarios" / "http-get-echo.yaml")]
    if command == "bench":
        args = ["--tiny", "--workdir", str(tmp_path / "work")]
    proc = _run_lab(command, *args, "--cloudflared", str(binary), cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    [line] = proc.stderr.splitlines()
    assert line.startswith(f"tunnel-lab: --cloudflared {binary}: {says}"), line
    assert proc.stdout == ""
    assert _leftovers(str(tmp_path)) == []


@needs_netns
@pytest.mark.slow
def test_a_2025_release_runs_without_the_flags_it_lacks(tmp_path: Path) -> None:
    """A stand-in 2025.1.0 (which, like the real one, refuses --no-prechecks) runs a scenario through our
    connector; its command line lacks --no-prechecks and --dns-resolver-addrs, and a scenario passing a
    flag from 2025.2.0 is skipped saying so."""
    argv_log = tmp_path / "argv.jsonl"
    fake = write_standin(tmp_path / "cloudflared", "2025.1.0", argv_log=argv_log, run_connector=True)
    flows = tmp_path / "needs-flows.yaml"
    flows.write_text(
        (ROOT / "scenarios" / "http-get-echo.yaml")
        .read_text()
        .replace("name: http-get-echo", "name: needs-flows")
        .replace("    tunnel: main\n", "    tunnel: main\n    run_flags: [--max-active-flows, '10']\n", 1)
    )
    proc = _run_lab(
        "run", "--connector", "cloudflared", "--cloudflared", str(fake),
        str(ROOT / "scenarios" / "http-get-echo.yaml"), str(flows),
        "--results", str(tmp_path / "results"), "--json", str(tmp_path / "report.json"),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{fake}: cloudflared 2025.1.0; left out: --no-prechecks, --dns-resolver-addrs" in proc.stderr
    scenarios = {s["name"]: s for s in json.loads((tmp_path / "report.json").read_text())["scenarios"]}
    assert scenarios["http-get-echo"]["status"] == "passed"
    assert scenarios["needs-flows"]["status"] == "skipped"
    assert scenarios["needs-flows"]["message"] == (
        "needs --max-active-flows, which arrived in cloudflared 2025.2.0 (this binary is 2025.1.0)"
    )
    [argv] = logged_argvs(argv_log)
    assert argv[:4] == ["tunnel", "--config", argv[2], "--no-autoupdate"]
    assert "--no-prechecks" not in argv and "--dns-resolver-addrs" not in argv
    assert argv[argv.index("run") : argv.index("run") + 3] == ["run", "--protocol", "http2"]


REAL = os.environ.get("TUNNEL_LAB_CLOUDFLARED")
needs_real = pytest.mark.skipif(
    not REAL, reason="set TUNNEL_LAB_CLOUDFLARED=PATH to a real cloudflared binary"
)


@pytest.mark.cloudflared
@needs_real
@needs_netns
def test_the_real_binary_is_probed_and_runs_a_marked_scenario(tmp_path: Path) -> None:
    assert REAL is not None
    proc = _run_lab(
        "run", "--connector", "cloudflared", "--cloudflared", REAL,
        str(ROOT / "tests" / "scenarios" / "known-deviation-other-connector.yaml"),
        "--results", str(tmp_path / "results"), "--json", str(tmp_path / "report.json"),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [probed] = [line for line in proc.stderr.splitlines() if "cloudflared 20" in line]
    assert probed.endswith("; has every flag and feature in the release table"), probed
    [result] = json.loads((tmp_path / "report.json").read_text())["scenarios"]
    assert result["status"] == "deviation"


@pytest.mark.cloudflared
@needs_real
@needs_netns
def test_the_real_binary_refusing_a_flag_is_caught_before_any_scenario(tmp_path: Path) -> None:
    """The probe's dry run reads cloudflared's own `Incorrect Usage` text (a wrapper adds a flag no release
    has to every `tunnel` command line)."""
    wrapper = _script(
        "#!/bin/sh\n"
        'if [ "$1" = tunnel ] && [ "$2" != --help ] && [ "$2" != run ]; then\n'
        f'  shift; exec {REAL} tunnel --no-such-flag "$@"\nfi\n'
        f'exec {REAL} "$@"\n'
    )(tmp_path)
    proc = _run_lab("run", "--connector", "cloudflared", "--cloudflared", str(wrapper),
                    str(ROOT / "scenarios" / "http-get-echo.yaml"), cwd=tmp_path)
    assert proc.returncode == 2
    [line] = proc.stderr.splitlines()
    assert line.endswith(
        "refuses the lab's minimal command line: flag provided but not defined: -no-such-flag"
    )
    assert _leftovers(str(tmp_path)) == []
