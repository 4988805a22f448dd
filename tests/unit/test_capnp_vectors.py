"""Golden tests: every captured Cap'n Proto message decodes to the capture's `decoded` form; the edge's
Returns re-encode byte for byte; RpcServer and RpcClient replay the captured conversations."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.golden import VECTORS, VECTORS_GO126
from tunnel_lab.wire import rpc
from tunnel_lab.wire.capnp import Message, MessageReader, StructReader, frame_message, unframe
from tunnel_lab.wire.registration import (
    METHOD_NAMES,
    ConnectionDetails,
    RegistrationError,
    read_register_params,
    read_register_results,
    read_update_configuration_params,
)

CAPNP_FILES = [
    *sorted(VECTORS.glob("A01*.json")), *sorted(VECTORS.glob("B01*.json")),
    *sorted(VECTORS.glob("C01*.json")), *sorted(VECTORS.glob("A13*.json")),
    *sorted(VECTORS.glob("B06*.json")), *sorted(VECTORS_GO126.glob("D12b*.json")),
]
EDGE_RETURNS = VECTORS / "capnp-edge-returns.json"
CONNECTION_UUID = uuid.UUID("c0ffee00-1234-4abc-8def-0123456789ab")
C2E = "cloudflared->edge"


def _load(path: Path) -> list[dict[str, Any]]:
    return list(json.loads(path.read_text())["capnp"])


def test_vector_files_are_present() -> None:
    # Six conversation files: if tests/vectors lost one, fail loudly rather than test nothing.
    assert len(CAPNP_FILES) == 6, CAPNP_FILES
    assert EDGE_RETURNS.exists()


# ------------------------------------------------------------------------------------------------
# A readable description in the captures' format, built only from our decoders


def _bytes(b: bytes) -> dict[str, str]:
    return {"bytes_hex": b.hex()}


def _describe_cap_table(payload: rpc.Payload) -> list[dict[str, int]]:
    return [{c.kind: c.id, "attachedFd": c.attached_fd} for c in payload.cap_table]


def _describe_params(method_id: int, payload: rpc.Payload) -> dict[str, Any]:
    if method_id == 0:
        p = read_register_params(payload.struct("params"))
        o = p.options
        return {"auth": {"accountTag": p.auth.account_tag, "tunnelSecret": _bytes(p.auth.tunnel_secret)},
                "tunnelId": _bytes(p.tunnel_id.bytes), "connIndex": p.conn_index,
                "options": {"client": {"clientId": _bytes(o.client.client_id),
                                       "features": list(o.client.features),
                                       "version": o.client.version, "arch": o.client.arch},
                            "originLocalIp": _bytes(o.origin_local_ip), "replaceExisting": o.replace_existing,
                            "compressionQuality": o.compression_quality,
                            "numPreviousAttempts": o.num_previous_attempts}}
    if method_id == 2:
        return {"config": _bytes(read_update_configuration_params(payload.struct("params")))}
    assert payload.content_kind() == "struct"
    return {}


def _describe_results(method: str, payload: rpc.Payload) -> dict[str, Any]:
    if method == "bootstrap":
        return {"capability_index": payload.capability()}
    if method == "registerConnection":
        result = read_register_results(payload.struct("results"))
        if isinstance(result, ConnectionDetails):
            inner: dict[str, Any] = {"connectionDetails": {
                "uuid": _bytes(result.uuid.bytes), "locationName": result.location_name,
                "tunnelIsRemotelyManaged": result.tunnel_is_remotely_managed}}
        else:
            inner = {"error": {"cause": result.cause, "retryAfter": result.retry_after_ns,
                               "shouldRetry": result.should_retry}}
        return {"result": {"result": inner}}
    assert payload.content_kind() == "struct"
    return {}


def describe(root: StructReader, methods: dict[int, str]) -> dict[str, Any]:
    """`methods` maps question ids to method names ("bootstrap" too), to decode Return contents."""
    m = rpc.parse_rpc_message(root)
    if isinstance(m, rpc.BootstrapMessage):
        methods[m.question_id] = "bootstrap"
        return {"which": "bootstrap", "bootstrap": {"questionId": m.question_id}}
    if isinstance(m, rpc.CallMessage):
        method = METHOD_NAMES[m.method_id]
        methods[m.question_id] = method
        target: dict[str, Any] = ({"importedCap": m.target.cap_id} if isinstance(m.target, rpc.ImportedCap)
                                  else {"promisedAnswer": {"questionId": m.target.question_id,
                                                           "transform": list(m.target.transform)}})
        return {"which": "call", "call": {
            "questionId": m.question_id, "target": target, "interfaceId": f"0x{m.interface_id:016x}",
            "methodId": m.method_id, "method": method,
            "sendResultsTo": ["caller", "yourself", "thirdParty"][m.send_results_to],
            "allowThirdPartyTailCall": m.allow_third_party_tail_call,
            "noPromisePipelining": m.no_promise_pipelining, "onlyPromisePipeline": m.only_promise_pipeline,
            "capTable": _describe_cap_table(m.params), "params": _describe_params(m.method_id, m.params)}}
    if isinstance(m, rpc.ReturnMessage):
        assert m.kind == "results" and m.results is not None
        word = m.results.holder.pointer_word(0)
        return {"which": "return", "return": {
            "answerId": m.answer_id, "releaseParamCaps": m.release_param_caps,
            "noFinishNeeded": m.no_finish_needed, "which": m.kind,
            "capTable": _describe_cap_table(m.results), "content_pointer_word_hex": f"{word:016x}",
            "content": _describe_results(methods[m.answer_id], m.results)}}
    if isinstance(m, rpc.FinishMessage):
        return {"which": "finish", "finish": {
            "questionId": m.question_id, "releaseResultCaps": m.release_result_caps,
            "requireEarlyCancellationWorkaround": m.require_early_cancellation_workaround}}
    if isinstance(m, rpc.ReleaseMessage):
        return {"which": "release", "release": {"id": m.id, "referenceCount": m.reference_count}}
    if isinstance(m, rpc.AbortMessage):
        exc = root.struct(0, "abort")
        return {"which": "abort", "abort": {
            "reason": m.exception.reason, "obsoleteIsCallersFault": exc.flag(0),
            "obsoleteDurability": exc.u16(2), "type": m.exception.type.name.lower()}}
    raise AssertionError(f"unexpected message {m}")


def _strip_readable(value: Any) -> Any:
    """Drop the captures' convenience copies (`ascii`, `params_config_text`): bytes_hex is authoritative."""
    if isinstance(value, dict):
        return {k: _strip_readable(v) for k, v in value.items() if k not in ("ascii", "params_config_text")}
    if isinstance(value, list):
        return [_strip_readable(v) for v in value]
    return value


