"""transport.h2 overrides private methods of h2's H2Connection: each is pinned here.

Two kinds of test per override: the source of every h2 method it replaces or wraps is fingerprinted
(an h2 upgrade that touches one fails here: re-read it, adapt the override, update the hash), and the h2
behaviour it works around is shown to still exist (a fix upstream makes that test fail: drop the
override), beside a test that the override does what it claims.
"""

from __future__ import annotations

import hashlib
import inspect

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from hyperframe.frame import DataFrame
from hypothesis import given
from hypothesis import strategies as st

from tunnel_lab.transport.h2 import BAD_CONTENT_LENGTH, StreamProtocolError, TunnelH2Connection

REQUEST = [(b":method", b"POST"), (b":path", b"/"), (b":scheme", b"http"), (b":authority", b"a.test")]

# sha256 (first 16 hex digits) of the h2 4.x source of each method transport.h2 replaces or wraps
PINNED = {
    "_receive_frame": "39b2e16b4fd74ed0",  # replaced: no eager repr(frame)
    "_prepare_for_sending": "6be16b5970454a30",  # replaced: DATA framed into the buffer
    "data_to_send": "d681c42548b1f8cc",  # replaced: no final copy
    "_receive_goaway_frame": "adb9adfae94088c4",  # replaced when keep_streams_after_goaway
    "_receive_data_frame": "09803eef3f564140",  # wrapped: InvalidBodyLengthError
    "_receive_headers_frame": "4a014e7d795a15a5",  # wrapped: content-length errors
    "close_connection": "fe6defce0899d36b",  # send_goaway writes the same frame without the state change
    "_stream_is_closed_by_reset": "b35f7c3063184090",  # called by our _receive_frame
    "_stream_is_closed_by_end": "be0a5cbccfe6677d",  # called by our _receive_frame
}


@pytest.mark.parametrize("name", sorted(PINNED))
def test_the_h2_methods_we_override_are_the_ones_we_read(name: str) -> None:
    source = inspect.getsource(getattr(H2Connection, name))
    assert hashlib.sha256(source.encode()).hexdigest()[:16] == PINNED[name], (
        f"h2 changed H2Connection.{name}: re-read it against transport/h2.py, then update PINNED")


def _client(cls: type[H2Connection] = TunnelH2Connection, **kwargs: object) -> H2Connection:
    conn = cls(H2Configuration(client_side=True, header_encoding=None), **kwargs)  # type: ignore[arg-type]
    conn.initiate_connection()
    return conn


def _server(cls: type[H2Connection] = TunnelH2Connection, **kwargs: object) -> H2Connection:
    config = H2Configuration(client_side=False, header_encoding=None, validate_inbound_headers=False)
    conn = cls(config, **kwargs)  # type: ignore[arg-type]
    conn.initiate_connection()
    return conn


def _pair(client: H2Connection, server: H2Connection) -> None:
    """Exchange prefaces and SETTINGS ACKs."""
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())


# -- DATA framing and data_to_send --------------------------------------------------------------------
sends = st.lists(st.tuples(st.binary(max_size=3000), st.booleans(), st.integers(0, 4), st.booleans()),
                 min_size=1, max_size=6)


