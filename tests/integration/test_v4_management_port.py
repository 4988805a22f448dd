"""The v4 API on the edge's management port, outside the sandbox, with both connectors: admin commands
over HTTPS (`--api-url https://127.0.0.1:PORT/client/v4`, the lab CA in SSL_CERT_FILE), `route lb` with
two tunnels in one pool (requests spread over both, a stopped one skipped), bad tokens as the real API
answers them. The real cloudflared runs only inside a private network namespace (it contacts public DNS at
start-up): there the whole lab runs too, with the same steps (`STEPS`)."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tunnel_lab.lab.runner import netns

TIMEOUT = 240
CLOUDFLARED = os.environ.get("TUNNEL_LAB_CLOUDFLARED")
OK, WHY = netns.available()

# Runs as a script: argv[1] is the connector command ("builtin" or a cloudflared path). Prints one JSON
# line of findings for the test to check (a failed step exits non-zero with what it saw).
STEPS = r'''
import json, os, subprocess, sys, time, urllib.request, ssl
from pathlib import Path
from tunnel_lab.lab.api import Tunnel, start_lab
from tunnel_lab.lab.login import issue_origin_cert

which = sys.argv[1]
binary = None if which == "builtin" else which
base = [sys.executable, "-m", "tunnel_lab", "connector"] if binary is None else [binary]
found = {}
with start_lab(datacentres=3) as lab:
    home = lab.state / "home"
    (home / ".cloudflared").mkdir(parents=True)
    cert = home / ".cloudflared" / "cert.pem"
    cert.write_bytes(issue_origin_cert(lab.state))
    url = f"https://{lab.edge.api}/client/v4"
    env = {**os.environ, "HOME": str(home), "SSL_CERT_FILE": str(lab.ca)}
    env = {k: v for k, v in env.items() if not k.startswith("TUNNEL_") or k == "TUNNEL_LAB_STATE"}

    def admin(*args, ok=True):
        done = subprocess.run([*base, "tunnel", "--api-url", url, "--origincert", str(cert), *args],
                              env=env, capture_output=True, text=True, timeout=60)
        if ok and done.returncode != 0:
            sys.exit(f"{args}: exit {done.returncode}: {done.stdout} {done.stderr}")
        return done

    ids = {}
    for name in ("one", "two"):
        admin("create", name)
    listed = json.loads(admin("list", "--output", "json").stdout)
    ids = {t["name"]: t["id"] for t in listed}
    found["listed"] = sorted(ids)
    found["lb_one"] = admin("route", "lb", "one", "lb.example.com", "pool-a").stderr
    found["lb_two"] = admin("route", "lb", "two", "lb.example.com", "pool-a").stderr
    found["lb_again"] = admin("route", "lb", "two", "lb.example.com", "pool-a").stderr
    found["dns"] = admin("route", "dns", "one", "app.example.com").stderr
    conflict = admin("route", "lb", "two", "app.example.com", "pool-a", ok=False)
    found["conflict"] = [conflict.returncode, conflict.stdout + conflict.stderr]
    bad_pool = admin("route", "lb", "two", "x.example.com", "-pool", ok=False)
    found["bad_pool"] = [bad_pool.returncode, bad_pool.stdout + bad_pool.stderr]
    origin = lab.start_origin("echo")
    conns = {}
    for name in ("one", "two"):
        creds = home / ".cloudflared" / f"{ids[name]}.json"
        conns[name] = lab.start_connector(Tunnel(name, ids[name], creds), url=origin.url, cloudflared=binary,
                                          name=f"connector-{name}")
    statuses = [lab.request("lb.example.com", f"/spread/{i}").status for i in range(8)]
    found["spread_statuses"] = statuses
    served = {h["tunnel_id"] for h in lab.history() if h["path"].startswith("/spread")}
    found["spread_tunnels"] = sorted(served) == sorted(ids.values())
    lab.stop_connector(conns["one"])
    after = [lab.request("lb.example.com", f"/after/{i}").status for i in range(4)]
    found["after_statuses"] = after
    found["after_tunnels"] = sorted({h["tunnel_id"] for h in lab.history() if h["path"].startswith("/after")})
    found["two_id"] = ids["two"]
    busy = admin("delete", "two", ok=False)
    found["busy_delete"] = [busy.returncode, busy.stdout + busy.stderr]
    before = {c["id"] for c in lab.connections() if c["tunnel_id"] == ids["two"]}
    admin("cleanup", "two")
    # The edge dropped them before answering (the connector then registers new ones).
    found["dropped"] = bool(before) and not before & {c["id"] for c in lab.connections()}
    found["delete"] = admin("delete", "-f", "one").returncode
print(json.dumps(found))
'''


def run_steps(which: str, *, inside_netns: bool) -> dict[str, object]:
    prefix = [sys.executable, "-m", "tunnel_lab", "netns", "--"] if inside_netns else []
    done = subprocess.run([*prefix, sys.executable, "-c", STEPS, which], capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    found: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return found


def check(found: dict[str, object]) -> None:
    assert found["listed"] == ["one", "two"]
    assert "Created load balancer lb.example.com and added a new pool pool-a with this tunnel as an origin" \
        in str(found["lb_one"])
    assert "Added this tunnel as an origin in pool pool-a which is already used by load balancer " \
        "lb.example.com" in str(found["lb_two"])
    assert "Load balancer lb.example.com already uses pool pool-a which has this tunnel as an origin" \
        in str(found["lb_again"])
    assert "Added CNAME app.example.com" in str(found["dns"])
    code, text = found["conflict"]  # type: ignore[misc]
    assert code == 1 and "code: 1003" in text and "already exists" in text
    code, text = found["bad_pool"]  # type: ignore[misc]
    assert code == 1 and "-pool is not a valid pool name" in text
    assert found["spread_statuses"] == [200] * 8
    assert found["spread_tunnels"] is True  # both tunnels of the pool served
    assert found["after_statuses"] == [200] * 4  # the stopped tunnel is skipped
    assert found["after_tunnels"] == [found["two_id"]]
    assert found["delete"] == 0
    code, text = found["busy_delete"]  # type: ignore[misc]
    assert code == 1 and "code: 1022" in text
    assert found["dropped"] is True


def test_builtin_connector_on_the_management_port() -> None:
    check(run_steps("builtin", inside_netns=False))


@pytest.mark.skipif(not OK, reason=f"no private network namespaces here: {WHY}")
@pytest.mark.skipif(not CLOUDFLARED, reason="set TUNNEL_LAB_CLOUDFLARED to a cloudflared binary to compare")
def test_real_cloudflared_on_the_management_port() -> None:
    assert CLOUDFLARED is not None
    check(run_steps(CLOUDFLARED, inside_netns=True))


def test_tokens_and_schemes_on_the_management_port(tmp_path: Path) -> None:
    """HTTP and HTTPS on one port; a v4 path wants a cert.pem token (the real codes), not the management
    token, and the management API still wants its own."""
    from tunnel_lab.lab.api import start_lab
    from tunnel_lab.lab.v4base import mint_token

    with start_lab(state=tmp_path / "state", datacentres=2) as lab:
        token = mint_token(lab.state)
        mgmt = (lab.state / "api-token").read_text().strip()
        ctx = ssl.create_default_context(cafile=str(lab.ca))

        def call(scheme: str, path: str, bearer: str | None) -> tuple[int, dict[str, object]]:
            req = urllib.request.Request(f"{scheme}://{lab.edge.api}{path}")
            if bearer is not None:
                req.add_header("Authorization", f"Bearer {bearer}")
            try:
                with urllib.request.urlopen(req, timeout=30, context=ctx if scheme == "https" else None) as r:
                    return r.status, json.loads(r.read())
            except urllib.error.HTTPError as exc:
                with exc:
                    return exc.code, json.loads(exc.read())

        from tunnel_lab.lab.store import Store

        with Store(lab.state / "state.db") as store:
            tunnels = f"/client/v4/accounts/{store.account_tag}/cfd_tunnel"
        for scheme in ("http", "https"):
            status, body = call(scheme, tunnels, token)
            assert status == 200 and body["success"] is True and body["result"] == []
            status, body = call(scheme, tunnels, mgmt)
            assert (status, body["errors"]) == (403, [{"code": 10000, "message": "Authentication error"}])
            status, body = call(scheme, tunnels, None)
            assert (status, [e["code"] for e in body["errors"]]) == (400, [9106])  # type: ignore[union-attr]
            status, body = call(scheme, "/connections", token)
            assert status == 401  # the management API keeps its own token
            assert call(scheme, "/healthz", None)[0] == 200