def _root(hex_text: str) -> StructReader:
    return Message(unframe(bytes.fromhex(hex_text))).root()


@pytest.mark.parametrize("path", CAPNP_FILES, ids=lambda p: p.name)
def test_every_captured_message_decodes_as_recorded(path: Path) -> None:
    methods: dict[int, str] = {}
    messages = _load(path)
    assert messages
    for entry in messages:
        data = bytes.fromhex(entry["hex"])
        assert len(data) == entry["length"]
        got = describe(_root(entry["hex"]), methods)
        assert got == _strip_readable(entry["decoded"]), entry["direction"]


def test_config_text_matches_the_readable_copy() -> None:
    entry = next(e for e in _load(VECTORS / "A01-control-stream-register.json")
                 if e["decoded"].get("call", {}).get("methodId") == 2)
    call = rpc.parse_rpc_message(_root(entry["hex"]))
    assert isinstance(call, rpc.CallMessage)
    config = read_update_configuration_params(call.params.struct("params"))
    assert config.decode() == entry["decoded"]["call"]["params_config_text"]
    assert json.loads(config)["ingress"][0]["service"] == "http://127.0.0.1:8080"


EDGE_KIND_METHOD = {"bootstrap-capability": "bootstrap",
                    "registerConnection-details": "registerConnection",
                    "registerConnection-error": "registerConnection",
                    "empty-results": "updateLocalConfiguration"}


