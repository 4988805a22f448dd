"""What a given cloudflared binary supports: its release, its flags, and the lab features gated by release.

Users bring whatever release they deploy (2024.1 on), and flags come and go between releases (a 2025
release refuses `--no-prechecks` with `Incorrect Usage`). `probe(PATH)` asks the binary itself:

- `cloudflared --version` names the release (`cloudflared version 2026.8.2 (built ...)`);
- `cloudflared tunnel --help` and `cloudflared tunnel run --help` list the flags it shows;
- flags cloudflared hides from its help (`--edge`, `--cacert`, `--ha-connections`, ...) and behaviour that no
  flag reveals come from `RELEASE_TABLE`, read off the public source history (every release is a git tag);
- last, the lab's minimal command line followed by `--help`: cloudflared parses every flag before it prints
  the help, so a flag it lacks shows up as `Incorrect Usage` without anything starting.

Running the binary, even `--version`, happens only inside the runner's private network namespace (a real
cloudflared contacts public DNS at start-up): callers probe after `netns.enter_inside()`. Any way in which
the binary is unusable is a `BinaryError` (a `ConfigError`, exit 2) naming the binary and what was wrong.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from tunnel_lab.wire.errors import ConfigError

PROBE_TIMEOUT = 10.0  # seconds for each of the probe's commands; a cloudflared answers in well under one


class BinaryError(ConfigError):
    """The `--cloudflared` binary is missing, not executable, not cloudflared, or too old for the lab."""

    def __init__(self, binary: str, message: str) -> None:
        super().__init__(message, source=f"--cloudflared {binary}")


@dataclass(frozen=True, order=True)
class Release:
    """A cloudflared release number, `YEAR.MONTH.PATCH` (its git tag)."""

    year: int
    month: int
    patch: int

    def __str__(self) -> str:
        return f"{self.year}.{self.month}.{self.patch}"

    @classmethod
    def parse(cls, text: str) -> Release:
        m = re.fullmatch(r"(\d{4})\.(\d{1,2})\.(\d+)", text.strip())
        if not m:
            raise ValueError(f"not a cloudflared release number: {text!r}")
        return cls(int(m.group(1)), int(m.group(2)), int(m.group(3)))


OLDEST_SUPPORTED = Release(2024, 1, 0)


@dataclass(frozen=True)
class Gate:
    """When a flag or a feature arrived: the first release tag whose source has it, and where it shows."""

    since: Release
    source: str  # the file (at tag `since`) that shows the arrival
    what: str = ""


# Which flag or feature arrived in which release, checked with `git show TAG:FILE` against the public
# source (github.com/cloudflare/cloudflared, tags 2024.1.0 .. 2026.8.2). Keys are flags (`--name`), protocol
# values (`--protocol=value`) or features a scenario can name in `requires:`. A gate at OLDEST_SUPPORTED
# means "already in 2024.1.0", the oldest release the lab accepts (when it first appeared does not matter).
# Flags that cloudflared shows in its help need no row, but the ones the lab passes have one anyway, so a
# binary whose help was trimmed (or a development build) is still judged by its release.
RELEASE_TABLE: dict[str, Gate] = {
    # -- tunnel-level flags the lab always passes --------------------------------------------------------
    "--config": Gate(OLDEST_SUPPORTED, "cmd/cloudflared/tunnel/cmd.go (configureCloudflaredFlags)"),
    "--no-autoupdate": Gate(OLDEST_SUPPORTED, "cmd/cloudflared/tunnel/cmd.go (configureCloudflaredFlags)"),
    "--edge": Gate(OLDEST_SUPPORTED, "cmd/cloudflared/tunnel/cmd.go (tunnelFlags; hidden from help)"),
    "--cacert": Gate(
        OLDEST_SUPPORTED, "cmd/cloudflared/tunnel/cmd.go (tunnelFlags, tlsconfig.CaCertFlag; hidden)"
    ),
    "--ha-connections": Gate(OLDEST_SUPPORTED, "cmd/cloudflared/tunnel/cmd.go (haConnectionsFlag; hidden)"),
    "--metrics": Gate(OLDEST_SUPPORTED, "cmd/cloudflared/tunnel/cmd.go (configureCloudflaredFlags)"),
    "--grace-period": Gate(OLDEST_SUPPORTED, "cmd/cloudflared/tunnel/cmd.go (tunnelFlags)"),
    "--retries": Gate(OLDEST_SUPPORTED, "cmd/cloudflared/tunnel/cmd.go (tunnelFlags)"),
    "--loglevel": Gate(OLDEST_SUPPORTED, "cmd/cloudflared/cliutil/logger.go (logger.LogLevelFlag)"),
    "--no-prechecks": Gate(
        Release(2026, 5, 0),
        "cmd/cloudflared/flags/flags.go (NoPrechecks), cmd/cloudflared/tunnel/cmd.go "
        "(configureCloudflaredFlags); the start-up connectivity pre-checks it skips arrived with it",
        "skip the connectivity pre-checks at start-up",
    ),
    # -- run-level flags the lab always passes -----------------------------------------------------------
    "--protocol": Gate(OLDEST_SUPPORTED, "cmd/cloudflared/tunnel/subcommands.go (selectProtocolFlag)"),
    "--credentials-file": Gate(OLDEST_SUPPORTED, "cmd/cloudflared/tunnel/subcommands.go (CredFileFlag)"),
    "--token": Gate(OLDEST_SUPPORTED, "cmd/cloudflared/tunnel/subcommands.go (TunnelTokenFlag)"),
    "--url": Gate(OLDEST_SUPPORTED, "cmd/cloudflared/tunnel/cmd.go (configureProxyFlags)"),
    "--max-edge-addr-retries": Gate(
        OLDEST_SUPPORTED, "cmd/cloudflared/tunnel/cmd.go (hidden: not in --help; supervisor IpAddrFallback)"),
    "--dns-resolver-addrs": Gate(
        Release(2025, 7, 0),
        "cmd/cloudflared/flags/flags.go (VirtualDNSServiceResolverAddresses), "
        "cmd/cloudflared/tunnel/subcommands.go (buildRunCommand)",
        "fixed resolvers for the private-network DNS service",
    ),
    # -- values of --protocol ------------------------------------------------------------------------------
    "--protocol=http2": Gate(OLDEST_SUPPORTED, "connection/protocol.go (NewProtocolSelector)"),
    "--protocol=quic": Gate(OLDEST_SUPPORTED, "connection/protocol.go (NewProtocolSelector)"),
    "--protocol=auto": Gate(OLDEST_SUPPORTED, "connection/protocol.go (AutoSelectFlag)"),
    # h2mux is still accepted by every supported release, with a warning, as http2.
    "--protocol=h2mux": Gate(OLDEST_SUPPORTED, 'connection/protocol.go (case "h2mux": upgraded to http2)'),
    # -- other flags a scenario may pass -------------------------------------------------------------------
    "--post-quantum": Gate(
        OLDEST_SUPPORTED,
        "cmd/cloudflared/tunnel/subcommands.go (postQuantumFlag); with http2 every release to 2026.8.2 "
        "refuses it (cmd/cloudflared/tunnel/configuration.go: only supported with the quic transport)",
    ),
    "--edge-ip-version": Gate(OLDEST_SUPPORTED, "cmd/cloudflared/tunnel/cmd.go (tunnelFlags)"),
    "--edge-bind-address": Gate(OLDEST_SUPPORTED, "cmd/cloudflared/tunnel/cmd.go (tunnelFlags)"),
    "--management-diagnostics": Gate(OLDEST_SUPPORTED, "cmd/cloudflared/tunnel/cmd.go (tunnelFlags)"),
    "--label": Gate(OLDEST_SUPPORTED, "cmd/cloudflared/tunnel/cmd.go (connectorLabelFlag)"),
    # The origin flags of configureProxyFlags (cmd/cloudflared/tunnel/cmd.go), names in ingress/config.go,
    # ingress/origin_service.go and tlsconfig/certreloader.go.
    "--http-host-header": Gate(OLDEST_SUPPORTED, "ingress/config.go (HTTPHostHeaderFlag), tunnel/cmd.go"),
    "--origin-ca-pool": Gate(OLDEST_SUPPORTED, "tlsconfig/certreloader.go (OriginCAPoolFlag), tunnel/cmd.go"),
    "--origin-server-name": Gate(OLDEST_SUPPORTED, "ingress/config.go (OriginServerNameFlag), tunnel/cmd.go"),
    "--no-tls-verify": Gate(OLDEST_SUPPORTED, "ingress/config.go (NoTLSVerifyFlag), tunnel/cmd.go"),
    "--no-chunked-encoding": Gate(
        OLDEST_SUPPORTED, "ingress/config.go (NoChunkedEncodingFlag), tunnel/cmd.go"
    ),
    "--http2-origin": Gate(OLDEST_SUPPORTED, "ingress/config.go (Http2OriginFlag), tunnel/cmd.go"),
    "--hello-world": Gate(OLDEST_SUPPORTED, "ingress/origin_service.go (HelloWorldFlag), tunnel/cmd.go"),
    "--unix-socket": Gate(OLDEST_SUPPORTED, "cmd/cloudflared/tunnel/cmd.go (configureProxyFlags)"),
    "--max-active-flows": Gate(
        Release(2025, 2, 0),
        "cmd/cloudflared/tunnel/subcommands.go (maxActiveFlowsFlag in buildRunCommand)",
        "cap on concurrent private-network flows",
    ),
    "--token-file": Gate(
        Release(2025, 4, 0),
        "cmd/cloudflared/tunnel/subcommands.go (TunnelTokenFileFlag)",
        "read the tunnel token from a file",
    ),
    # -- features (names for `requires:`) --------------------------------------------------------------------
    "post-quantum-http2": Gate(
        Release(2026, 5, 0),
        "supervisor/tunnel.go (the HTTP2 case dials with crypto.TLSConfigWithCurvePreferences), "
        "crypto/curves.go",
        "http2 edge connections offer the X25519MLKEM768 key agreement",
    ),
}

# Flags without which the lab cannot run a connector at all; a binary lacking one is refused (exit 2).
REQUIRED_FLAGS = (
    "--config",
    "--no-autoupdate",
    "--edge",
    "--ha-connections",
    "--cacert",
    "--metrics",
    "--grace-period",
    "--retries",
    "--loglevel",
    "--protocol",
    "--credentials-file",
)
# Flags the lab passes when the binary has them and leaves out otherwise.
OPTIONAL_FLAGS = ("--no-prechecks", "--dns-resolver-addrs")
# Release-gated features a scenario can name in `requires:` (schema.json lists them too).
FEATURES = tuple(k for k in RELEASE_TABLE if not k.startswith("-"))


# --- parsing what the binary prints (pure) ----------------------------------------------------------

_VERSION_LINE = re.compile(r"^cloudflared(?:-fips)? version (\S+)(?: \(built [^)]*\))?", re.MULTILINE)


def parse_version(output: str) -> tuple[Release | None, str] | None:
    """`cloudflared --version` output -> (release or None for a development build, the line); None when
    the output is not cloudflared's."""
    m = _VERSION_LINE.search(output)
    if not m:
        return None
    line = m.group(0).strip()
    number = re.match(r"(\d{4}\.\d{1,2}\.\d+)", m.group(1))
    if number:
        return Release.parse(number.group(1)), line
    if m.group(1).upper() == "DEV":
        return None, line
    return None


