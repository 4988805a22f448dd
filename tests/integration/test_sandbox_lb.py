"""`tunnel route lb` in the sandbox, as written, with the real cloudflared and with our connector: two
tunnels in one pool behind `lb.example.com`, requests answered by both, then by the one left running."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tunnel_lab.lab.runner import netns

TIMEOUT = 240
CLOUDFLARED = os.environ.get("TUNNEL_LAB_CLOUDFLARED")
OK, WHY = netns.available()

# Runs in the sandbox with $CF the connector command. Waits with deadlines only for what comes up on its
# own schedule (the connectors' registrations, the stopped connector's connections going away).
FLOW = r'''
set -u
tunnel-lab login >/dev/null
$CF tunnel create web1 >/dev/null 2>&1 && $CF tunnel create web2 >/dev/null 2>&1
$CF tunnel route lb web1 lb.example.com web-pool 2>&1
$CF tunnel route lb web2 lb.example.com web-pool 2>&1
$CF tunnel route lb web2 lb.example.com web-pool 2>&1
$CF tunnel route dns web1 lb.example.com 2>&1 && echo "DNS-OVER-LB-ACCEPTED" || echo "DNS-OVER-LB-REFUSED"
mkdir -p one two && echo one > one/who && echo two > two/who
python3 -m http.server 8001 --bind 127.0.0.1 -d one >/dev/null 2>&1 &
python3 -m http.server 8002 --bind 127.0.0.1 -d two >/dev/null 2>&1 &
$CF tunnel run --url http://localhost:8001 web1 >web1.log 2>&1 &
first=$!
$CF tunnel run --url http://localhost:8002 web2 >web2.log 2>&1 &
ask() {  # the body of a 200, else the status (000: no answer)
  code=$(curl -s --max-time 5 -o answer.txt -w '%{http_code}' https://lb.example.com/who)
  if [ "$code" = 200 ]; then cat answer.txt; else echo "status-$code"; fi
}
seen=""
for _ in $(seq 1 600); do
  seen="$seen $(ask)"
  case "$seen" in *one*two*|*two*one*) break;; esac
  sleep 0.1
done
echo "BOTH:$seen"
kill -9 $first
for _ in $(seq 1 600); do  # until the edge has let the killed connector's connections go
  answers=""
  for _ in 1 2 3 4 5 6; do answers="$answers $(ask)"; done
  [ "$answers" = " two two two two two two" ] && break
  sleep 0.1
done
echo "AFTER:$answers"
'''


def run_flow(tmp_path: Path, connector: str, cloudflared: str | None) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "tunnel_lab", "sandbox", "--quiet", "--state", str(tmp_path / "state")]
    if cloudflared:
        argv += ["--cloudflared", cloudflared]
    env = {**os.environ, "CF": connector}
    return subprocess.run([*argv, "--", "bash", "-c", FLOW], capture_output=True, text=True, timeout=TIMEOUT,
                          cwd=tmp_path, env=env)


def check(result: subprocess.CompletedProcess[str]) -> None:
    detail = result.stdout[-3000:] + result.stderr[-2000:]
    assert result.returncode == 0, detail
    out = result.stdout
    assert "Created load balancer lb.example.com and added a new pool web-pool with this tunnel as an " \
        "origin" in out, detail
    assert "Added this tunnel as an origin in pool web-pool which is already used by load balancer " \
        "lb.example.com" in out, detail
    assert "Load balancer lb.example.com already uses pool web-pool which has this tunnel as an origin" \
        in out, detail
    assert "DNS-OVER-LB-REFUSED" in out and "code: 1003" in out, detail
    both = next(line for line in out.splitlines() if line.startswith("BOTH:"))
    assert "one" in both and "two" in both, detail
    after = next(line for line in out.splitlines() if line.startswith("AFTER:")).split()[1:]
    assert after == ["two"] * 6, detail


@pytest.mark.skipif(not OK, reason=f"no private network namespaces here: {WHY}")
def test_lb_route_with_our_connector(tmp_path: Path) -> None:
    check(run_flow(tmp_path, "tunnel-lab connector", None))


@pytest.mark.skipif(not OK, reason=f"no private network namespaces here: {WHY}")
@pytest.mark.skipif(not CLOUDFLARED, reason="needs a real cloudflared: set TUNNEL_LAB_CLOUDFLARED")
def test_lb_route_with_the_real_cloudflared(tmp_path: Path) -> None:
    assert CLOUDFLARED is not None
    check(run_flow(tmp_path, "cloudflared", str(Path(CLOUDFLARED).resolve())))