def _edge_returns() -> list[dict[str, Any]]:
    return list(json.loads(EDGE_RETURNS.read_text())["messages"])


@pytest.mark.parametrize("entry", _edge_returns(), ids=lambda e: e["kind"])
def test_edge_returns_decode_and_reencode_byte_exact(entry: dict[str, Any]) -> None:
    data = bytes.fromhex(entry["hex"])
    assert [w for w in entry["words_hex"]] == [data[i:i + 8].hex() for i in range(0, len(data), 8)]
    answer_id = entry["decoded"]["return"]["answerId"]
    method = EDGE_KIND_METHOD[entry["kind"]]
    assert describe(_root(entry["hex"]), {answer_id: method}) == entry["decoded"]
    if entry["kind"] == "bootstrap-capability":
        ours = rpc.encode_bootstrap_return(answer_id)
    elif entry["kind"] == "empty-results":
        ours = rpc.encode_return_results(answer_id, None)
    else:
        m = rpc.parse_rpc_message(_root(entry["hex"]))
        assert isinstance(m, rpc.ReturnMessage) and m.results is not None
        result = read_register_results(m.results.struct("results"))
        expected = (ConnectionDetails(CONNECTION_UUID, "LAB", False) if entry["kind"].endswith("details")
                    else RegistrationError("vectors: test rejection"))
        assert result == expected
        ours = rpc.encode_return_results(answer_id, lambda p, i: rpc.write_register_results(p, i, result))
    assert ours.hex() == entry["hex"]


def test_edge_return_encoders_match_appendix_a() -> None:
    # A registerConnection answer from a separate go1.26 capture (another uuid), kept inline as captured.
    appendix = ("0000000012000000000000000100010003000000000000000000000002000100010000000100000000000000"
                "0000000000000000000002000400000000000100250000000700000000000000010001000100000000000000"
                "0000000001000200000000000000000005000000820000000900000022000000fa4352748d764f788d3ccb67"
                "f5cf7dc54c414200000000000000000001000100")
    details = ConnectionDetails(uuid.UUID("fa435274-8d76-4f78-8d3c-cb67f5cf7dc5"), "LAB", False)
    ours = rpc.encode_return_results(1, lambda p, i: rpc.write_register_results(p, i, details))
    assert ours.hex() == appendix


# ------------------------------------------------------------------------------------------------
# Replaying the conversations


def _split(data: bytes) -> list[bytes]:
    reader = MessageReader()
    reader.feed(data)
    out = []
    while (segments := reader.next_message()) is not None:
        out.append(frame_message(segments))
    assert reader.buffered == 0
    return out


def _decoded_stream(data: bytes, methods: dict[int, str]) -> list[dict[str, Any]]:
    reader = MessageReader()
    reader.feed(data)
    out = []
    while (segments := reader.next_message()) is not None:
        out.append(describe(Message(segments).root(), methods))
    return out


def _serve(server: rpc.RpcServer, data: bytes) -> list[rpc.ServerEvent]:
    events = server.receive_data(data)
    for event in events:
        if isinstance(event, rpc.RegisterConnectionCalled):
            server.answer_registration(event.question_id, ConnectionDetails(CONNECTION_UUID, "LAB", False))
        elif isinstance(event, rpc.UpdateLocalConfigurationCalled | rpc.UnregisterConnectionCalled):
            server.answer_empty(event.question_id)
    return events


@pytest.mark.parametrize("path", [p for p in CAPNP_FILES if p.name[:3] in ("A01", "B01", "D12")],
                         ids=lambda p: p.name)