_OPTION_LINE = re.compile(r"^\s*(-{1,2}[A-Za-z0-9][\w-]*.*)$")


def parse_help(output: str) -> frozenset[str]:
    """Every flag name (`--name`, with its aliases) in a urfave/cli help text such as cloudflared's."""
    names: set[str] = set()
    for raw in output.splitlines():
        m = _OPTION_LINE.match(raw)
        if not m:
            continue
        # The option column ends at the first run of two spaces; aliases are separated by ", ", and each
        # alias may carry a placeholder (`--url URL`, `--socks5 --url`) that is not a flag of its own.
        column = re.split(r"\s{2,}", m.group(1).strip(), maxsplit=1)[0]
        for alias in column.split(", "):
            word = alias.split(" ", 1)[0]
            if re.fullmatch(r"-{1,2}[A-Za-z0-9][\w-]*", word):
                names.add(word)
    return frozenset(names)


def flag_names(args: Sequence[str]) -> list[str]:
    """The flags named in a scenario's `flags:`/`run_flags:` (values skipped), `--protocol` with its value."""
    out: list[str] = []
    for i, arg in enumerate(args):
        if not arg.startswith("-") or re.fullmatch(r"-[0-9.]+", arg):
            continue
        name, _, value = arg.partition("=")
        if name == "--protocol":
            value = value or (args[i + 1] if i + 1 < len(args) else "")
            out.append(f"--protocol={value}" if value else name)
        else:
            out.append(name)
    return out


