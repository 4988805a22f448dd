"""connector.management's decisions: tokens, client events, filters and log lines (no I/O)."""

from __future__ import annotations

import base64
import json
import logging

import pytest
import trio

from tunnel_lab.connector import management as m


def b64(doc: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(doc).encode()).decode().rstrip("=")


def jwt(claims: object, alg: str = "ES256") -> str:
    return f"{b64({'alg': alg, 'typ': 'JWT'})}.{b64(claims)}.c2ln"


CLAIMS = {"tun": {"id": "t-1", "account_tag": "acct"}, "actor": {"id": "me", "support": False}, "iss": "lab"}


def test_a_well_formed_token_is_read_without_its_signature() -> None:
    assert m.parse_management_token(jwt(CLAIMS)) == m.TokenClaims("t-1", "acct", "me", "lab")


@pytest.mark.parametrize(
    ("token", "message"),
    [
        ("abc", "three parts"),
        (jwt(CLAIMS, alg="HS256"), 'unexpected signature algorithm "HS256"'),
        (jwt(CLAIMS, alg="none"), "unexpected signature algorithm"),
        (jwt({"tun": {"id": "t"}, "actor": {"id": "me"}}), "invalid management token format provided"),
        (jwt({"tun": {"id": "t", "account_tag": "a"}}), "invalid management token format provided"),
        (jwt([1, 2]), "claims are not an object"),
        ("!!.!!.!!", "malformed jwt"),
    ],
)
def test_bad_tokens(token: str, message: str) -> None:
    with pytest.raises(m.ManagementError, match=message):
        m.parse_management_token(token)


def test_client_events() -> None:
    assert m.parse_client_event('{"type":"stop_streaming"}') == m.ClientEvent("stop_streaming")
    assert m.parse_client_event('{"type":"start_streaming"}') == m.ClientEvent("start_streaming", None)
    event = m.parse_client_event(
        json.dumps(
            {
                "type": "start_streaming",
                "filters": {"events": ["http", "tcp"], "level": "warn", "sampling": 1.5},
            }
        )
    )
    assert event.filters == m.Filters(level=2, events=(1, 2), sampling=1.0)


@pytest.mark.parametrize(
    ("message", "text"),
    [
        (b"{}", "invalid message type was provided"),
        ("{}", "invalid message type was provided"),
        ('{"type":"bogus"}', "invalid client message type was provided: bogus"),
        ('{"type":"start_streaming","filters":{"level":"loud"}}', "unable to unmarshal LogLevel"),
        ('{"type":"start_streaming","filters":{"events":["smtp"]}}', "unable to unmarshal LogEventType"),
        ("not json", "Expecting value"),
    ],
)
def test_bad_client_events(message: str | bytes, text: str) -> None:
    with pytest.raises(m.ManagementError, match=text):
        m.parse_client_event(message)


def test_filters() -> None:
    assert m.Filters().allows(0, 3)
    assert not m.Filters(level=1).allows(0, 0) and m.Filters(level=1).allows(3, 0)
    assert not m.Filters(events=(1,)).allows(3, 0) and m.Filters(events=(1,)).allows(3, 1)
    half = m.Filters(sampling=0.5)
    assert half.allows(1, 0, draw=0.2) and not half.allows(1, 0, draw=0.9)


def test_log_lines_as_cloudflared_sends_them() -> None:
    level, event, doc = m.log_event(
        created=0,
        levelno=logging.INFO,
        message="Registered tunnel connection connIndex=0 event=0 location=LAB1",
    )
    assert (level, event) == (1, 0)
    assert doc == {
        "time": "1970-01-01T00:00:00Z",
        "level": "info",
        "message": "Registered tunnel connection",
        "fields": {"connIndex": 0, "location": "LAB1"},
    }
    # an error field makes it an error; event 1 is http; debug and cloudflared are left out (omitempty)
    level, event, doc = m.log_event(created=0, levelno=logging.INFO, message='x error="boom" event=1')
    assert (level, doc["level"], doc["event"]) == (3, "error", "http")
    _, _, doc = m.log_event(created=0, levelno=logging.DEBUG, message="quiet")
    assert doc == {"time": "1970-01-01T00:00:00Z", "message": "quiet"}
    assert json.loads(m.logs_message([doc])) == {"type": "logs", "logs": [doc]}


def test_a_session_keeps_thirty_lines_and_drops_the_rest() -> None:
    session = m.Session(actor_id="me", filters=m.Filters(level=1))
    session.insert(1, 0, {"message": "before listening"})  # not active yet: dropped
    session.active = True
    session.insert(0, 0, {"message": "debug"})  # below the filter's level
    for n in range(m.LOG_WINDOW + 5):
        session.insert(1, 0, {"message": f"line {n}"})
    assert session.receive is not None
    got = []
    while True:
        try:
            got.append(session.receive.receive_nowait())
        except trio.WouldBlock:
            break
    assert [g["message"] for g in got] == [f"line {n}" for n in range(m.LOG_WINDOW)]


def test_the_root_logger_goes_down_to_debug_only_while_a_session_wants_it() -> None:
    root = logging.getLogger()
    saved_level, saved_handlers = root.level, list(root.handlers)
    console = logging.NullHandler()
    root.handlers[:] = [console]
    root.setLevel(logging.INFO)
    try:
        hub = m.ManagementHub()
        picky = m.Session(actor_id="a", filters=m.Filters(level=1))
        hub.listen(picky)
        assert root.level == logging.INFO
        everything = m.Session(actor_id="b")
        hub.listen(everything)
        assert root.level == logging.DEBUG and console.level == logging.INFO  # the console stays at info
        hub.remove(everything)
        assert root.level == logging.INFO and console.level == logging.NOTSET
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
