"""What a cloudflared release supports: version and help parsing, the release table, and the flags the lab
passes or skips for several releases (no processes: the probe itself is tested in tests/integration)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunnel_lab.lab.runner import cloudflared
from tunnel_lab.lab.runner.cloudflared import (
    BUILTIN,
    OPTIONAL_FLAGS,
    RELEASE_TABLE,
    REQUIRED_FLAGS,
    Capabilities,
    Release,
    flag_names,
    parse_help,
    parse_version,
)
from tunnel_lab.lab.runner.engine import skip_reason
from tunnel_lab.lab.runner.lab import RunOptions
from tunnel_lab.lab.runner.loader import parse_scenario, schema

# A trimmed `cloudflared tunnel run --help` of 2026.8.2 in urfave/cli's layout: aliases after ", ",
# placeholders (`--url URL`, `--socks5 --url`) that are not flags, and a wrapped description line.
RUN_HELP = """\
NAME:
  cloudflared tunnel run - Proxy a local web server by running the given tunnel

TUNNEL COMMAND OPTIONS:
   --config value           Specifies a config file in YAML format.
   --no-prechecks           Skip connectivity pre-checks at startup. (default: false) [$TUNNEL_NO_PRECHECKS]
   --metrics value          Listen address for metrics reporting. If no address is passed cloudflared will try
If all are unavailable, a random port will be used. (default: "localhost:0") [$TUNNEL_METRICS]
   --transport-loglevel value, --proto-loglevel value  Transport logging level {debug, info, warn} [$X]

SUBCOMMAND OPTIONS:
  --credentials-file value, --cred-file value  Filepath at which to read/write the tunnel credentials
  --post-quantum, --pq                         When given creates an experimental post-quantum secure tunnel
  --features value, -F value                   Opt into various features (accepts multiple inputs)
  --dns-resolver-addrs value                   Overrides the dynamic DNS resolver resolution
  --url URL                                    Connect to the local webserver at URL.
  --socks5 --url                               specify if this tunnel is running as a SOCK5 Server
  --help, -h                                   show help (default: false)