# --- what a binary supports ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Capabilities:
    """What one connector binary supports. `everything` for our own connector, which has every flag."""

    binary: str
    release: Release | None = None  # None: our connector, or a development build (`version DEV`)
    version_line: str = ""
    help_flags: frozenset[str] = field(default_factory=frozenset)
    everything: bool = False

    def supports(self, name: str) -> bool:
        """Does the binary have this flag (`--x`, `--protocol=v`) or feature?"""
        if self.everything:
            return True
        if name in self.help_flags:  # a flag the binary shows (protocol values never are)
            return True
        gate = RELEASE_TABLE.get(name)
        if gate is None:
            return False
        # A development build reports no release: it is built from recent source, so it counts as newest.
        return self.release is None or self.release >= gate.since

    def gap(self, name: str) -> str | None:
        """Why the binary lacks `name` (naming the release it arrived in), or None when it has it."""
        if self.supports(name):
            return None
        gate = RELEASE_TABLE.get(name)
        shown = name.replace("=", " ")
        if gate is None:
            return f"{shown}, which is neither in this binary's help nor in tunnel-lab's release table"
        return f"{shown}, which arrived in cloudflared {gate.since} (this binary is {self.release})"

    def optional(self, flag: str, *values: str) -> list[str]:
        """`[flag, *values]` when the binary has `flag`, else `[]`: for flags the lab can do without."""
        return [flag, *values] if self.supports(flag) else []

    def gaps(self, requires: Iterable[str], flags: Iterable[str]) -> list[str]:
        """What of a scenario's table features and flags the binary lacks, each with its reason."""
        wanted = [r for r in requires if r in RELEASE_TABLE] + flag_names(list(flags))
        return [reason for name in dict.fromkeys(wanted) if (reason := self.gap(name)) is not None]

    def summary(self) -> str:
        """One line: the release and what the lab leaves out or cannot run with it."""
        if self.everything:
            return f"{self.binary}: every flag and feature"
        release = str(self.release) if self.release else "a development build"
        dropped = [f for f in OPTIONAL_FLAGS if not self.supports(f)]
        lacking = [k.replace("=", " ") for k in RELEASE_TABLE if k not in dropped and not self.supports(k)]
        text = f"{self.binary}: cloudflared {release}"
        if not dropped and not lacking:
            return text + "; has every flag and feature in the release table"
        if dropped:
            text += f"; left out: {', '.join(dropped)}"
        if lacking:
            text += f"; scenarios that need {', '.join(lacking)} are skipped"
        return text


