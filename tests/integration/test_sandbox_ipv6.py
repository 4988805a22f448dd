"""IPv6 in `tunnel-lab sandbox`: discovery answers AAAA, the edge listens on each region's IPv6 addresses,
and a connector registers over IPv6 and serves a request (the real cloudflared when TUNNEL_LAB_CLOUDFLARED
names it, and ours), with `--edge-ip-version 6`, and with `auto`, which prefers IPv6 as on a dual-stack
host (docs/sandbox.md, "IPv6")."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from tests.integration.test_sandbox import needs_netns, sandbox
from tunnel_lab.lab.runner.engine import ipv6_loopback_missing

CLOUDFLARED = os.environ.get("TUNNEL_LAB_CLOUDFLARED")
NO_IPV6 = ipv6_loopback_missing()
needs_ipv6 = pytest.mark.skipif(NO_IPV6 is not None, reason=f"no IPv6 on this machine: {NO_IPV6}")

# Runs inside the sandbox with $CF the connector command; polls the eyeball with a deadline (the
# connector registers on its own schedule).
RUN = r'''
set -eu
tunnel-lab login >/dev/null
$CF tunnel create app >/dev/null 2>&1
$CF tunnel route dns app app.example.com >/dev/null 2>&1
python3 -m http.server 8000 --bind 127.0.0.1 >/dev/null 2>&1 &
$CF tunnel --edge-ip-version "$VERSION" --ha-connections 2 --protocol "$PROTOCOL" run \
    --url http://localhost:8000 app >"$HOME/run.log" 2>&1 &
RUN=$!
for _ in $(seq 1 300); do curl -sf -o /dev/null https://app.example.com/ && break; sleep 0.2; done
curl -sS https://app.example.com/ | head -1
kill $RUN; wait $RUN || true
'''

CASES = [
    pytest.param("cloudflared", "6", "http2", id="cloudflared-v6-http2", marks=pytest.mark.skipif(
        not CLOUDFLARED, reason="needs a real cloudflared: set TUNNEL_LAB_CLOUDFLARED=/path/to/cloudflared")),
    pytest.param("cloudflared", "auto", "quic", id="cloudflared-auto-quic", marks=pytest.mark.skipif(
        not CLOUDFLARED, reason="needs a real cloudflared: set TUNNEL_LAB_CLOUDFLARED=/path/to/cloudflared")),
    pytest.param("tunnel-lab connector", "auto", "quic", id="ours-auto-quic"),
]


@needs_netns
@needs_ipv6
@pytest.mark.parametrize(("connector", "version", "protocol"), CASES)
def test_a_connector_registers_over_ipv6_and_serves_a_request(tmp_path: Path, connector: str, version: str,
                                                              protocol: str) -> None:
    script = f"CF='{connector}' VERSION={version} PROTOCOL={protocol}\n{RUN}"
    binary = str(Path(CLOUDFLARED).resolve()) if CLOUDFLARED and connector == "cloudflared" else None
    result = sandbox(tmp_path, "bash", "-c", script, cloudflared=binary)
    state = tmp_path / "state"
    regions = json.loads((state / "sandbox.json").read_text())["regions"]
    if not any(":" in ip for ips in regions.values() for ip in ips):
        pytest.skip(f"the sandbox could not add IPv6 addresses to its lo: {result.stderr[-500:]}")
    log = (state / "home" / "run.log").read_text()
    detail = result.stderr[-2000:] + log[-3000:]
    assert result.returncode == 0, detail
    assert "<!DOCTYPE HTML>" in result.stdout.splitlines(), detail
    registered = re.findall(r"Registered tunnel connection .* ip=(\S+) .*protocol=(\w+)", log)
    assert len(registered) == 2, detail
    assert all(ip.startswith("2001:db8:") and proto == protocol for ip, proto in registered), detail


# Runs inside the sandbox: a routed hostname through our connector, then the eyeball over each family.
# curl prints the address it reached (%{remote_ip}) after the body's first line.
EYEBALLS = r'''
set -eu
tunnel-lab login >/dev/null
tunnel-lab connector tunnel create app >/dev/null 2>&1
tunnel-lab connector tunnel route dns app app.example.com >/dev/null 2>&1
python3 -m http.server 8000 --bind 127.0.0.1 >/dev/null 2>&1 &
tunnel-lab connector tunnel --ha-connections 1 run --url http://localhost:8000 app >"$HOME/run.log" 2>&1 &
RUN=$!
for _ in $(seq 1 300); do curl -sf -o /dev/null https://app.example.com/ && break; sleep 0.2; done
for how in -6 -4 --no-progress-meter; do
  echo "== $how"
  curl -sS $how -w '%{remote_ip} %{remote_port}\n' https://app.example.com/ | sed -n '1p;$p'
done
echo "== http -6"
curl -sS -6 -o /dev/null -w '%{http_code} %{remote_ip} %{remote_port}\n' http://app.example.com/
kill $RUN; wait $RUN || true
'''


@needs_netns
@needs_ipv6
def test_routed_hostnames_have_aaaa_and_the_eyeballs_answer_over_ipv6_and_ipv4(tmp_path: Path) -> None:
    result = sandbox(tmp_path, "bash", "-c", EYEBALLS)
    state = tmp_path / "state"
    eyeballs = json.loads((state / "sandbox.json").read_text())["eyeballs"]["all"]
    if len(eyeballs["https"]) < 2:
        pytest.skip(f"the sandbox could not add IPv6 addresses to its lo: {result.stderr[-500:]}")
    detail = result.stdout[-2000:] + result.stderr[-2000:] + (state / "home" / "run.log").read_text()[-2000:]
    assert result.returncode == 0, detail
    sections = dict(part.split("\n", 1) for part in result.stdout.split("== ")[1:])
    page = "<!DOCTYPE HTML>\n"
    assert sections["-6"] == page + "2001:db8::1 443\n", detail
    assert sections["-4"] == page + "127.0.0.1 443\n", detail
    # no family named: curl tries the AAAA answer first (RFC 6724 order), as on a dual-stack network
    assert sections["--no-progress-meter"] == page + "2001:db8::1 443\n", detail
    assert sections["http -6"] == "200 2001:db8::1 80\n", detail
    assert eyeballs == {"http": ["127.0.0.1:80", "[2001:db8::1]:80"],
                        "https": ["127.0.0.1:443", "[2001:db8::1]:443"]}
