"""Hostile input: arbitrary and mutated bytes only ever raise the project's ProtocolError family."""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Callable
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.golden import VECTORS, VECTORS_GO126
from tunnel_lab.wire import registration as reg
from tunnel_lab.wire import rpc
from tunnel_lab.wire.capnp import Message, MessageBuilder, unframe
from tunnel_lab.wire.errors import ProtocolError

FILES = [
    "A01-control-stream-register.json",
    "B01-control-stream-register-ingress-config.json",
    "C01-register-rejected-with-connection-error.json",
    "A13-sigterm-unregister-answered.json",
    "B06-sigterm-unregister-not-answered.json",
]


def _messages() -> tuple[list[bytes], list[bytes]]:
    c2e: list[bytes] = []
    e2c: list[bytes] = []
    paths = [VECTORS / f for f in FILES] + [VECTORS_GO126 / "D12b-control-stream-register.json"]
    for path in paths:
        for entry in json.loads(path.read_text())["capnp"]:
            data = bytes.fromhex(entry["hex"])
            (c2e if entry["direction"] == "cloudflared->edge" else e2c).append(data)
    return c2e, e2c


C2E, E2C = _messages()
PARAMS = reg.RegisterConnectionParams(
    reg.TunnelAuth("tag", b"secret"),
    uuid.UUID(int=5),
    0,
    reg.ConnectionOptions(reg.ClientInfo(b"\x01" * 16, ("a",), "v", "linux_amd64"), bytes(16)),
)


def mutate(data: bytes, edits: list[tuple[int, int]], keep_framing: bool) -> bytes:
    out = bytearray(data)
    start = 8 if keep_framing else 0
    for position, value in edits:
        if len(out) > start:
            out[start + position % (len(out) - start)] = value
    return bytes(out)


EDITS = st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=6)


def _answer_everything(server: rpc.RpcServer, events: list[rpc.ServerEvent]) -> None:
    for event in events:
        if isinstance(event, rpc.RegisterConnectionCalled):
            server.answer_registration(event.question_id, reg.ConnectionDetails(uuid.UUID(int=1), "LAB"))
        elif isinstance(event, rpc.UpdateLocalConfigurationCalled | rpc.UnregisterConnectionCalled):
            server.answer_empty(event.question_id)


def _server_feed(chunks: list[bytes]) -> None:
    server = rpc.RpcServer(max_message_bytes=1 << 16)
    try:
        for chunk in chunks:
            _answer_everything(server, server.receive_data(chunk))
            server.data_to_send()
    except ProtocolError:
        pass


def _client_feed(chunks: list[bytes]) -> None:
    client = rpc.RpcClient(max_message_bytes=1 << 16)
    client.register_connection(PARAMS)
    try:
        for chunk in chunks:
            for event in client.receive_data(chunk):
                assert isinstance(
                    event, rpc.RegistrationAnswered | rpc.CallReturned | rpc.CallFailed | rpc.RpcAborted
                )
            client.data_to_send()
        client.update_local_configuration(b"{}")
        client.abort()
    except ProtocolError:
        pass


@given(st.binary(max_size=400))
def test_random_bytes_into_the_server(data: bytes) -> None:
    _server_feed([data])
    _server_feed([C2E[0], data])


@given(st.binary(max_size=400))
def test_random_bytes_into_the_client(data: bytes) -> None:
    _client_feed([data])
    _client_feed([E2C[0], data])


@settings(max_examples=400)
@given(st.sampled_from(range(len(C2E))), EDITS, st.booleans())
def test_mutated_connector_messages_into_the_server(
    index: int, edits: list[tuple[int, int]], keep_framing: bool
) -> None:
    _server_feed([C2E[0], mutate(C2E[index], edits, keep_framing)])


@settings(max_examples=400)
@given(st.sampled_from(range(len(E2C))), EDITS, st.booleans())
def test_mutated_edge_messages_into_the_client(
    index: int, edits: list[tuple[int, int]], keep_framing: bool
) -> None:
    _client_feed(
        [
            mutate(E2C[0], edits, keep_framing) if index % 2 else E2C[0],
            mutate(E2C[index], edits, keep_framing),
        ]
    )


DECODERS: list[Callable[[bytes], Any]] = [
    reg.decode_tunnel_auth,
    reg.decode_client_info,
    reg.decode_connection_options,
    reg.decode_register_params,
    reg.decode_connection_details,
    reg.decode_registration_error,
    reg.decode_connection_response,
    reg.decode_register_results,
    reg.decode_update_configuration_params,
    lambda data: rpc.decode_rpc_message(unframe(data)),
]


def _valid_encodings() -> list[bytes]:
    details = reg.ConnectionDetails(uuid.UUID(int=3), "LAB", True)
    return [
        reg.encode_register_params(PARAMS),
        reg.encode_register_results(details),
        reg.encode_register_results(reg.RegistrationError("x", 5, True)),
        reg.encode_client_info(PARAMS.options.client),
        *C2E[:3],
        *E2C[:4],
    ]


VALID = _valid_encodings()


@settings(max_examples=400)
@given(st.sampled_from(range(len(DECODERS))), st.sampled_from(range(len(VALID))), EDITS, st.booleans())
def test_every_decoder_on_mutated_input(
    decoder: int, index: int, edits: list[tuple[int, int]], keep_framing: bool
) -> None:
    with contextlib.suppress(ProtocolError):
        DECODERS[decoder](mutate(VALID[index], edits, keep_framing))


@given(st.sampled_from(range(len(DECODERS))), st.binary(max_size=200))
def test_every_decoder_on_random_input(decoder: int, data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        DECODERS[decoder](data)


@given(st.lists(st.binary(min_size=8, max_size=8), min_size=1, max_size=30).map(b"".join))
def test_unimplemented_echo_of_arbitrary_structs(segment: bytes) -> None:
    # Whatever the peer sent, echoing it back either works or is a ProtocolError.
    try:
        root = Message([segment]).root()
        echo = rpc.encode_unimplemented(root)
    except ProtocolError:
        return
    message = rpc.decode_rpc_message(unframe(echo))
    assert isinstance(message, rpc.UnimplementedMessage)


def test_echo_of_a_real_message_round_trips() -> None:
    msg = MessageBuilder()
    root = msg.init_root(1, 1)
    root.set_u16(0, rpc.TAG_DISEMBARGO)
    root.init_struct(0, 1, 1).init_struct(0, 1, 1).set_u32(0, 7)
    echo = rpc.decode_rpc_message(unframe(rpc.encode_unimplemented(Message(msg.segments()).root())))
    assert isinstance(echo, rpc.UnimplementedMessage) and isinstance(echo.echoed, rpc.OtherMessage)
    assert echo.echoed.tag == rpc.TAG_DISEMBARGO
    assert echo.echoed.root.struct(0, "d").struct(0, "t").u32(0) == 7