BUILTIN = Capabilities(binary="tunnel-lab connector", everything=True)


def check_path(path: str) -> str:
    """The absolute path of an executable file, or a `BinaryError` saying what is wrong with `path`.

    Only looks at the file system (no process starts), so it can run before the namespace exists."""
    found = path if os.sep in path else (shutil.which(path) or path)
    if not os.path.exists(found):
        raise BinaryError(path, "no such file")
    if os.path.isdir(found):
        raise BinaryError(path, "is a directory, not a cloudflared binary")
    if not os.access(found, os.X_OK):
        raise BinaryError(path, "is not executable (chmod +x?)")
    return os.path.abspath(found)


def _run(argv: Sequence[str], what: str, binary: str, timeout: float) -> tuple[int, str]:
    """Run one probe command in its own session; (exit code, stdout+stderr). Never leaves a process."""
    try:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": tempfile.gettempdir()},
        )
    except OSError as exc:  # ENOEXEC (not a program), EACCES, a missing interpreter, ...
        raise BinaryError(binary, f"cannot be started ({exc.strerror or exc})") from exc
    timed_out = False
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        out, timed_out = b"", True
    finally:
        # The whole session: a wrapper script's children go too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        if proc.stdout is not None:
            proc.stdout.close()
    if timed_out:
        raise BinaryError(binary, f"did not answer `{what}` within {timeout:g}s (is it cloudflared?)")
    return proc.returncode if proc.returncode is not None else -1, out.decode("utf-8", "replace")


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return "nothing"
    first = lines[0]
    return repr(first if len(first) <= 80 else first[:77] + "...")