def _wire(cls: type[H2Connection], plan: list[tuple[bytes, bool, int, bool]]) -> bytes:
    conn = cls(H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    out = bytes(conn.data_to_send())
    for index, (data, as_view, pad, end) in enumerate(plan):
        stream_id = 1 + 2 * index
        conn.send_headers(stream_id, REQUEST)
        payload = memoryview(b"<" + data + b">")[1:-1] if as_view else data
        conn.send_data(stream_id, payload, end_stream=end, pad_length=pad or None)
        out += bytes(conn.data_to_send())
    return out


@given(sends)
def test_data_frames_are_byte_identical_to_h2s(plan):
    assert _wire(TunnelH2Connection, plan) == _wire(H2Connection, plan)


def test_data_to_send_hands_over_and_empties_the_buffer():
    conn = _client()
    first = conn.data_to_send()
    assert first.startswith(b"PRI * HTTP/2.0")
    assert conn.data_to_send() == b""
    assert not conn.has_data_to_send()  # type: ignore[attr-defined]


def test_h2_keeps_its_outbound_buffer_as_a_bytearray():
    # _prepare_for_sending and data_to_send append to and swap this attribute
    assert isinstance(H2Connection(H2Configuration())._data_to_send, bytearray)


# -- no eager repr ------------------------------------------------------------------------------------
def _count_data_reprs(cls: type[H2Connection], monkeypatch: pytest.MonkeyPatch) -> int:
    calls = []
    original = DataFrame.__repr__
    monkeypatch.setattr(DataFrame, "__repr__", lambda self: calls.append(1) or original(self))
    client, server = _client(), _server(cls)
    _pair(client, server)
    client.send_headers(1, REQUEST)
    client.send_data(1, b"x" * 1000)
    server.receive_data(client.data_to_send())
    return len(calls)


def test_h2_still_formats_every_received_frame(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _count_data_reprs(H2Connection, monkeypatch) == 1


def test_received_frames_are_not_formatted(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _count_data_reprs(TunnelH2Connection, monkeypatch) == 0


def test_h2_is_not_patched_for_the_whole_process() -> None:
    # the connector used to replace `repr` in h2.connection for every connection of the process
    import tunnel_lab.connector.edge_conn
    import tunnel_lab.edge.tunnel  # noqa: F401

    assert "repr" not in vars(h2.connection)


def test_a_reset_stream_still_answers_late_frames_with_rst_stream() -> None:
    client, server = _client(), _server()
    _pair(client, server)
    client.send_headers(1, REQUEST)
    server.receive_data(client.data_to_send())
    server.reset_stream(1, ErrorCodes.CANCEL)
    client.send_data(1, b"late")  # sent before the client saw the reset
    server.data_to_send()
    events = server.receive_data(client.data_to_send())
    assert events == []
    frames = server.data_to_send()
    assert frames[3] == 0x3 and int.from_bytes(frames[5:9], "big") == 1  # RST_STREAM on stream 1


# -- GOAWAY -------------------------------------------------------------------------------------------
def _goaway_then_respond(cls: type[H2Connection], **kwargs: object) -> list[h2.events.Event]:
    """The server sends GOAWAY with stream 1 open; the client then sends stream 1's body."""
    client, server = _client(cls, **kwargs), _server()
    _pair(client, server)
    client.send_headers(1, REQUEST)
    server.receive_data(client.data_to_send())
    server.close_connection(last_stream_id=1)
    events = client.receive_data(server.data_to_send())
    client.send_data(1, b"body", end_stream=True)
    return events


def test_h2_refuses_to_send_after_a_goaway() -> None:
    with pytest.raises(h2.exceptions.ProtocolError):
        _goaway_then_respond(H2Connection)


def test_streams_go_on_after_a_goaway_when_asked() -> None:
    events = _goaway_then_respond(TunnelH2Connection, keep_streams_after_goaway=True)
    [terminated] = events
    assert isinstance(terminated, h2.events.ConnectionTerminated)
    assert terminated.error_code is ErrorCodes.NO_ERROR and terminated.last_stream_id == 1


def test_goaway_closes_as_h2_does_by_default() -> None:
    with pytest.raises(h2.exceptions.ProtocolError):
        _goaway_then_respond(TunnelH2Connection)


def test_send_goaway_writes_h2s_frame_and_keeps_the_connection_open() -> None:
    ours, theirs = _client(), _client(H2Connection)
    ours.data_to_send(), theirs.data_to_send()
    ours.send_goaway(0, last_stream_id=7)  # type: ignore[attr-defined]
    theirs.close_connection(last_stream_id=7)
    assert ours.data_to_send() == theirs.data_to_send()
    ours.send_headers(1, REQUEST)  # still open


# -- content-length errors at stream level ------------------------------------------------------------
def _bad_request(fields: list[tuple[bytes, bytes]], body: bytes | None = None) -> bytes:
    config = h2.config.H2Configuration(client_side=True, validate_outbound_headers=False,
                                       normalize_outbound_headers=False)
    client = h2.connection.H2Connection(config)
    client.initiate_connection()
    client.send_headers(1, [*REQUEST, *fields])
    if body is not None:
        client.send_data(1, body, end_stream=True)
    return client.data_to_send()


@pytest.mark.parametrize("fields", [[(b"content-length", b"six")],
                                    [(b"content-length", b"6"), (b"content-length", b"7")]])
def test_h2_names_a_bad_content_length_as_we_expect(fields: list[tuple[bytes, bytes]]) -> None:
    server = _server(H2Connection)
    with pytest.raises(h2.exceptions.ProtocolError) as caught:
        server.receive_data(_bad_request(fields))
    assert str(caught.value).startswith(BAD_CONTENT_LENGTH)


@pytest.mark.parametrize(("fields", "body"), [
    ([(b"content-length", b"six")], None),
    ([(b"content-length", b"6"), (b"content-length", b"7")], None),
    ([(b"content-length", b"2")], b"too long"),
])
def test_a_bad_content_length_costs_only_its_stream(fields: list[tuple[bytes, bytes]],
                                                    body: bytes | None) -> None:
    server = _server(body_errors_reset_stream=True)
    server.data_to_send()
    events = server.receive_data(_bad_request(fields, body))
    resets = [e for e in events if isinstance(e, StreamProtocolError)]
    assert len(resets) == 1 and resets[0].stream_id == 1 and not resets[0].remote_reset
    assert resets[0].error_code == ErrorCodes.PROTOCOL_ERROR and resets[0].reason
    assert server.state_machine.state is h2.connection.ConnectionState.SERVER_OPEN


def test_without_the_option_a_bad_content_length_is_h2s_connection_error() -> None:
    with pytest.raises(h2.exceptions.InvalidBodyLengthError):
        _server().receive_data(_bad_request([(b"content-length", b"2")], b"too long"))


# -- settings in force at once ------------------------------------------------------------------------
def test_local_settings_count_at_once_and_the_decoder_limit_is_ours() -> None:
    conn = TunnelH2Connection(H2Configuration(client_side=True), local_settings={
        SettingCodes.MAX_FRAME_SIZE: 65536, SettingCodes.MAX_HEADER_LIST_SIZE: 1000},
        decoder_header_list_limit=5000)
    assert conn.max_inbound_frame_size == 65536
    assert conn.local_settings.max_header_list_size == 1000
    assert conn.decoder.max_header_list_size == 5000
