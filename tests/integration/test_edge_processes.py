"""The edge in two processes (`tunnel-lab edge --processes 2`): forwarding between data centres, faults,
history and metrics whole in the API, a killed worker reported (docs/architecture.md, "The edge in several
processes")."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import trio

from tests.integration.test_edge_process import PY, api, get, lab, procs, start, wait_json
from tunnel_lab.lab.runner import client

__all__ = ["procs"]  # the fixture, imported for these tests


def request(address: str, method: str, path: str, host: str, body: bytes | None) -> tuple[int, bytes]:
    req = urllib.request.Request(f"http://{address}{path}", data=body, method=method,
                                 headers={"Host": host, "X-Test": "yes"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return resp.status, resp.read()


def wait_for(what: str, check: Any, log: Path, timeout: float = 20) -> Any:
    """Poll the API-backed `check` until it returns something true (the edge's log on failure)."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"{what}: never happened\n{log.read_text()[-4000:]}"
        time.sleep(0.1)
    return value


def metric(ready: dict[str, Any], name: str, **labels: str) -> float:
    req_text = api_text(ready, "/metrics")
    total = 0.0
    for line in req_text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def api_text(ready: dict[str, Any], path: str) -> str:
    req = urllib.request.Request(f"http://{ready['api']}{path}",
                                 headers={"Authorization": f"Bearer {ready['api_token']}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.read().decode()


def start_lab(tmp_path: Path, procs: list, locations: tuple[str, ...], *,
              faults: tuple[dict[str, Any], ...] = (), origin_kind: str = "echo",
              edge_flags: tuple[str, ...] = (), private: tuple[str, ...] = (),
              ) -> tuple[dict[str, Any], Any, Path]:
    """A state with tunnel t1 (app.test), a two-process edge over LAB1 (worker 0) and LAB2 (worker 1)
    with an HTTP and an HTTPS eyeball listener (and `edge_flags`), an `origin_kind` origin, `faults` applied,
    and one of our connectors at each of `locations` (registered unless a fault is set). With `private`
    origin kinds: each started first (`edge_flags` may name `{kind}`, its address), t1 routes 127.0.0.0/8,
    and the connectors carry private-network traffic over QUIC."""
    state = tmp_path / "state"
    lab(state, "tunnel", "create", "t1")
    lab(state, "tunnel", "route", "dns", "t1", "app.test")
    creds = next((state / "credentials").glob("*.json"))
    addresses = {}
    for kind in private:
        proc = start(procs, [PY, "-m", "tunnel_lab", "origin", kind, "--listen", "127.0.0.1:0",
                             "--ready-file", str(tmp_path / f"{kind}.json")], state, tmp_path / f"{kind}.log")
        addresses[kind] = wait_json(tmp_path / f"{kind}.json", proc)["address"]
    config, protocol = [], "http2"
    if private:
        lab(state, "tunnel", "route", "ip", "add", "127.0.0.0/8", "t1")
        (tmp_path / "connector.yaml").write_text("warp-routing:\n  enabled: true\n")
        config, protocol = ["--config", str(tmp_path / "connector.yaml")], "quic"
    edge_log = tmp_path / "edge.log"
    edge = start(procs, [PY, "-m", "tunnel_lab", "edge", "--state", str(state), "--processes", "2",
                         "--tunnel-listen", "LAB1=127.0.0.1:0", "--tunnel-listen", "LAB2=127.0.0.2:0",
                         "--http-listen", "127.0.0.1:0", "--https-listen", "127.0.0.1:0",
                         "--ready-file", str(tmp_path / "edge.json"), "--shutdown-timeout", "2",
                         *(f.format(**addresses) for f in edge_flags)], state, edge_log)
    ready = wait_json(tmp_path / "edge.json", edge, timeout=60)
    ready["private"] = addresses
    origin = start(procs, [PY, "-m", "tunnel_lab", "origin", origin_kind, "--listen", "127.0.0.1:0",
                           "--ready-file", str(tmp_path / "origin.json")], state, tmp_path / "origin.log")
    origin_url = wait_json(tmp_path / "origin.json", origin)["url"]
    for fault in faults:
        api(ready, "/faults", "POST", fault)
    for listener in ready["tunnel_listeners"]:  # one connector per data centre: each dials only its own
        if listener["location"] in locations:
            start(procs, [PY, "-m", "tunnel_lab", "connector", "tunnel", "--no-autoupdate", "--edge",
                          listener["address"], "--cacert", ready["ca"], "--no-prechecks",
                          "--ha-connections", "1", "--grace-period", "1s", *config, "run",
                          "--protocol", protocol, "--credentials-file", str(creds), "--url", origin_url,
                          "t1"],
                  state, tmp_path / f"connector-{listener['location']}.log")
    if not faults:
        wait_for("connector registered", lambda: len(api(ready, "/connections")) == len(locations), edge_log)
    return ready, edge, edge_log


def test_request_reaches_a_tunnel_connected_only_to_the_other_process(tmp_path, procs):
    ready, edge, edge_log = start_lab(tmp_path, procs, ("LAB2",))
    workers = ready["processes"]
    assert [w["locations"] for w in workers] == [["LAB1"], ["LAB2"]]
    assert len({w["pid"] for w in workers} | {edge.pid}) == 3
    assert [c["location"] for c in api(ready, "/connections")] == ["LAB2"]
    # Each request on a new connection: the kernel hands it to either worker; worker 0 has no connection of
    # the tunnel and forwards to worker 1. Go on until a GET and a POST were both forwarded (the metric says
    # which request was), each checked end to end like every other.
    sent = 0
    forwarded: set[str] = set()
    while forwarded != {"GET", "POST"}:
        assert sent < 200, f"never forwarded more than {forwarded}: does worker 0 accept?"
        before = metric(ready, "tunnel_lab_edge_forwarded_total")
        method = ("GET", "POST")[sent % 2]
        body = os.urandom(100_000) if method == "POST" else None
        status, answer = request(ready["http"], method, f"/echo?n={sent}", "app.test", body)
        assert status == 200, answer
        seen = json.loads(answer)
        assert seen["target"] == f"/echo?n={sent}" and ["X-Test", "yes"] in seen["headers"]
        assert ["Cf-Connecting-Ip", "127.0.0.1"] in seen["headers"]
        if body is not None:
            assert seen["body_sha256"] == hashlib.sha256(body).hexdigest()
        if metric(ready, "tunnel_lab_edge_forwarded_total") > before:
            forwarded.add(method)
        sent += 1
    # The merged history has every request once, served at LAB2 by worker 1, in order.
    history = api(ready, "/history?since=0")
    assert [e["path"] for e in history] == [f"/echo?n={i}" for i in range(sent)]
    assert {(e["location"], e["worker"], e["status"]) for e in history} == {("LAB2", 1, 200)}
    assert api(ready, f"/history?since={history[-1]['seq']}") == []
    assert [e["seq"] for e in history] == list(range(1, sent + 1))
    assert metric(ready, "tunnel_lab_edge_requests_total", status="200") == sent
    edge.send_signal(signal.SIGTERM)
    assert edge.wait(timeout=30) == 0
    assert "edge stopped (all processes)" in edge_log.read_text()


def test_a_forwarded_request_with_a_malformed_body_gets_400(tmp_path, procs):
    # As in one process (scenario hostile-cl-te): the body breaks off after a good head, the eyeball gets
    # 400 and its connection closes, not the 502 of a data centre that did not answer.
    ready, _edge, _edge_log = start_lab(tmp_path, procs, ("LAB2",))
    host, port = ready["http"].rsplit(":", 1)
    bad = (b"POST /bad-chunk HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"zz\r\nabc\r\n0\r\n\r\n")
    for _attempt in range(200):
        before = metric(ready, "tunnel_lab_edge_forwarded_total")
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(bad)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 400 "), answer[:300]
        if metric(ready, "tunnel_lab_edge_forwarded_total") > before:
            break
    else:
        raise AssertionError("no request was forwarded in 200: does worker 0 accept?")


def forwarded_until(ready: dict[str, Any], attempt: Any) -> str:
    """Run `attempt(n)` (a request for a path it returns) on new connections until one was forwarded."""
    for n in range(200):
        before = metric(ready, "tunnel_lab_edge_forwarded_total")
        path = attempt(n)
        if metric(ready, "tunnel_lab_edge_forwarded_total") > before:
            return path
    raise AssertionError("no request was forwarded in 200: does worker 0 accept?")


def history_entry(ready: dict[str, Any], path: str, edge_log: Path) -> dict[str, Any]:
    entries = wait_for(f"{path} in the history",
                       lambda: [e for e in api(ready, "/history?since=0") if e["path"] == path], edge_log)
    assert len(entries) == 1, entries  # recorded once, by one of the two workers
    return entries[0]


async def reset_after_head(ready: dict[str, Any], path: str) -> None:
    """HTTP/2 over TLS: GET `path`, and once the response head came, RST_STREAM(CANCEL)."""
    stream = await client.connect(ready["https"], tls=True, server_hostname="app.test", ca_path=ready["ca"],
                                  alpn=("h2",))
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.send_headers(1, [(":method", "GET"), (":scheme", "https"), (":authority", "app.test"),
                          (":path", path)], end_stream=True)
    with trio.fail_after(30):
        await stream.send_all(conn.data_to_send())
        while not any(isinstance(ev, h2.events.ResponseReceived)
                      for ev in conn.receive_data(await stream.receive_some(65536))):
            pass
        conn.reset_stream(1, h2.errors.ErrorCodes.CANCEL)
        await stream.send_all(conn.data_to_send())
        await trio.sleep(0.5)  # the connection stays up: only the stream was reset
    await stream.aclose()


def test_a_forwarded_request_reset_by_its_eyeball_is_recorded_as_a_reset(tmp_path, procs):
    # In one process an HTTP/2 eyeball's RST_STREAM cancels its request, recorded `eyeball-reset`. Forwarded,
    # the sending worker aborts the link and the receiving worker, which records it, must say the same.
    ready, _edge, edge_log = start_lab(tmp_path, procs, ("LAB2",), origin_kind="stream")

    def attempt(n: int) -> str:
        path = f"/trickle?bytes=200&interval=0.05&chunked=1&n={n}"
        trio.run(reset_after_head, ready, path)
        return path

    entry = history_entry(ready, forwarded_until(ready, attempt), edge_log)
    assert (entry["outcome"], entry["location"], entry["worker"]) == ("eyeball-reset", "LAB2", 1), entry


def test_a_forwarded_request_whose_eyeball_closes_is_recorded_as_closed(tmp_path, procs):
    # The other end: an HTTP/1.1 eyeball that closes mid-response went away, it did not reset. The sending
    # worker has answer bytes unread when it closes the link, which alone would make Linux send RST.
    ready, _edge, edge_log = start_lab(tmp_path, procs, ("LAB2",), origin_kind="stream")
    host, port = ready["http"].rsplit(":", 1)

    def attempt(n: int) -> str:
        path = f"/large?bytes=20000000&seed={n}"  # more than the sockets hold: the link has bytes in flight
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: app.test\r\n\r\n".encode())
            assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
            time.sleep(0.3)
        return path

    entry = history_entry(ready, forwarded_until(ready, attempt), edge_log)
    assert (entry["outcome"], entry["location"], entry["worker"]) == ("eyeball-closed", "LAB2", 1), entry


def test_a_load_balancer_is_served_by_whichever_process_has_its_tunnel(tmp_path, procs):
    # A load balancer's hostname is chosen over every worker's connections and forwarded like a DNS route:
    # with the pool's only connection in worker 1, no request answered by worker 0 gets 530.
    ready, _edge, _edge_log = start_lab(tmp_path, procs, ("LAB2",))
    lab(tmp_path / "state", "tunnel", "route", "lb", "t1", "lb.app.test", "pool-a")
    forwarded = 0.0
    for n in range(40):
        before = metric(ready, "tunnel_lab_edge_forwarded_total")
        status, answer = request(ready["http"], "GET", f"/echo?lb={n}", "lb.app.test", None)
        assert status == 200, answer
        forwarded += metric(ready, "tunnel_lab_edge_forwarded_total") - before
    assert forwarded > 0, "no request was forwarded in 40: does worker 0 accept?"
    history = [e for e in api(ready, "/history?since=0") if e["host"] == "lb.app.test"]
    assert len(history) == 40 and {(e["status"], e["location"]) for e in history} == {(200, "LAB2")}


def test_every_eyeball_address_serves_in_every_process(tmp_path, procs):
    # Two --http-listen addresses (IPv4 and IPv6 loopback) with two processes: each is handed to both
    # workers, the ready file lists both, and a request on either reaches the tunnel.
    state = tmp_path / "state"
    lab(state, "tunnel", "create", "t1")
    lab(state, "tunnel", "route", "dns", "t1", "app.test")
    creds = next((state / "credentials").glob("*.json"))
    edge = start(procs, [PY, "-m", "tunnel_lab", "edge", "--state", str(state), "--processes", "2",
                         "--tunnel-listen", "LAB1=127.0.0.1:0", "--tunnel-listen", "LAB2=127.0.0.2:0",
                         "--http-listen", "127.0.0.1:0", "--http-listen", "[::1]:0",
                         "--ready-file", str(tmp_path / "edge.json"), "--shutdown-timeout", "2"],
                 state, tmp_path / "edge.log")
    ready = wait_json(tmp_path / "edge.json", edge, timeout=60)
    assert len(ready["http_listeners"]) == 2 and ready["http"] == ready["http_listeners"][0]
    assert ready["http_listeners"][1].startswith("[::1]:")
    origin = start(procs, [PY, "-m", "tunnel_lab", "origin", "echo", "--listen", "127.0.0.1:0",
                           "--ready-file", str(tmp_path / "origin.json")], state, tmp_path / "origin.log")
    origin_url = wait_json(tmp_path / "origin.json", origin)["url"]
    start(procs, [PY, "-m", "tunnel_lab", "connector", "tunnel", "--no-autoupdate", "--edge",
                  ready["tunnel_listeners"][1]["address"], "--cacert", ready["ca"], "--no-prechecks",
                  "--ha-connections", "1", "run", "--protocol", "http2", "--credentials-file", str(creds),
                  "--url", origin_url, "t1"], state, tmp_path / "connector.log")
    wait_for("connector registered", lambda: len(api(ready, "/connections")) == 1, tmp_path / "edge.log")
    for address in ready["http_listeners"]:
        for n in range(6):  # new connections: both workers take some
            status, answer = request(address, "GET", f"/echo?n={n}", "app.test", None)
            assert status == 200 and json.loads(answer)["target"] == f"/echo?n={n}", answer
    workers = {e["worker"] for e in api(ready, "/history?since=0")}
    assert workers == {1}  # served where the connection is, forwarded from worker 0 when it accepted


def test_faults_act_in_both_processes(tmp_path, procs):
    refuse = {"kind": "refuse-registrations", "should_retry": True}
    ready, _edge, edge_log = start_lab(tmp_path, procs, ("LAB1", "LAB2"), faults=(refuse,))
    # The connector's first connections (one per data centre, so one per worker) are both refused: the
    # fault applied through the parent's API acts in both processes.
    for location in ("LAB1", "LAB2"):
        wait_for(f"a refusal at {location}", lambda loc=location: metric(
            ready, "tunnel_lab_edge_registrations_total", result="refused", location=loc) > 0, edge_log)
    [fault] = api(ready, "/faults")
    assert fault["kind"] == "refuse-registrations"
    api(ready, f"/faults/{fault['id']}", "DELETE")
    conns = wait_for("registered at both", lambda: (c := api(ready, "/connections")) and len(c) == 2 and c,
                     edge_log, timeout=60)
    assert sorted(c["location"] for c in conns) == ["LAB1", "LAB2"]
    dropped = api(ready, "/faults", "POST", {"kind": "drop-connection", "tunnel_id": conns[0]["tunnel_id"]})
    assert sorted(dropped["connections"]) == sorted(c["id"] for c in conns) and dropped["affected"] == 2
    assert metric(ready, "tunnel_lab_edge_faults_total", kind="drop-connection") == 1
    assert metric(ready, "tunnel_lab_edge_faults_total", kind="refuse-registrations") == 1
    assert "tunnel_lab_edge_request" in api_text(ready, "/metrics")


def test_a_killed_worker_is_reported_and_the_other_goes_on(tmp_path, procs):
    ready, edge, edge_log = start_lab(tmp_path, procs, ("LAB1",))
    victim = ready["processes"][1]
    os.kill(victim["pid"], signal.SIGKILL)
    processes = wait_for("worker 1 reported dead",
                         lambda: [p for p in api(ready, "/processes") if not p["alive"]], edge_log)
    assert processes[0]["worker"] == 1 and processes[0]["exit_code"] == -signal.SIGKILL
    assert metric(ready, "tunnel_lab_edge_worker_up", worker="1") == 0
    assert metric(ready, "tunnel_lab_edge_worker_up", worker="0") == 1
    assert "worker 1 (pid" in edge_log.read_text()
    # worker 0 holds LAB1 and the tunnel's connection: requests are still served
    for n in range(5):
        status, _ = get(ready["http"], f"/echo?n={n}", "app.test")
        assert status == 200
    assert edge.poll() is None
    edge.send_signal(signal.SIGTERM)
    assert edge.wait(timeout=30) == 0


def test_the_trace_is_whole_across_the_workers(tmp_path, procs):
    # `--trace FILE`: each worker writes its own file beside FILE and FILE names them; `trace show FILE`
    # reads them all. A forwarded request's records are the receiving worker's (its ray, its data centre),
    # and the live view on the parent's API finds them in that worker's ring.
    trace = tmp_path / "edge.trace.jsonl"
    ready, edge, edge_log = start_lab(tmp_path, procs, ("LAB2",), edge_flags=("--trace", str(trace)))

    def attempt(n: int) -> str:
        path = f"/echo?traced={n}"
        assert get(ready["http"], path, "app.test")[0] == 200
        return path

    entry = history_entry(ready, forwarded_until(ready, attempt), edge_log)
    ray = entry["ray"]
    assert ray.endswith("-LAB2") and entry["worker"] == 1, entry
    answer = api(ready, f"/live/trace?ray={ray}")
    assert answer["status"] == "ok" and answer["complete"], answer
    assert {r["worker"] for r in answer["records"]} == {1}
    kinds = {r["kind"] for r in answer["records"]}
    assert {"eyeball.request", "h2.frame", "eyeball.done"} <= kinds, kinds
    assert [s for s in answer["steps"] if s["kind"] == "eyeball.request"], answer["steps"]
    assert api(ready, "/live/trace?ray=0000000000000000-LAB1")["status"] == "unknown"
    edge.send_signal(signal.SIGTERM)
    assert edge.wait(timeout=30) == 0

    [start] = [json.loads(line) for line in trace.read_text().splitlines()[:1]]
    assert start["kind"] == "trace.start" and start["parts"] == ["edge.trace.w0.jsonl", "edge.trace.w1.jsonl"]
    for index, part in enumerate(start["parts"]):
        records = [json.loads(line) for line in (tmp_path / part).read_text().splitlines()]
        assert records[-1]["kind"] == "trace.end" and records[-1]["dropped"] == 0  # stopped in order
        assert {r["worker"] for r in records} == {index}
        # each worker numbers its connections from 1; only worker 1 (LAB2) has one
        conns = {r["conn"] for r in records if r["kind"].startswith("h2.")}
        assert all(c.endswith(f"@w{index}") for c in conns) and bool(conns) == (index == 1), conns
        # the sending worker never saw the forwarded request's ray: the receiving one traced all of it
        assert bool([r for r in records if r.get("ray") == ray]) == (index == 1)
    show = subprocess.run([PY, "-m", "tunnel_lab", "trace", "show", str(trace), "--ray", ray, "--color",
                           "never"], capture_output=True, text=True, timeout=60)
    assert show.returncode == 0 and show.stderr == "", show.stderr
    assert "eyeball.request" in show.stdout and "HEADERS" in show.stdout, show.stdout
    diagram = subprocess.run([PY, "-m", "tunnel_lab", "trace", "diagram", str(trace), "--ray", ray],
                             capture_output=True, text=True, timeout=60)
    assert diagram.returncode == 0 and "sequenceDiagram" in diagram.stdout, diagram.stderr


def warp_connect(warp: str, target: str, payload: bytes) -> bytes:
    """CONNECT `target` through the warp listener, send `payload`, read as many bytes back (as the runner's
    `tcp` step does)."""
    host, port = warp.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(1)
            assert chunk, f"the proxy closed before answering: {head!r}"
            head += chunk
        assert head.startswith(b"HTTP/1.1 200 "), head
        sock.sendall(payload)  # the echo's answer fits the sockets' buffers meanwhile
        answer = b""
        while len(answer) < len(payload) and (chunk := sock.recv(65536)):
            answer += chunk
    return answer


def test_warp_connections_reach_a_tunnel_connected_only_to_the_other_process(tmp_path, procs):
    # Every worker accepts on the parent's --warp-listen socket; worker 0 has no connection of the tunnel
    # and forwards the connection's bytes, raw, to worker 1, which serves and records it as one process would.
    ready, edge, edge_log = start_lab(tmp_path, procs, ("LAB2",), private=("tcp-echo",),
                                      edge_flags=("--warp-listen", "127.0.0.1:0"))
    target = ready["private"]["tcp-echo"]
    assert ready["warp"] and ready["warp"] != ready["http"]
    payload = os.urandom(100_000)
    sent = 0
    while not metric(ready, "tunnel_lab_edge_forwarded_total"):
        assert sent < 200, "never forwarded: does worker 0 accept on the warp socket?"
        assert warp_connect(ready["warp"], target, payload) == payload
        sent += 1
    entries = wait_for("every CONNECT in the history", lambda: (e := [
        h for h in api(ready, "/history?since=0") if h["method"] == "CONNECT"]) and len(e) >= sent and e,
        edge_log)
    # each connection recorded once, by the worker holding the connection, as served
    assert len(entries) == sent
    assert {(e["path"], e["status"], e["outcome"], e["location"], e["worker"]) for e in entries} == {
        (target, 200, "tcp", "LAB2", 1)}
    edge.send_signal(signal.SIGTERM)
    assert edge.wait(timeout=30) == 0


def udp_echo(address: str, payloads: list[bytes]) -> list[bytes]:
    """Each payload from one UDP socket (one flow) and its answer, one at a time."""
    host, port = address.rsplit(":", 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(30)
        answers = []
        for payload in payloads:
            sock.sendto(payload, (host, int(port)))
            answers.append(sock.recvfrom(65536)[0])
    return answers


def test_udp_forwards_reach_a_tunnel_connected_only_to_the_other_process(tmp_path, procs):
    # Worker 0 holds the UDP ports (--udp-forward and POST /udp-forwards); the tunnel's only QUIC connection
    # is in worker 1, so each flow goes there over a forwarding link, its datagrams framed.
    ready, edge, _edge_log = start_lab(tmp_path, procs, ("LAB2",), private=("udp-echo",),
                                      edge_flags=("--udp-forward", "127.0.0.1:0={udp-echo}"))
    echo = ready["private"]["udp-echo"]
    [at_start] = ready["udp_forwards"]
    assert at_start["destination"] == echo
    payloads = [f"datagram {n} ".encode() * 20 for n in range(5)]
    assert udp_echo(at_start["listen"], payloads) == payloads
    assert metric(ready, "tunnel_lab_edge_forwarded_total") == 1  # one flow: one link
    made = api(ready, "/udp-forwards", "POST", {"destination": echo})
    assert made["destination"] == echo and made["listen"] != at_start["listen"]
    assert udp_echo(made["listen"], [b"through the API's port"]) == [b"through the API's port"]
    assert metric(ready, "tunnel_lab_edge_forwarded_total") == 2
    # a port that is taken: the worker's bind error, as one process gives it
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        body = json.dumps({"destination": echo, "listen": f"127.0.0.1:{port}"}).encode()
        req = urllib.request.Request(f"http://{ready['api']}/udp-forwards", method="POST", data=body,
                                     headers={"Authorization": f"Bearer {ready['api_token']}"})
        try:
            urllib.request.urlopen(req, timeout=10)
            raise AssertionError("a taken port was accepted")
        except urllib.error.HTTPError as exc:
            assert exc.code == 409 and b"cannot listen" in exc.read()
    edge.send_signal(signal.SIGTERM)
    assert edge.wait(timeout=30) == 0