def minimal_argv(binary: str, caps: Capabilities, scratch: str) -> list[str]:
    """The lab's connector command line with placeholder values and `--help` before the tunnel id: it makes
    cloudflared parse every flag the lab always passes, and print its help instead of starting."""
    return [
        binary,
        "tunnel",
        "--config",
        os.path.join(scratch, "config.yml"),
        "--no-autoupdate",
        *caps.optional("--no-prechecks"),
        "--edge",
        "127.0.0.1:1",
        "--edge",
        "127.0.0.2:1",
        "--ha-connections",
        "1",
        "--cacert",
        os.path.join(scratch, "ca.pem"),
        "--metrics",
        "127.0.0.1:0",
        "--grace-period",
        "1s",
        "--retries",
        "1",
        "--loglevel",
        "info",
        "run",
        "--protocol",
        "http2",
        "--credentials-file",
        os.path.join(scratch, "credentials.json"),
        *caps.optional("--dns-resolver-addrs", "127.0.0.1:53"),
        "--help",
    ]


def probe(path: str, *, timeout: float = PROBE_TIMEOUT) -> Capabilities:
    """Find out what the cloudflared at `path` supports; raise `BinaryError` when the lab cannot use it.

    Runs the binary: call it only inside the private network namespace. The answer is kept for the rest of
    the process (a run, a bench) while the file is unchanged; refusals are not kept."""
    binary = check_path(path)
    st = os.stat(binary)
    return _probe_once(path, binary, (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns), timeout)


@functools.cache
def _probe_once(path: str, binary: str, _identity: tuple[int, ...], timeout: float) -> Capabilities:
    _code, out = _run([binary, "--version"], "--version", path, timeout)
    parsed = parse_version(out)
    if parsed is None:
        raise BinaryError(
            path,
            f"is not cloudflared: `--version` printed {_first_line(out)}, expected "
            "`cloudflared version YEAR.MONTH.PATCH ...`",
        )
    release, line = parsed
    who = f"cloudflared {release}" if release else "cloudflared (a development build)"
    if release is not None and release < OLDEST_SUPPORTED:
        raise BinaryError(path, f"{who} is too old: tunnel-lab needs {OLDEST_SUPPORTED} or later")
    flags: set[str] = set()
    for args in (["tunnel", "--help"], ["tunnel", "run", "--help"]):
        code, out = _run([binary, *args], " ".join(args), path, timeout)
        found = parse_help(out)
        if code != 0 or "--help" not in found:
            raise BinaryError(
                path,
                f"says it is {who}, but `{' '.join(args)}` exited with code {code} and printed "
                f"{_first_line(out)}, not cloudflared's help",
            )
        flags |= found
    caps = Capabilities(binary=path, release=release, version_line=line, help_flags=frozenset(flags))
    missing = [f for f in REQUIRED_FLAGS if not caps.supports(f)]
    if missing:
        raise BinaryError(path, f"{who} lacks flags the lab needs: {', '.join(missing)}")
    with tempfile.TemporaryDirectory(prefix="tunnel-lab-probe-") as scratch:
        _code, out = _run(minimal_argv(binary, caps, scratch), "tunnel ... run --help", path, timeout)
    refused = re.search(r"Incorrect Usage[.:]?[ \t]*(.*)", out)
    if refused:
        why = refused.group(1).strip() or "Incorrect Usage"
        raise BinaryError(path, f"{who} refuses the lab's minimal command line: {why}")
    return caps