def test_rpc_server_answers_like_the_capture(path: Path) -> None:
    """Feed the connector's bytes in capture order; our answers are byte-identical to what worked."""
    server = rpc.RpcServer()
    kinds = []
    for entry in _load(path):
        data = bytes.fromhex(entry["hex"])
        if entry["direction"] == C2E:
            kinds += [type(e).__name__ for e in _serve(server, data)]
        else:
            assert server.data_to_send().hex() == entry["hex"]
    assert server.data_to_send() == b""
    assert kinds == ["RegisterConnectionCalled", "UpdateLocalConfigurationCalled"]


def test_rpc_server_handles_pipelined_messages_in_one_read() -> None:
    """Bootstrap and the pipelined call in one read; then everything that followed the answers."""
    entries = _load(VECTORS_GO126 / "D12b-control-stream-register.json")
    c2e = [bytes.fromhex(e["hex"]) for e in entries if e["direction"] == C2E]
    server = rpc.RpcServer()
    events = _serve(server, c2e[0] + c2e[1])
    assert [type(e) for e in events] == [rpc.RegisterConnectionCalled]
    register = events[0]
    assert isinstance(register, rpc.RegisterConnectionCalled)
    assert register.question_id == 1
    assert register.params.tunnel_id == uuid.UUID("6ff42ae2-765d-4adf-8112-31c55c1551ef")
    assert register.params.options.client.version == "2026.8.2"
    # Both Finishes and the next call (the trailing Finish waits for our answer, as in reality).
    events = _serve(server, b"".join(c2e[2:-1]))
    assert [type(e) for e in events] == [rpc.UpdateLocalConfigurationCalled]
    assert _serve(server, c2e[-1]) == []
    expected = [bytes.fromhex(e["hex"]) for e in entries if e["direction"] != C2E]
    assert _split(server.data_to_send()) == expected


def test_rpc_server_byte_by_byte() -> None:
    entries = _load(VECTORS / "A01-control-stream-register.json")
    stream = b"".join(bytes.fromhex(e["hex"]) for e in entries if e["direction"] == C2E)
    server = rpc.RpcServer()
    events = []
    for i in range(len(stream)):
        events += _serve(server, stream[i:i + 1])
    assert [type(e) for e in events] == [rpc.RegisterConnectionCalled, rpc.UpdateLocalConfigurationCalled]


@pytest.mark.parametrize("path", [VECTORS / "A13-sigterm-unregister-answered.json",
                                  VECTORS / "B06-sigterm-unregister-not-answered.json"], ids=lambda p: p.name)
def test_rpc_server_unregister_and_teardown(path: Path) -> None:
    server = rpc.RpcServer()
    # Bring the conversation to the registered state first (the shutdown files start after it).
    setup = _load(VECTORS / "A01-control-stream-register.json")
    for entry in setup:
        if entry["direction"] == C2E:
            _serve(server, bytes.fromhex(entry["hex"]))
    server.data_to_send()
    events: list[rpc.ServerEvent] = []
    answered = path.name.startswith("A13")
    for entry in _load(path):
        data = bytes.fromhex(entry["hex"])
        if entry["direction"] == C2E:
            new = server.receive_data(data)
            for event in new:
                if isinstance(event, rpc.UnregisterConnectionCalled) and answered:
                    server.answer_empty(event.question_id)
            events += new
        else:
            assert server.data_to_send().hex() == entry["hex"]
    assert [type(e) for e in events] == [rpc.UnregisterConnectionCalled, rpc.RpcAborted]
    assert events[-1] == rpc.RpcAborted("rpc: shutdown")
    # B06: the call was given up (Finish releaseResultCaps=true); a late answer must not be sent.
    unregister = events[0]
    assert isinstance(unregister, rpc.UnregisterConnectionCalled)
    server.answer_empty(unregister.question_id)
    assert server.data_to_send() == b""


def _client_script(path: Path) -> list[dict[str, Any]]:
    return [e for e in _load(path) if e["direction"] == C2E]


