"""wire.session_rpc: the RPC-stream calls (UDP sessions, configuration) between client and server, against
pycapnp's reading of wire/tunnelrpc.capnp, and with bad input."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import uuid
from pathlib import Path
from typing import Any

import capnp
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunnel_lab.wire import registration as reg
from tunnel_lab.wire import rpc
from tunnel_lab.wire import session_rpc as srpc
from tunnel_lab.wire.errors import CapnpError, RpcError

capnp.remove_import_hook()
_CAPNP_DIR = os.path.dirname(capnp.__file__)
rpc_schema: Any = capnp.load(os.path.join(_CAPNP_DIR, "rpc.capnp"), imports=[os.path.dirname(_CAPNP_DIR)])
schema: Any = capnp.load(str(Path(reg.__file__).with_name("tunnelrpc.capnp")))
_SM = schema.SessionManager.schema.methods
_CM = schema.ConfigurationManager.schema.methods

SID = uuid.UUID("11111111-2222-3333-4444-555555555555")
TEXT = st.text(alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=30)
params_strategy = st.builds(
    srpc.RegisterUdpSessionParams,
    session_id=st.builds(uuid.UUID, bytes=st.binary(min_size=16, max_size=16)),
    dst_ip=st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6).filter(lambda ip: ip.ipv4_mapped is None)),
    dst_port=st.integers(0, 0xFFFF),
    close_after_idle_ns=st.integers(0, 1 << 62),
    trace_context=TEXT,
)


def _pair(methods: frozenset[str] = srpc.CLOUDFLARED_SERVER_METHODS
          ) -> tuple[srpc.SessionRpcClient, srpc.SessionRpcServer]:
    return srpc.SessionRpcClient(), srpc.SessionRpcServer(methods)


def _their_messages(data: bytes) -> list[Any]:
    return list(rpc_schema.Message.read_multiple_bytes(data))


def _their_call(client: srpc.SessionRpcClient) -> Any:
    *_, last = _their_messages(client.data_to_send())
    return last.call


def _their_results(server: srpc.SessionRpcServer, method: str, answer: Any) -> Any:
    """Answer a call of `method` with `answer(server, q)` and read the Return's results with pycapnp."""
    interface_id, ordinal = srpc._ORDINALS[method]
    server.receive_data(rpc.encode_bootstrap(0) + rpc.encode_call(1, rpc.PromisedAnswer(0), interface_id,
                                                                  ordinal, _MINIMAL[method]))
    server.data_to_send()
    answer(server, 1)
    (ret,) = _their_messages(server.data_to_send())
    return ret


def _minimal_register(p: Any, i: int) -> None:
    srpc.write_register_udp_session_params(p, i, srpc.RegisterUdpSessionParams(
        session_id=SID, dst_ip=ipaddress.IPv4Address("10.0.0.53"), dst_port=53))


_MINIMAL = {
    "registerUdpSession": _minimal_register,
    "updateConfiguration": lambda p, i: srpc.write_update_configuration_params(p, i, 1, b"{}"),
}


def test_ids_match_the_schema() -> None:
    assert schema.SessionManager.schema.node.id == srpc.SESSION_MANAGER_ID
    assert schema.ConfigurationManager.schema.node.id == srpc.CONFIGURATION_MANAGER_ID
    assert schema.CloudflaredServer.schema.node.id == srpc.CLOUDFLARED_SERVER_ID
    assert list(_SM.keys()) == ["registerUdpSession", "unregisterUdpSession"]
    assert list(_CM.keys()) == ["updateConfiguration"]


@given(params_strategy)
def test_register_params_layout_matches_pycapnp(params: srpc.RegisterUdpSessionParams) -> None:
    client = srpc.SessionRpcClient()
    client.register_udp_session(params)
    call = _their_call(client)
    assert (call.interfaceId, call.methodId) == (srpc.SESSION_MANAGER_ID, 0)
    theirs = call.params.content.as_struct(_SM["registerUdpSession"].param_type)
    assert bytes(theirs.sessionId) == params.session_id.bytes
    assert bytes(theirs.dstIp) == params.dst_ip.packed
    assert theirs.dstPort == params.dst_port
    assert theirs.closeAfterIdleHint == params.close_after_idle_ns
    assert theirs.traceContext == params.trace_context


