"""RpcServer and RpcClient behaviour beyond the captured happy paths, and the two talking to each other."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunnel_lab.wire import registration as reg
from tunnel_lab.wire import rpc
from tunnel_lab.wire.capnp import MessageBuilder, MessageReader
from tunnel_lab.wire.errors import CapnpError, RpcError

PARAMS = reg.RegisterConnectionParams(
    auth=reg.TunnelAuth("0123456789abcdef0123456789abcdef", bytes(range(32))),
    tunnel_id=uuid.UUID("11111111-2222-4333-8444-555555555555"),
    conn_index=2,
    options=reg.ConnectionOptions(
        client=reg.ClientInfo(
            b"\x07" * 16, ("serialized_headers", "allow_remote_config"), "2026.8.2", "linux_amd64"
        ),
        origin_local_ip=reg.origin_local_ip_bytes("127.0.0.1"),
        num_previous_attempts=3,
    ),
)
DETAILS = reg.ConnectionDetails(uuid.UUID("c0ffee00-1234-4abc-8def-0123456789ab"), "LAB1", False)


def decode_all(data: bytes) -> list[rpc.RpcMessage]:
    reader = MessageReader()
    reader.feed(data)
    out = []
    while (segments := reader.next_message()) is not None:
        out.append(rpc.decode_rpc_message(segments))
    assert reader.buffered == 0
    return out


def register_call(q: int, target: rpc.Target) -> bytes:
    return rpc.encode_call(
        q, target, reg.REGISTRATION_SERVER_ID, 0, lambda b, i: reg.write_register_params(b, i, PARAMS)
    )


IMPORT0 = rpc.ImportedCap(0)


def empty_call(
    q: int, method: int, target: rpc.Target = IMPORT0, interface: int = reg.REGISTRATION_SERVER_ID
) -> bytes:
    return rpc.encode_call(q, target, interface, method, None)


def bootstrapped_server() -> rpc.RpcServer:
    server = rpc.RpcServer()
    assert server.receive_data(rpc.encode_bootstrap(0)) == []
    assert server.data_to_send() == rpc.encode_bootstrap_return(0)
    return server


def only_exception(data: bytes, q: int) -> rpc.RpcException:
    [message] = decode_all(data)
    assert isinstance(message, rpc.ReturnMessage) and message.answer_id == q and message.kind == "exception"
    assert message.exception is not None
    return message.exception


# ------------------------------------------------------------------------------------------------
# Server


def test_server_accepts_calls_on_the_promise_and_on_the_import() -> None:
    server = bootstrapped_server()
    assert server.receive_data(register_call(1, rpc.PromisedAnswer(0))) == [
        rpc.RegisterConnectionCalled(1, PARAMS)
    ]
    server.answer_registration(1, DETAILS)
    server.receive_data(rpc.encode_finish(0) + rpc.encode_finish(1))
    assert server.receive_data(register_call(1, rpc.ImportedCap(0))) == [
        rpc.RegisterConnectionCalled(1, PARAMS)
    ]
    server.answer_registration(1, reg.RegistrationError("EDUPCONN", should_retry=True))
    [first, second] = decode_all(server.data_to_send())
    assert isinstance(first, rpc.ReturnMessage) and isinstance(second, rpc.ReturnMessage)
    assert first.results is not None and second.results is not None
    assert reg.read_register_results(first.results.struct("r")) == DETAILS
    assert reg.read_register_results(second.results.struct("r")) == reg.RegistrationError("EDUPCONN", 0, True)


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        (rpc.ImportedCap(5), "unknown capability 5"),
        (rpc.PromisedAnswer(9), "unknown question 9"),
        (rpc.PromisedAnswer(0, (0,)), "no pointer fields"),
    ],
)
def test_server_call_on_unknown_target_gets_an_exception(target: rpc.Target, reason: str) -> None:
    server = bootstrapped_server()
    assert server.receive_data(register_call(1, target)) == []
    assert reason in only_exception(server.data_to_send(), 1).reason
    # The conversation carries on, and the question id is free again after Finish.
    server.receive_data(rpc.encode_finish(1))
    assert server.receive_data(register_call(1, rpc.ImportedCap(0))) == [
        rpc.RegisterConnectionCalled(1, PARAMS)
    ]


def test_server_call_before_bootstrap_and_on_a_call_answer() -> None:
    server = rpc.RpcServer()
    server.receive_data(empty_call(1, 1))
    assert "unknown capability 0" in only_exception(server.data_to_send(), 1).reason
    server = bootstrapped_server()
    server.receive_data(empty_call(1, 1))
    assert server.receive_data(empty_call(2, 1, rpc.PromisedAnswer(1))) == []
    assert "unknown question 1" in only_exception(server.data_to_send(), 2).reason


@pytest.mark.parametrize(
    ("interface", "method"),
    [(reg.REGISTRATION_SERVER_ID, 3), (reg.TUNNEL_SERVER_ID, 0), (0x839445A59FB01686, 0)],
)
def test_server_unknown_method_is_unimplemented(interface: int, method: int) -> None:
    server = bootstrapped_server()
    assert server.receive_data(empty_call(1, method, interface=interface)) == []
    exception = only_exception(server.data_to_send(), 1)
    assert exception.type == rpc.ExceptionType.UNIMPLEMENTED and "unimplemented" in exception.reason


def test_server_send_results_elsewhere_is_refused() -> None:
    server = bootstrapped_server()
    data = bytearray(empty_call(1, 1))
    # Call data word 0 bytes 6-7 (sendResultsTo tag) sit at framing 8 + root 8 + Message 16 + 6.
    data[8 + 8 + 16 + 6] = 1
    assert server.receive_data(bytes(data)) == []
    assert only_exception(server.data_to_send(), 1).type == rpc.ExceptionType.UNIMPLEMENTED


def test_server_bad_params_answer_an_exception_naming_the_field() -> None:
    server = bootstrapped_server()

    def short_id(b: object, i: int) -> None:
        from tunnel_lab.wire.capnp import StructBuilder

        assert isinstance(b, StructBuilder)
        b.init_struct(i, 1, 3).set_data(1, b"abc")

    assert (
        server.receive_data(rpc.encode_call(1, rpc.ImportedCap(0), reg.REGISTRATION_SERVER_ID, 0, short_id))
        == []
    )
    assert "tunnelId: 3 bytes" in only_exception(server.data_to_send(), 1).reason


def test_server_question_reuse_before_finish_is_a_protocol_error() -> None:
    server = bootstrapped_server()
    server.receive_data(register_call(1, rpc.PromisedAnswer(0)))
    with pytest.raises(RpcError, match="question 1"):
        server.receive_data(empty_call(1, 1))
    server = bootstrapped_server()
    with pytest.raises(RpcError, match="question 0"):
        server.receive_data(rpc.encode_bootstrap(0))


def test_server_ignores_answers_for_finished_or_mismatched_questions() -> None:
    server = bootstrapped_server()
    server.receive_data(register_call(1, rpc.PromisedAnswer(0)))
    server.answer_empty(1)  # wrong kind of answer for registerConnection: ignored
    assert server.data_to_send() == b""
    server.receive_data(rpc.encode_finish(1, release_result_caps=True))  # the connector gave up
    server.answer_registration(1, DETAILS)
    server.answer_exception(1, "late")
    server.answer_empty(77)
    assert server.data_to_send() == b""
    server.receive_data(empty_call(1, 1))
    server.answer_registration(1, DETAILS)  # the reused id is now an unregister: not answered by this
    assert server.data_to_send() == b""
    server.answer_exception(1, "no thanks")
    assert only_exception(server.data_to_send(), 1).reason == "no thanks"
    server.answer_empty(1)  # answered already
    assert server.data_to_send() == b""
    with pytest.raises(TypeError):
        server.answer_registration(1, "details")  # type: ignore[arg-type]


def test_server_release_of_the_bootstrap_cap() -> None:
    server = bootstrapped_server()
    server.receive_data(rpc.encode_finish(0) + rpc.encode_release(0, 1) + rpc.encode_release(3, 1))
    server.receive_data(empty_call(1, 1))
    assert "unknown capability 0" in only_exception(server.data_to_send(), 1).reason
    # Finish with releaseResultCaps=true releases the bootstrap reference too.
    server = bootstrapped_server()
    server.receive_data(rpc.encode_finish(0, release_result_caps=True) + empty_call(1, 1))
    assert "unknown capability 0" in only_exception(server.data_to_send(), 1).reason


def test_server_abort_ends_the_conversation() -> None:
    server = bootstrapped_server()
    server.receive_data(empty_call(1, 1))
    events = server.receive_data(rpc.encode_abort("rpc: shutdown") + b"garbage that is never read")
    assert events == [rpc.RpcAborted("rpc: shutdown")]
    assert server.aborted
    assert server.receive_data(rpc.encode_bootstrap(5)) == []
    server.answer_empty(1)
    assert server.data_to_send() == b""


def test_server_echoes_messages_outside_the_subset_as_unimplemented() -> None:
    msg = MessageBuilder()
    root = msg.init_root(1, 1)
    root.set_u16(0, rpc.TAG_RESOLVE)
    resolve = root.init_struct(0, 1, 1)
    resolve.set_u32(0, 42)
    resolve.set_u16(4, 1)
    resolve.init_struct(0, 1, 2).set_text(0, "boom")
    server = bootstrapped_server()
    assert server.receive_data(msg.to_bytes()) == []
    [echo] = decode_all(server.data_to_send())
    assert isinstance(echo, rpc.UnimplementedMessage)
    assert isinstance(echo.echoed, rpc.OtherMessage) and echo.echoed.tag == rpc.TAG_RESOLVE
    echoed_resolve = echo.echoed.root.struct(0, "resolve")
    assert echoed_resolve.u32(0) == 42 and echoed_resolve.struct(0, "e").text(0, "reason") == "boom"


def test_server_ignores_unimplemented_and_rejects_returns() -> None:
    server = bootstrapped_server()
    msg = MessageBuilder()
    msg.init_root(1, 1)  # tag 0 = unimplemented, with a null echo
    assert server.receive_data(msg.to_bytes()) == []
    assert server.data_to_send() == b""
    with pytest.raises(RpcError, match="Return for question 4"):
        server.receive_data(rpc.encode_return_results(4, None))


def test_server_garbage_raises_capnp_error() -> None:
    with pytest.raises(CapnpError):
        rpc.RpcServer().receive_data(bytes.fromhex("00000000020000000000000002000100") + bytes(8))
    with pytest.raises(CapnpError, match="segments"):
        rpc.RpcServer().receive_data(b"\xff\xff\xff\xff")


# ------------------------------------------------------------------------------------------------
# Client


def registered_client(export_id: int = 0) -> rpc.RpcClient:
    client = rpc.RpcClient()
    assert client.register_connection(PARAMS) == 1
    client.data_to_send()
    assert client.receive_data(rpc.encode_bootstrap_return(0, export_id)) == []
    events = client.receive_data(
        rpc.encode_return_results(1, lambda b, i: reg.write_register_results(b, i, DETAILS))
    )
    assert events == [rpc.RegistrationAnswered(1, DETAILS)]
    assert client.data_to_send() == rpc.encode_finish(0) + rpc.encode_finish(1)
    return client


def test_client_register_queues_bootstrap_and_pipelined_call() -> None:
    client = rpc.RpcClient()
    assert client.register_connection(PARAMS) == 1
    boot, call = decode_all(client.data_to_send())
    assert boot == rpc.BootstrapMessage(0)
    assert isinstance(call, rpc.CallMessage)
    assert (call.question_id, call.target, call.interface_id, call.method_id) == (
        1,
        rpc.PromisedAnswer(0),
        reg.REGISTRATION_SERVER_ID,
        0,
    )
    assert reg.read_register_params(call.params.struct("p")) == PARAMS
    # A second call before the bootstrap answer is pipelined too, with a fresh id.
    assert client.unregister_connection() == 2
    [call2] = decode_all(client.data_to_send())
    assert isinstance(call2, rpc.CallMessage) and call2.target == rpc.PromisedAnswer(0)


def test_client_uses_the_exported_id_and_reuses_question_ids_lifo() -> None:
    client = registered_client(export_id=7)
    assert client.update_local_configuration(b"{}") == 1
    [call] = decode_all(client.data_to_send())
    assert isinstance(call, rpc.CallMessage) and call.target == rpc.ImportedCap(7)
    assert client.unregister_connection() == 0  # 1 is busy; 0 is the other free id
    client.data_to_send()
    assert client.receive_data(rpc.encode_return_results(0, None)) == [
        rpc.CallReturned(0, "unregisterConnection")
    ]
    assert client.receive_data(rpc.encode_return_results(1, None)) == [
        rpc.CallReturned(1, "updateLocalConfiguration")
    ]
    assert client.data_to_send() == rpc.encode_finish(0) + rpc.encode_finish(1)
    assert client.unregister_connection() == 1


def test_client_exception_returns_become_call_failed() -> None:
    client = rpc.RpcClient()
    client.register_connection(PARAMS)
    client.data_to_send()
    client.receive_data(rpc.encode_bootstrap_return(0))
    events = client.receive_data(rpc.encode_return_exception(1, "Unauthorized: Invalid tunnel secret"))
    assert events == [rpc.CallFailed(1, "registerConnection", "Unauthorized: Invalid tunnel secret")]
    assert client.data_to_send() == rpc.encode_finish(0) + rpc.encode_finish(1)


def test_client_malformed_details_fail_the_registration() -> None:
    client = rpc.RpcClient()
    client.register_connection(PARAMS)
    client.receive_data(rpc.encode_bootstrap_return(0))

    def bad(b: object, i: int) -> None:
        from tunnel_lab.wire.capnp import StructBuilder

        assert isinstance(b, StructBuilder)
        response = b.init_struct(i, 0, 1).init_struct(0, 1, 1)
        response.set_u16(0, 1)
        response.init_struct(0, 1, 2).set_data(0, b"\x01" * 15)

    [event] = client.receive_data(rpc.encode_return_results(1, bad))
    assert isinstance(event, rpc.CallFailed) and event.method == "registerConnection"
    assert "uuid: 15 bytes" in event.reason


@pytest.mark.parametrize(
    "answer",
    [
        rpc.encode_return_exception(0, "rpc: no bootstrap interface"),
        rpc.encode_return_results(0, None),
        rpc.encode_return_results(0, lambda b, i: b.set_capability(i, 3)),
    ],
)
def test_client_bootstrap_failures(answer: bytes) -> None:
    client = rpc.RpcClient()
    client.register_connection(PARAMS)
    [event] = client.receive_data(answer)
    assert isinstance(event, rpc.CallFailed) and event.question_id == 0 and event.method == "bootstrap"


def test_client_canceled_and_unexpected_returns() -> None:
    client = registered_client()
    q = client.unregister_connection()
    client.data_to_send()
    client.cancel(q)
    client.cancel(q)  # once only
    assert client.data_to_send() == rpc.encode_finish(q, release_result_caps=True)
    # The late answer is swallowed without a second Finish, and only then is the id free again.
    assert client.receive_data(rpc.encode_return_results(q, None)) == []
    assert client.data_to_send() == b""
    assert client.update_local_configuration(b"x") == q
    msg = MessageBuilder()
    root = msg.init_root(1, 1)
    root.set_u16(0, rpc.TAG_RETURN)
    ret = root.init_struct(0, 2, 1)
    ret.set_u32(0, q)
    ret.set_u16(6, 2)  # canceled
    assert client.receive_data(msg.to_bytes()) == [
        rpc.CallFailed(q, "updateLocalConfiguration", "rpc: unexpected Return kind canceled")
    ]
    with pytest.raises(RpcError, match="not outstanding"):
        client.receive_data(rpc.encode_return_results(9, None))


def test_client_refuses_the_edges_bootstrap_and_calls() -> None:
    client = registered_client()
    assert client.receive_data(rpc.encode_bootstrap(0) + empty_call(1, 1)) == []
    [a, b] = decode_all(client.data_to_send())
    assert isinstance(a, rpc.ReturnMessage) and a.exception == rpc.RpcException("rpc: no bootstrap interface")
    assert isinstance(b, rpc.ReturnMessage) and b.kind == "exception" and b.answer_id == 1
    with pytest.raises(RpcError, match="question 0"):
        client.receive_data(rpc.encode_bootstrap(0))
    assert client.receive_data(rpc.encode_finish(0) + rpc.encode_release(0, 1)) == []
    assert client.receive_data(rpc.encode_bootstrap(0)) == []


def test_client_unimplemented_echo_of_a_call_fails_it() -> None:
    client = registered_client()
    q = client.update_local_configuration(b"{}")
    sent = client.data_to_send()
    # The edge echoes our own Call back as `unimplemented` (it did not understand it).
    from tunnel_lab.wire.capnp import Message, unframe

    echo = rpc.encode_unimplemented(Message(unframe(sent)).root())
    assert client.receive_data(echo) == [
        rpc.CallFailed(q, "updateLocalConfiguration", "rpc: the edge does not implement this call")
    ]
    assert client.data_to_send() == b""  # no Finish for an echoed call
    assert client.update_local_configuration(b"{}") == q  # and its id is free again


def test_client_abort_and_edge_abort() -> None:
    client = rpc.RpcClient()
    client.abort("bye")
    assert client.data_to_send() == rpc.encode_abort("bye")  # no capability yet: no Release
    client.abort()
    assert client.data_to_send() == b""
    with pytest.raises(RpcError, match="aborted"):
        client.register_connection(PARAMS)
    client = registered_client()
    assert client.receive_data(rpc.encode_abort("edge going away")) == [rpc.RpcAborted("edge going away")]
    assert client.aborted
    client.abort()
    assert client.data_to_send() == b""


# ------------------------------------------------------------------------------------------------
# A pair of real state machines talking (h11's ConnectionPair idea)


TEXT = st.text(alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=30)


@given(
    params=st.builds(
        reg.RegisterConnectionParams,
        auth=st.builds(reg.TunnelAuth, account_tag=TEXT, tunnel_secret=st.binary(max_size=40)),
        tunnel_id=st.uuids(),
        conn_index=st.integers(0, 255),
        options=st.builds(
            reg.ConnectionOptions,
            client=st.builds(
                reg.ClientInfo,
                client_id=st.binary(max_size=16),
                features=st.lists(TEXT, max_size=5).map(tuple),
                version=TEXT,
                arch=TEXT,
            ),
            origin_local_ip=st.binary(max_size=16),
        ),
    ),
    answer=st.one_of(
        st.builds(
            reg.ConnectionDetails,
            uuid=st.uuids(),
            location_name=TEXT,
            tunnel_is_remotely_managed=st.booleans(),
        ),
        st.builds(
            reg.RegistrationError,
            cause=TEXT,
            retry_after_ns=st.integers(0, 10**12),
            should_retry=st.booleans(),
        ),
    ),
    config=st.binary(max_size=200),
    chunk=st.integers(1, 64),
)
def test_client_and_server_converse(
    params: reg.RegisterConnectionParams, answer: reg.RegistrationResult, config: bytes, chunk: int
) -> None:
    client, server = rpc.RpcClient(), rpc.RpcServer()

    def to_server() -> list[rpc.ServerEvent]:
        data = client.data_to_send()
        events: list[rpc.ServerEvent] = []
        for i in range(0, len(data), chunk):
            events += server.receive_data(data[i : i + chunk])
        return events

    q = client.register_connection(params)
    [called] = to_server()
    assert called == rpc.RegisterConnectionCalled(q, params)
    server.answer_registration(q, answer)
    assert client.receive_data(server.data_to_send()) == [rpc.RegistrationAnswered(q, answer)]
    assert to_server() == []  # the Finishes
    q = client.update_local_configuration(config)
    assert to_server() == [rpc.UpdateLocalConfigurationCalled(q, config)]
    server.answer_empty(q)
    assert client.receive_data(server.data_to_send()) == [rpc.CallReturned(q, "updateLocalConfiguration")]
    q = client.unregister_connection()
    assert to_server() == [rpc.UnregisterConnectionCalled(q)]
    server.answer_exception(q, "nope")
    assert client.receive_data(server.data_to_send()) == [rpc.CallFailed(q, "unregisterConnection", "nope")]
    client.abort()
    assert to_server() == [rpc.RpcAborted("rpc: shutdown")]


# ------------------------------------------------------------------------------------------------
# The protocol's rules, one by one (rpc.capnp: Bootstrap, Call, Return, Finish, Release)


def test_server_errors_say_what_was_wrong_exactly() -> None:
    server = bootstrapped_server()
    with pytest.raises(RpcError, match=r"^rpc: Bootstrap reuses question 0 before it was finished$"):
        server.receive_data(rpc.encode_bootstrap(0))
    server = bootstrapped_server()
    server.receive_data(empty_call(1, 1))
    with pytest.raises(RpcError, match=r"^rpc: Call reuses question 1 before it was finished$"):
        server.receive_data(empty_call(1, 2))
    server = bootstrapped_server()
    server.receive_data(register_call(1, rpc.PromisedAnswer(0, (0,))))
    assert only_exception(server.data_to_send(), 1) == rpc.RpcException(
        "rpc: the bootstrap answer has no pointer fields to transform")
    with pytest.raises(TypeError, match=r"^result must be ConnectionDetails or RegistrationError$"):
        server.answer_registration(1, "details")  # type: ignore[arg-type]
    assert server.aborted is False


@pytest.mark.parametrize(("interface", "method", "reason"), [
    (reg.REGISTRATION_SERVER_ID, 9, "rpc: unimplemented: method 9"),
    (0x1234, 0, "rpc: unimplemented: interface 0x0000000000001234 method 0"),
])
def test_server_unimplemented_reason_names_interface_and_method(interface: int, method: int,
                                                                reason: str) -> None:
    server = bootstrapped_server()
    server.receive_data(empty_call(1, method, interface=interface))
    assert only_exception(server.data_to_send(), 1) == rpc.RpcException(
        reason, rpc.ExceptionType.UNIMPLEMENTED)


def test_server_refuses_send_results_elsewhere_exactly() -> None:
    server = bootstrapped_server()
    data = bytearray(empty_call(1, 1))
    data[8 + 8 + 16 + 6] = 1  # Call.sendResultsTo: yourself
    server.receive_data(bytes(data))
    assert only_exception(server.data_to_send(), 1) == rpc.RpcException(
        "rpc: only sendResultsTo.caller is supported", rpc.ExceptionType.UNIMPLEMENTED)


def _far_params(method: int) -> bytes:
    """A call whose params struct is a far pointer to a segment the message does not have."""
    def params(b: object, i: int) -> None:
        from tunnel_lab.wire.capnp import StructBuilder

        assert isinstance(b, StructBuilder)
        b._msg._put_word(b._ptr(i), 2 | (9 << 32))

    return rpc.encode_call(1, IMPORT0, reg.REGISTRATION_SERVER_ID, method, params)


def test_server_bad_params_reason_names_the_method_and_the_field() -> None:
    server = bootstrapped_server()
    server.receive_data(_far_params(0))
    assert only_exception(server.data_to_send(), 1).reason == (
        "rpc: bad registerConnection params: capnp pointer registerConnection.params: "
        "far pointer to segment 9, message has 1")
    server.receive_data(rpc.encode_finish(1))
    server.receive_data(_far_params(reg.METHOD_UPDATE_LOCAL_CONFIGURATION))
    assert only_exception(server.data_to_send(), 1).reason == (
        "rpc: bad updateLocalConfiguration params: capnp pointer updateLocalConfiguration.params: "
        "far pointer to segment 9, message has 1")
    server.receive_data(rpc.encode_finish(1))

    def bad_config(b: object, i: int) -> None:
        from tunnel_lab.wire.capnp import StructBuilder

        assert isinstance(b, StructBuilder)
        b.init_struct(i, 0, 1).set_text_list(0, ["not data"])

    server.receive_data(rpc.encode_call(1, IMPORT0, reg.REGISTRATION_SERVER_ID,
                                        reg.METHOD_UPDATE_LOCAL_CONFIGURATION, bad_config))
    assert only_exception(server.data_to_send(), 1).reason == (
        "rpc: bad updateLocalConfiguration params: capnp pointer updateLocalConfiguration.params.config: "
        "expected a byte list, got a pointer list")


def test_server_answers_a_refused_call_once() -> None:
    """A call the server refused itself has had its Return: a later answer from the shell is dropped."""
    server = bootstrapped_server()
    server.receive_data(_far_params(0))
    only_exception(server.data_to_send(), 1)
    server.answer_exception(1, "again")
    server.answer_registration(1, DETAILS)
    assert server.data_to_send() == b""


def test_server_counts_one_reference_per_bootstrap_answer() -> None:
    """Each Bootstrap answer hands out a reference to export 0; Finish(releaseResultCaps) of that
    question or Release(0, n) drops them; the export is gone only when none is left."""
    server = bootstrapped_server()
    server.receive_data(rpc.encode_bootstrap(1))
    assert server.data_to_send() == rpc.encode_bootstrap_return(1)
    server.receive_data(rpc.encode_finish(0, release_result_caps=True))
    assert server.receive_data(empty_call(2, 1)) == [rpc.UnregisterConnectionCalled(2)]
    server.receive_data(rpc.encode_finish(2) + rpc.encode_finish(1, release_result_caps=True))
    server.receive_data(empty_call(2, 1))
    assert only_exception(server.data_to_send(), 2) == rpc.RpcException("rpc: call on unknown capability 0")


def test_server_release_counts_only_for_its_own_export() -> None:
    server = bootstrapped_server()
    server.receive_data(rpc.encode_bootstrap(1))
    server.data_to_send()
    server.receive_data(rpc.encode_release(5, 2))  # not an export of ours: nothing changes
    assert server.receive_data(empty_call(2, 1)) == [rpc.UnregisterConnectionCalled(2)]
    server.receive_data(rpc.encode_finish(2) + rpc.encode_release(0, 1))
    assert server.receive_data(empty_call(2, 1)) == [rpc.UnregisterConnectionCalled(2)]
    server.receive_data(rpc.encode_finish(2) + rpc.encode_release(0, 1))
    server.receive_data(empty_call(2, 1))
    assert only_exception(server.data_to_send(), 2) == rpc.RpcException("rpc: call on unknown capability 0")


def _client_with_pending_bootstrap() -> rpc.RpcClient:
    client = rpc.RpcClient()
    assert client.register_connection(PARAMS) == 1
    client.data_to_send()
    return client


def _bootstrap_answer(index: int, table: tuple[rpc.CapDescriptor, ...]) -> bytes:
    return rpc.encode_return_results(0, lambda b, i: b.set_capability(i, index), table)


@pytest.mark.parametrize(("answer", "reason"), [
    (rpc.encode_return_results(0, lambda b, i: None), "rpc: the bootstrap answer holds no capability"),
    (rpc.encode_return_results(0, None), "rpc: malformed answer: capnp pointer Payload.content: "
     "expected a capability pointer, got a struct pointer"),
    # capability #1 of a one-entry capTable
    (_bootstrap_answer(1, (rpc.CapDescriptor("senderHosted", 0),)),
     "rpc: the bootstrap answer holds no capability"),
    (_bootstrap_answer(0, (rpc.CapDescriptor("receiverHosted", 4),)),
     "rpc: bootstrap capability of kind receiverHosted"),
])
def test_client_bootstrap_failure_reasons(answer: bytes, reason: str) -> None:
    client = _client_with_pending_bootstrap()
    assert client.receive_data(answer) == [rpc.CallFailed(0, "bootstrap", reason)]


def test_client_bootstrap_content_errors_fail_the_bootstrap() -> None:
    client = _client_with_pending_bootstrap()

    def far(b: object, i: int) -> None:
        from tunnel_lab.wire.capnp import StructBuilder

        assert isinstance(b, StructBuilder)
        b._msg._put_word(b._ptr(i), 2 | (9 << 32))

    assert client.receive_data(rpc.encode_return_results(0, far)) == [rpc.CallFailed(
        0, "bootstrap", "rpc: malformed answer: capnp pointer Payload.content: far pointer to segment 9, "
        "message has 1")]


def test_client_calls_a_sender_promise_like_an_import() -> None:
    client = _client_with_pending_bootstrap()
    assert client.receive_data(_bootstrap_answer(0, (rpc.CapDescriptor("senderPromise", 6),))) == []
    client.data_to_send()
    q = client.unregister_connection()
    [call] = decode_all(client.data_to_send())
    assert isinstance(call, rpc.CallMessage) and (call.question_id, call.target) == (q, rpc.ImportedCap(6))


def test_client_asks_for_the_bootstrap_again_after_it_failed() -> None:
    client = _client_with_pending_bootstrap()
    client.receive_data(rpc.encode_return_exception(0, "not now"))
    client.receive_data(rpc.encode_return_exception(1, "not now"))
    client.data_to_send()
    q = client.register_connection(PARAMS)
    boot, call = decode_all(client.data_to_send())
    assert isinstance(boot, rpc.BootstrapMessage) and isinstance(call, rpc.CallMessage)
    assert call.target == rpc.PromisedAnswer(boot.question_id) and q != boot.question_id


def test_client_keeps_pipelining_on_a_pending_bootstrap_when_a_call_returns_first() -> None:
    client = _client_with_pending_bootstrap()
    client.receive_data(rpc.encode_return_exception(1, "refused"))
    client.data_to_send()
    q = client.update_local_configuration(b"{}")
    [call] = decode_all(client.data_to_send())  # no second Bootstrap: question 0 is still pending
    assert isinstance(call, rpc.CallMessage) and (call.question_id, call.target) == (q, rpc.PromisedAnswer(0))


def test_client_refusals_of_the_edges_questions_say_which() -> None:
    client = registered_client()
    client.receive_data(rpc.encode_bootstrap(0) + empty_call(1, 1))
    a, b = decode_all(client.data_to_send())
    assert isinstance(a, rpc.ReturnMessage) and a.exception == rpc.RpcException("rpc: no bootstrap interface")
    assert isinstance(b, rpc.ReturnMessage) and b.exception == rpc.RpcException(
        "rpc: call on a capability the connector never exported")


def test_client_finishes_every_return_unless_told_no_finish_is_needed() -> None:
    client = _client_with_pending_bootstrap()
    client.receive_data(rpc.encode_bootstrap_return(0))
    assert client.data_to_send() == rpc.encode_finish(0, release_result_caps=False)
    # noFinishNeeded (Return bit 33): the edge has already forgotten the question; no Finish goes out
    msg = MessageBuilder()
    root = msg.init_root(1, 1)
    root.set_u16(0, rpc.TAG_RETURN)
    ret = root.init_struct(0, 2, 1)
    ret.set_u32(0, 1)
    ret.set_bool(33, True)
    ret.set_u16(6, 1)  # exception
    ret.init_struct(0, 1, 1).set_text(0, "refused")
    assert client.receive_data(msg.to_bytes()) == [rpc.CallFailed(1, "registerConnection", "refused")]
    assert client.data_to_send() == b""
    assert client.update_local_configuration(b"{}") == 1  # the id is free all the same


def test_client_malformed_registration_results_name_the_field() -> None:
    client = _client_with_pending_bootstrap()
    client.receive_data(rpc.encode_bootstrap_return(0))

    def far(b: object, i: int) -> None:
        from tunnel_lab.wire.capnp import StructBuilder

        assert isinstance(b, StructBuilder)
        b._msg._put_word(b._ptr(i), 2 | (9 << 32))

    assert client.receive_data(rpc.encode_return_results(1, far)) == [rpc.CallFailed(
        1, "registerConnection", "rpc: malformed answer: capnp pointer registerConnection.results: "
        "far pointer to segment 9, message has 1")]


def test_client_after_abort_says_so() -> None:
    client = rpc.RpcClient()
    assert client.aborted is False
    client.abort()
    with pytest.raises(RpcError, match=r"^rpc: the RPC connection was aborted$"):
        client.unregister_connection()
