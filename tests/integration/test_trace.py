"""The protocol trace end to end (docs/trace.md): `tunnel-lab run --trace` with our connector and with the
real cloudflared, `trace show|diagram` on what it wrote, and SSLKEYLOGFILE: a tcpdump-style capture of a
tunnel connection decrypts in tshark to HTTP/2 frames."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from tunnel_lab.lab.api import open_lab

SCENARIO = """\
name: trace-probe
description: one request carrying credentials, traced on both ends
tags: [trace]
timeout: 60
topology:
  origins:
    app: {{kind: echo}}
  tunnels:
    main: {{dns: [app.lab.test]}}
  connector:
    tunnel: main
    url: ${{origins.app.url}}
steps:
  - name: a request with a cookie and a bearer token
    request:
      host: app.lab.test
      path: /probe?x=1
      headers: {{Cookie: "session={cookie}", Authorization: "Bearer {bearer}"}}
      expect:
        status: 200
"""


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _run_traced(tmp_path: Path, *extra: str) -> tuple[Path, tuple[str, str]]:
    cookie, bearer = secrets.token_hex(12), secrets.token_hex(12)
    scenario = tmp_path / "trace-probe.yaml"
    scenario.write_text(SCENARIO.format(cookie=cookie, bearer=bearer))
    results = tmp_path / "results"
    proc = subprocess.run([sys.executable, "-m", "tunnel_lab", "run", str(scenario), "--trace", "--results",
                           str(results), *extra], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return results / "trace-probe", (cookie, bearer)


def _check_edge_trace(folder: Path, leaks: tuple[str, ...]) -> str:
    """The edge's trace holds the registration, the request's frames and no secret; returns the ray."""
    edge = _records(folder / "edge.trace.jsonl")
    assert edge[-1]["kind"] == "trace.end" and edge[-1]["dropped"] == 0
    [call] = [r for r in edge if r.get("method") == "registerConnection" and r["kind"] == "rpc.message"
              and r["message"] == "call"]
    assert call["dir"] == "in" and call["params"]["auth"]["tunnel_secret"] == "<redacted>"
    [answer] = [r for r in edge if r.get("method") == "registerConnection" and r.get("message") == "return"]
    assert answer["results"]["connection_details"]["location_name"]
    [request] = [r for r in edge if r["kind"] == "eyeball.request" and r["target"] == "/probe?x=1"]
    ray = request["ray"]
    frames = [r for r in edge if r["kind"] == "h2.frame" and r.get("ray") == ray]
    [out] = [f for f in frames if f["type"] == "HEADERS" and f["dir"] == "out"]
    assert [":path", "/probe?x=1"] in out["headers"] and ["cookie", "<redacted>"] in out["headers"]
    assert any(f["type"] == "HEADERS" and f["dir"] == "in" for f in frames)
    assert any(r["kind"] == "h2.body" and r.get("ray") == ray and r["dir"] == "in" for r in edge)
    text = (folder / "edge.trace.jsonl").read_text()
    for leak in leaks:
        assert leak not in text
    return str(ray)


def test_run_trace_with_our_connector(tmp_path: Path) -> None:
    folder, leaks = _run_traced(tmp_path)
    ray = _check_edge_trace(folder, leaks)
    conn = _records(folder / "connector.trace.jsonl")
    assert any(r.get("method") == "registerConnection" and r.get("dir") == "out" for r in conn)
    [origin] = [r for r in conn if r["kind"] == "origin.request" and r.get("ray") == ray]
    assert origin["target"] == "/probe?x=1" and ["Authorization", "<redacted>"] in origin["headers"]
    assert any(r["kind"] == "origin.response" and r["status"] == 200 and r["ray"] == ray for r in conn)
    text = (folder / "connector.trace.jsonl").read_text()
    for leak in leaks:
        assert leak not in text
    files = [str(folder / "edge.trace.jsonl"), str(folder / "connector.trace.jsonl")]
    show = subprocess.run([sys.executable, "-m", "tunnel_lab", "trace", "show", *files, "--ray", ray],
                          capture_output=True, text=True, timeout=60, check=False)
    assert show.returncode == 0 and "origin.request" in show.stdout and "\x1b[" not in show.stdout
    diagram = subprocess.run([sys.executable, "-m", "tunnel_lab", "trace", "diagram", *files, "--ray", ray,
                              "--svg", str(tmp_path / "d.svg")], capture_output=True, text=True, timeout=60,
                             check=False)
    assert diagram.returncode == 0, diagram.stderr
    assert "Connector->>Origin: GET /probe?x=1 HTTP/1.1" in diagram.stdout
    assert (tmp_path / "d.svg").read_text().startswith("<svg")


def test_run_trace_over_quic(tmp_path: Path) -> None:
    folder, leaks = _run_traced(tmp_path, "--protocol", "quic")
    edge = _records(folder / "edge.trace.jsonl")
    assert any(r.get("method") == "registerConnection" and r["dir"] == "in" and r["transport"] == "quic"
               for r in edge)
    [request] = [r for r in edge if r["kind"] == "eyeball.request"]
    heads = [r for r in edge if r["kind"] == "quic.stream_head" and r.get("ray") == request["ray"]]
    assert {h["message"] for h in heads} == {"ConnectRequest", "ConnectResponse"}
    [connect] = [h for h in heads if h["message"] == "ConnectRequest"]
    assert ["HttpHeader:Cookie", "<redacted>"] in connect["metadata"]
    conn = _records(folder / "connector.trace.jsonl")
    assert any(r["kind"] == "origin.request" and r.get("ray") == request["ray"] for r in conn)
    for name in ("edge.trace.jsonl", "connector.trace.jsonl"):
        text = (folder / name).read_text()
        for leak in leaks:
            assert leak not in text


def test_run_trace_with_cloudflared(tmp_path: Path) -> None:
    binary = os.environ.get("TUNNEL_LAB_CLOUDFLARED")
    if not binary or not Path(binary).exists():
        pytest.skip("set TUNNEL_LAB_CLOUDFLARED=/path/to/cloudflared to trace a session of the real one")
    folder, leaks = _run_traced(tmp_path, "--connector", "cloudflared", "--cloudflared", binary)
    _check_edge_trace(folder, leaks)
    assert not (folder / "connector.trace.jsonl").exists()  # cloudflared writes none: the edge's has it all


async def _wait_for(stream: trio.abc.ReceiveStream, text: bytes) -> None:
    seen = b""
    while text not in seen:
        chunk = await stream.receive_some(4096)
        assert chunk, f"tshark ended before saying {text!r}: {seen!r}"
        seen += chunk


def _has_fin(capture: Path) -> bool:
    argv = ["tshark", "-n", "-r", str(capture), "-Y", "tcp.flags.fin == 1", "-T", "fields",
            "-e", "frame.number"]
    return bool(subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False).stdout.strip())


def _tshark_fields(capture: Path, port: str, *options: str) -> str:
    return subprocess.run(
        # TLS on the tunnel port; HTTP/2 inside is found by tshark's heuristic (the tunnel has no ALPN)
        ["tshark", "-n", "-r", str(capture), "-d", f"tcp.port=={port},tls", "--enable-heuristic", "http2_tls",
         *options, "-Y", "http2", "-T", "fields", "-e", "http2.type", "-e", "http2.header.value"],
        capture_output=True, text=True, timeout=120, check=False).stdout


async def test_a_tunnel_capture_decrypts_with_the_key_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         ) -> None:
    if shutil.which("tshark") is None:
        pytest.skip("tshark is not installed (Debian package tshark)")
    keylog, capture = tmp_path / "keys.log", tmp_path / "tunnel.pcapng"
    monkeypatch.setenv("SSLKEYLOGFILE", str(keylog))  # the lab's components inherit it
    with trio.fail_after(120):
        async with open_lab(datacentres=2, logs=tmp_path / "logs") as lab:
            port = lab.edge.datacentres["LAB1"].rpartition(":")[2]
            tunnel = await lab.create_tunnel("app", hostnames=["app.lab.test"])
            origin = await lab.start_origin("echo")
            tshark = await trio.lowlevel.open_process(
                ["tshark", "-n", "-i", "lo", "-f", f"tcp port {port}", "-w", str(capture)],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            try:
                assert tshark.stderr is not None
                try:
                    await _wait_for(tshark.stderr, b"Capturing on")
                except AssertionError as exc:
                    pytest.skip(f"tshark cannot capture on lo here: {exc}")
                connector = await lab.start_connector(tunnel, url=origin.url, flags=("--protocol", "http2"))
                assert (await lab.request("app.lab.test", "/keylog-probe")).status == 200
                await connector.stop()
                # dumpcap hands packets over in blocks (up to a second late): stop only once the tunnel's
                # closing FIN is in the file, or the request's frames may still be in the kernel's buffer
                with trio.move_on_after(15):
                    while not await trio.to_thread.run_sync(_has_fin, capture):
                        await trio.sleep(0.2)
            finally:
                tshark.send_signal(signal.SIGINT)  # tshark writes out what it captured
                await tshark.wait()
    assert keylog.read_text().count("CLIENT_TRAFFIC_SECRET_0") >= 1
    decrypted = _tshark_fields(capture, port, "-o", f"tls.keylog_file:{keylog}")
    assert "/keylog-probe" in decrypted  # the request's HEADERS, decoded
    types = {line.split("\t")[0] for line in decrypted.splitlines()}
    assert {"1", "0"} <= {t for field in types for t in field.split(",")}  # HEADERS and DATA frames
    # without the key log the same capture shows no HTTP/2 at all
    assert "/keylog-probe" not in _tshark_fields(capture, port)