def test_register_params_written_by_pycapnp_are_read() -> None:
    m = rpc_schema.Message.new_message()
    call = m.init("call")
    call.questionId = 1
    call.interfaceId = srpc.SESSION_MANAGER_ID
    call.methodId = 0
    call.target.importedCap = 0
    theirs = call.params.content.as_struct(_SM["registerUdpSession"].param_type)
    theirs.sessionId = SID.bytes
    theirs.dstIp = bytes(10) + b"\xff\xff" + bytes([10, 0, 0, 53])
    theirs.dstPort = 53
    theirs.closeAfterIdleHint = 30_000_000_000
    server = srpc.SessionRpcServer()
    server.receive_data(rpc.encode_bootstrap(0))
    (event,) = server.receive_data(m.to_bytes())
    # A 16-byte IPv4-mapped address (Go's net.IP form) is IPv4, as cloudflared's To4() makes it.
    assert event == srpc.RegisterUdpSessionCalled(question_id=1, params=srpc.RegisterUdpSessionParams(
        session_id=SID, dst_ip=ipaddress.IPv4Address("10.0.0.53"), dst_port=53,
        close_after_idle_ns=30_000_000_000))


@pytest.mark.parametrize(("error", "spans"), [("", b"\x01\x02"), ("dial udp: refused", b"")])
def test_register_results_layout_matches_pycapnp(error: str, spans: bytes) -> None:
    ret = _their_results(srpc.SessionRpcServer(), "registerUdpSession",
                         lambda s, q: s.answer_register_udp_session(q, error, spans))
    theirs = getattr(ret, "return").results.content.as_struct(_SM["registerUdpSession"].result_type)
    assert theirs.result.err == error
    assert bytes(theirs.result.spans) == spans


def test_update_configuration_layouts_match_pycapnp() -> None:
    client = srpc.SessionRpcClient()
    client.update_configuration(-3, b'{"config":{}}')
    call = _their_call(client)
    assert (call.interfaceId, call.methodId) == (srpc.CONFIGURATION_MANAGER_ID, 0)
    theirs = call.params.content.as_struct(_CM["updateConfiguration"].param_type)
    assert theirs.version == -3 and bytes(theirs.config) == b'{"config":{}}'
    ret = _their_results(srpc.SessionRpcServer(), "updateConfiguration",
                         lambda s, q: s.answer_update_configuration(q, 7, "bad"))
    result = getattr(ret, "return").results.content.as_struct(_CM["updateConfiguration"].result_type).result
    assert result.latestAppliedVersion == 7 and result.err == "bad"


def test_unregister_params_layout_matches_pycapnp() -> None:
    client = srpc.SessionRpcClient()
    client.unregister_udp_session(SID, "idle")
    call = _their_call(client)
    assert (call.interfaceId, call.methodId) == (srpc.SESSION_MANAGER_ID, 1)
    theirs = call.params.content.as_struct(_SM["unregisterUdpSession"].param_type)
    assert bytes(theirs.sessionId) == SID.bytes and theirs.message == "idle"


@given(params_strategy, st.sampled_from(["", "dial udp 10.0.0.1:53: connection refused"]))
def test_register_udp_session_conversation(params: srpc.RegisterUdpSessionParams, error: str) -> None:
    client, server = _pair()
    q = client.register_udp_session(params)
    events = server.receive_data(client.data_to_send())
    assert events == [srpc.RegisterUdpSessionCalled(question_id=events[0].question_id, params=params)]  # type: ignore[union-attr]
    server.answer_register_udp_session(events[0].question_id, error)  # type: ignore[union-attr]
    answered = client.receive_data(server.data_to_send())
    assert answered == [srpc.UdpSessionRegistered(question_id=q, error=error)]
    # the client finishes both questions, then hangs up as Go does
    client.abort()
    assert server.receive_data(client.data_to_send()) == [rpc.RpcAborted("rpc: shutdown")]


def test_unregister_and_configuration_conversations() -> None:
    client, server = _pair()
    q = client.unregister_udp_session(SID, "terminated by edge")
    (event,) = server.receive_data(client.data_to_send())
    assert event == srpc.UnregisterUdpSessionCalled(question_id=event.question_id, session_id=SID,  # type: ignore[union-attr]
                                                    message="terminated by edge")
    server.answer_empty(event.question_id)  # type: ignore[union-attr]
    assert client.receive_data(server.data_to_send()) == [rpc.CallReturned(q, "unregisterUdpSession")]

    q = client.update_configuration(4, b'{"config":{"ingress":[]}}')
    (event,) = server.receive_data(client.data_to_send())
    assert event == srpc.UpdateConfigurationCalled(question_id=event.question_id, version=4,  # type: ignore[union-attr]
                                                   config=b'{"config":{"ingress":[]}}')
    server.answer_update_configuration(event.question_id, 3, "version 4 is invalid")  # type: ignore[union-attr]
    assert client.receive_data(server.data_to_send()) == [
        srpc.ConfigurationUpdated(question_id=q, latest_version=3, error="version 4 is invalid")]