"""


def caps(release: str | None, shown: set[str] | None = None) -> Capabilities:
    return Capabilities(
        binary="/opt/cloudflared",
        release=Release.parse(release) if release else None,
        version_line=f"cloudflared version {release or 'DEV'}",
        help_flags=frozenset(shown or set()),
    )


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("cloudflared version 2026.8.2 (built release)\n", Release(2026, 8, 2)),
        ("cloudflared version 2024.1.5 (built 2024-01-23-1204 UTC)", Release(2024, 1, 5)),
        ("cloudflared-fips version 2025.4.0 (built 2025-04-01-0000 UTC FIPS)", Release(2025, 4, 0)),
        ("WRN some warning\ncloudflared version 2025.10.1 (built x)\n", Release(2025, 10, 1)),
        ("cloudflared version 2026.8.2-rc.1 (built x)", Release(2026, 8, 2)),
    ],
)
def test_version_lines_of_releases(output: str, expected: Release) -> None:
    parsed = parse_version(output)
    assert parsed is not None
    assert parsed[0] == expected
    assert parsed[1].startswith("cloudflared")


def test_a_development_build_has_no_release() -> None:
    assert parse_version("cloudflared version DEV (built unknown)") == (
        None,
        "cloudflared version DEV (built unknown)",
    )


@pytest.mark.parametrize(
    "output",
    [
        "",
        "--version\n",  # /bin/echo
        "true (GNU coreutils) 9.1",
        "tunnel-lab connector version 2026.8.2-lab (cloudflared 2026.8.2 compatible)",
        "cloudflared version banana (built x)",
        "garbage \x00\xff",
    ],
)
def test_anything_else_is_not_cloudflared(output: str) -> None:
    assert parse_version(output) is None


_RELEASES = st.tuples(st.integers(2018, 2100), st.integers(1, 12), st.integers(0, 99))


@given(_RELEASES, _RELEASES)
def test_release_numbers_round_trip_and_order_by_value(
    a: tuple[int, int, int], b: tuple[int, int, int]
) -> None:
    ra, rb = Release(*a), Release(*b)
    assert Release.parse(str(ra)) == ra
    assert (ra < rb) == (a < b)


def test_release_order_is_numeric_not_textual() -> None:
    assert Release.parse("2025.10.0") > Release.parse("2025.9.1")
    with pytest.raises(ValueError, match="not a cloudflared release"):
        Release.parse("2025.x")


def test_help_names_every_flag_and_alias_but_no_placeholder() -> None:
    names = parse_help(RUN_HELP)
    assert names == {
        "--config",
        "--no-prechecks",
        "--metrics",
        "--transport-loglevel",
        "--proto-loglevel",
        "--credentials-file",
        "--cred-file",
        "--post-quantum",
        "--pq",
        "--features",
        "-F",
        "--dns-resolver-addrs",
        "--url",
        "--socks5",
        "--help",
        "-h",
    }


def test_scenario_flag_names_skip_values_and_keep_protocol_values() -> None:
    args = ["--origin-ca-pool", "${edge.ca}", "--max-active-flows=10", "--protocol", "quic", "-1", "--pq"]
    assert flag_names(args) == ["--origin-ca-pool", "--max-active-flows", "--protocol=quic", "--pq"]
    assert flag_names(["--protocol=auto"]) == ["--protocol=auto"]


@pytest.mark.parametrize(
    ("release", "passed"),
    [
        ("2024.1.0", []),
        ("2025.1.1", []),
        ("2025.6.1", []),
        ("2025.7.0", ["--dns-resolver-addrs"]),
        ("2026.3.0", ["--dns-resolver-addrs"]),
        ("2026.5.0", ["--no-prechecks", "--dns-resolver-addrs"]),
        ("2026.8.2", ["--no-prechecks", "--dns-resolver-addrs"]),
    ],
)
def test_optional_flags_by_release(release: str, passed: list[str]) -> None:
    """The hidden-from-help release judgement: with an empty help, the table alone decides."""
    binary = caps(release)
    assert [f for f in OPTIONAL_FLAGS if binary.optional(f)] == passed
    assert all(binary.supports(f) for f in REQUIRED_FLAGS)


def test_a_flag_shown_in_help_counts_whatever_the_release_says() -> None:
    binary = caps("2025.1.0", {"--no-prechecks"})
    assert binary.optional("--no-prechecks") == ["--no-prechecks"]
    assert binary.optional("--dns-resolver-addrs", "127.0.0.1:53") == []


def test_gaps_name_the_flag_and_the_release_it_arrived_in() -> None:
    binary = caps("2025.1.0")
    assert binary.gaps([], ["--max-active-flows", "10"]) == [
        "--max-active-flows, which arrived in cloudflared 2025.2.0 (this binary is 2025.1.0)"
    ]
    assert binary.gaps(["post-quantum-http2", "access-tcp"], ["--origin-ca-pool", "x"]) == [
        "post-quantum-http2, which arrived in cloudflared 2026.5.0 (this binary is 2025.1.0)"
    ]
    assert binary.gaps([], ["--no-such-flag"]) == [
        "--no-such-flag, which is neither in this binary's help nor in tunnel-lab's release table"
    ]
    assert caps("2026.8.2").gaps(["post-quantum-http2"], ["--max-active-flows", "1"]) == []


def test_a_development_build_counts_as_the_newest_release() -> None:
    dev = caps(None)
    assert dev.optional("--no-prechecks") == ["--no-prechecks"]
    assert dev.gaps(["post-quantum-http2"], []) == []
    assert "a development build" in dev.summary()


def test_summary_says_what_is_left_out() -> None:
    assert caps("2026.8.2").summary() == (
        "/opt/cloudflared: cloudflared 2026.8.2; has every flag and feature in the release table"
    )
    text = caps("2025.1.0").summary()
    assert "left out: --no-prechecks, --dns-resolver-addrs" in text
    assert "need --max-active-flows, --token-file, post-quantum-http2 are skipped" in text


def test_our_connector_has_everything() -> None:
    assert BUILTIN.optional("--no-prechecks") == ["--no-prechecks"]
    assert BUILTIN.gaps(["post-quantum-http2"], ["--anything"]) == []


def test_release_table_rows_are_well_formed() -> None:
    for name, gate in RELEASE_TABLE.items():
        assert gate.since >= cloudflared.OLDEST_SUPPORTED, name
        assert gate.source, name
        if not name.startswith("-"):  # a feature needs to say what it is
            assert gate.what, name
    for flag in (*REQUIRED_FLAGS, *OPTIONAL_FLAGS):
        assert flag in RELEASE_TABLE, flag


def test_every_release_gated_feature_can_be_required_by_a_scenario() -> None:
    assert cloudflared.FEATURES == ("post-quantum-http2",)
    assert set(cloudflared.FEATURES) <= set(schema()["$defs"]["feature"]["enum"])


@pytest.mark.parametrize(
    ("connector", "release", "reason"),
    [
        ("builtin", None, "the builtin connector does not support: post-quantum-http2"),
        (
            "cloudflared",
            "2025.1.0",
            "needs post-quantum-http2, which arrived in cloudflared 2026.5.0 (this binary is 2025.1.0); "
            "--max-active-flows, which arrived in cloudflared 2025.2.0 (this binary is 2025.1.0)",
        ),
        (
            "cloudflared",
            "2025.4.0",
            "needs post-quantum-http2, which arrived in cloudflared 2026.5.0 (this binary is 2025.4.0)",
        ),
        ("cloudflared", "2026.5.0", None),
    ],
)
def test_scenarios_are_skipped_for_what_the_binary_lacks(
    connector: str, release: str | None, reason: str | None
) -> None:
    text = (Path(__file__).resolve().parents[2] / "scenarios" / "http-get-echo.yaml").read_text()
    text = text.replace("timeout:", "requires: [post-quantum-http2]\ntimeout:", 1)
    flows = "    tunnel: main\n    run_flags: [--max-active-flows, '9']\n"
    text = text.replace("    tunnel: main\n", flows, 1)
    options = RunOptions(connector=connector, capabilities=caps(release) if release else BUILTIN)
    assert skip_reason(parse_scenario(text, "x.yaml"), options) == reason