@pytest.mark.parametrize("path", [p for p in CAPNP_FILES if p.name[:3] in ("A01", "B01", "C01", "D12")],
                         ids=lambda p: p.name)
def test_rpc_client_speaks_like_cloudflared(path: Path) -> None:
    """Drive RpcClient with the same inputs cloudflared had; its bytes decode equal to cloudflared's."""
    entries = _load(path)
    register_call = rpc.parse_rpc_message(_root(entries[2]["hex"]))
    assert isinstance(register_call, rpc.CallMessage)
    params = read_register_params(register_call.params.struct("params"))
    client = rpc.RpcClient()
    sent = bytearray()
    events: list[rpc.ClientEvent] = []
    assert client.register_connection(params) == 1
    for entry in entries[1:]:
        if entry["direction"] == C2E:
            decoded = entry["decoded"]
            if decoded["which"] == "call" and decoded["call"]["methodId"] == 2:
                config = bytes.fromhex(decoded["call"]["params"]["config"]["bytes_hex"])
                assert client.update_local_configuration(config) == decoded["call"]["questionId"]
            elif decoded["which"] == "abort":
                client.abort(decoded["abort"]["reason"])
            continue
        sent += client.data_to_send()
        events += client.receive_data(bytes.fromhex(entry["hex"]))
    sent += client.data_to_send()
    expected_bytes = b"".join(bytes.fromhex(e["hex"]) for e in entries if e["direction"] == C2E)
    ours, theirs = _decoded_stream(bytes(sent), {}), _decoded_stream(expected_bytes, {})
    assert ours == theirs
    # The layout is even byte-identical to Go's (same allocation order) for the same feature order.
    assert bytes(sent) == expected_bytes
    if path.name.startswith("C01"):
        assert events == [rpc.RegistrationAnswered(1, RegistrationError("vectors: test rejection"))]
    else:
        assert events == [rpc.RegistrationAnswered(1, ConnectionDetails(CONNECTION_UUID, "LAB", False)),
                          rpc.CallReturned(1, "updateLocalConfiguration")]


def _registered_client() -> rpc.RpcClient:
    """A client that has sent A01's Bootstrap and registerConnection and taken the edge's answers."""
    client = rpc.RpcClient()
    setup = _load(VECTORS / "A01-control-stream-register.json")
    register_call = rpc.parse_rpc_message(_root(setup[2]["hex"]))
    assert isinstance(register_call, rpc.CallMessage)
    client.register_connection(read_register_params(register_call.params.struct("params")))
    for entry in setup[:4]:
        if entry["direction"] != C2E:
            client.receive_data(bytes.fromhex(entry["hex"]))
    client.data_to_send()
    return client


def test_rpc_client_unregister_and_shutdown_like_cloudflared() -> None:
    """A13 + B06: unregister on importedCap 0 with the reused id 1, Finish, Release, Abort."""
    client = _registered_client()
    a13 = _load(VECTORS / "A13-sigterm-unregister-answered.json")
    q = client.unregister_connection()
    assert q == 1
    assert client.data_to_send().hex() == a13[0]["hex"]
    assert client.receive_data(bytes.fromhex(a13[1]["hex"])) == [rpc.CallReturned(1, "unregisterConnection")]
    assert client.data_to_send().hex() == a13[2]["hex"]
    client.abort()
    c01 = _load(VECTORS / "C01-register-rejected-with-connection-error.json")
    # We always Release the bootstrap capability before the Abort (cloudflared does so racily).
    assert client.data_to_send().hex() == c01[-2]["hex"] + c01[-1]["hex"]


def test_rpc_client_gives_up_like_b06() -> None:
    client = _registered_client()
    b06 = _load(VECTORS / "B06-sigterm-unregister-not-answered.json")
    q = client.unregister_connection()
    assert client.data_to_send().hex() == b06[0]["hex"]
    client.cancel(q)
    client.abort()
    assert client.data_to_send() == b"".join(bytes.fromhex(e["hex"]) for e in b06[1:])