def test_the_edge_session_manager_refuses_configuration_as_unimplemented() -> None:
    client, server = _pair(srpc.SESSION_MANAGER_METHODS)
    q = client.update_configuration(1, b"{}")
    assert server.receive_data(client.data_to_send()) == []
    (event,) = client.receive_data(server.data_to_send())
    assert isinstance(event, rpc.CallFailed) and event.question_id == q
    assert event.reason == "rpc: unimplemented: updateConfiguration"


def test_a_registration_call_on_an_rpc_stream_is_unimplemented() -> None:
    client, server = srpc.SessionRpcClient(), srpc.SessionRpcServer()
    client.register_connection(reg.RegisterConnectionParams(
        auth=reg.TunnelAuth("a", b"s"), tunnel_id=SID, conn_index=0,
        options=reg.ConnectionOptions(client=reg.ClientInfo(b"c", (), "v", "a"), origin_local_ip=b"")))
    assert server.receive_data(client.data_to_send()) == []
    (event,) = client.receive_data(server.data_to_send())
    assert isinstance(event, rpc.CallFailed)
    assert event.reason == f"rpc: unimplemented: interface 0x{reg.REGISTRATION_SERVER_ID:016x} method 0"


def _call_bytes(method: str, write: Any) -> bytes:
    interface_id, ordinal = srpc._ORDINALS[method]
    return rpc.encode_bootstrap(0) + rpc.encode_call(1, rpc.PromisedAnswer(0), interface_id, ordinal, write)


@pytest.mark.parametrize(("method", "write", "reason"), [
    ("registerUdpSession", lambda p, i: p.init_struct(i, 2, 3).set_data(0, b"short"),
     "sessionId: 5 bytes, a session id is a 16-byte UUID"),
    ("registerUdpSession", lambda p, i: _bad_ip(p, i), "dstIp: 5 bytes is not an IP address"),
    ("unregisterUdpSession", lambda p, i: p.init_struct(i, 0, 2).set_data(0, b""),
     "sessionId: 0 bytes"),
])
def test_malformed_params_get_an_exception_and_the_stream_carries_on(method: str, write: Any,
                                                                      reason: str) -> None:
    server = srpc.SessionRpcServer()
    assert server.receive_data(_call_bytes(method, write)) == []
    client = srpc.SessionRpcClient()
    client._questions = {0: rpc._Question("bootstrap"), 1: rpc._Question(method)}  # as if it had asked
    events = client.receive_data(server.data_to_send())
    assert len(events) == 1 and isinstance(events[0], rpc.CallFailed)
    assert reason in events[0].reason and events[0].reason.startswith(f"rpc: bad {method} params:")


def _bad_ip(p: Any, i: int) -> None:
    sb = p.init_struct(i, 2, 3)
    sb.set_data(0, SID.bytes)
    sb.set_data(1, b"\x01\x02\x03\x04\x05")


def test_answers_for_unknown_or_wrong_questions_are_ignored() -> None:
    server = srpc.SessionRpcServer()
    server.answer_register_udp_session(9)
    server.answer_empty(9)
    server.answer_update_configuration(9, 1)
    server.answer_exception(9, "x")
    assert server.data_to_send() == b""


def test_value_checks() -> None:
    with pytest.raises(ValueError, match="dst_port"):
        srpc.RegisterUdpSessionParams(session_id=SID, dst_ip=ipaddress.IPv4Address("1.2.3.4"),
                                      dst_port=1 << 16)
    with pytest.raises(ValueError, match="Int32"):
        srpc.SessionRpcClient().update_configuration(1 << 31, b"")


@given(st.binary(max_size=300))
def test_garbage_is_a_capnp_or_rpc_error(data: bytes) -> None:
    server = srpc.SessionRpcServer()
    with contextlib.suppress(CapnpError, RpcError):
        server.receive_data(data)
