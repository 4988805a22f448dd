"""`lab.recorder`'s parser: what an origin received, read from a copy of the bytes sent to it."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from tunnel_lab.lab.recorder import BODY_KEEP, Received, _Parser

TWO = (
    b"GET /a?x=1 HTTP/1.1\r\nHost: app.lab.test\r\nCf-Connecting-Ip: 127.0.0.1\r\n"
    b"X-Dup: 1\r\nx-dup: 2\r\n\r\n"
    b"POST /b HTTP/1.1\r\nHost: app.lab.test\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
)


def parse(*chunks: bytes) -> tuple[list[Received], _Parser, list[bool]]:
    records: list[Received] = []
    parser = _Parser(records)
    heads = [parser.feed(c) for c in chunks]
    return records, parser, heads


def test_requests_on_one_connection_in_order_with_raw_headers() -> None:
    records, _, heads = parse(TWO)
    assert heads == [True]
    assert [(r.seq, r.method, r.target, r.path) for r in records] == [
        (1, "GET", "/a?x=1", "/a"),
        (2, "POST", "/b", "/b"),
    ]
    first, second = records
    assert first.headers[2:] == (("X-Dup", "1"), ("x-dup", "2"))  # wire order and case kept
    assert first.header("cf-connecting-ip") == "127.0.0.1"
    assert first.header("missing") is None
    assert (second.body, second.body_length, second.complete) == (b"abcde", 5, True)


@given(st.lists(st.integers(min_value=1, max_value=len(TWO) - 1), unique=True, max_size=8))
def test_any_split_of_the_bytes_gives_the_same_records(cuts: list[int]) -> None:
    bounds = [0, *sorted(cuts), len(TWO)]
    records, _, heads = parse(*(TWO[a:b] for a, b in itertools.pairwise(bounds)))
    whole, _, _ = parse(TWO)
    assert [(r.method, r.target, r.headers, r.body) for r in records] == [
        (r.method, r.target, r.headers, r.body) for r in whole
    ]
    # feed() is True for the chunks in which a request head ends (the moment a request is in flight).
    first_end = TWO.index(b"\r\n\r\n") + 4
    ends = [first_end, TWO.index(b"\r\n\r\n", first_end) + 4]
    pieces = list(itertools.pairwise(bounds))
    with_an_end = {i for i, (a, b) in enumerate(pieces) for e in ends if a < e <= b}
    assert [i for i, h in enumerate(heads) if h] == sorted(with_an_end)


def test_a_body_cut_short_is_recorded_incomplete_when_the_connection_ends() -> None:
    records, parser, _ = parse(b"PUT /up HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\n12345")
    assert records == []
    parser.closed()
    [record] = records
    assert (record.body, record.body_length, record.complete) == (b"12345", 5, False)


def test_a_large_body_is_counted_whole_and_kept_up_to_the_limit() -> None:
    size = BODY_KEEP + 100
    head = f"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: {size}\r\n\r\n".encode()
    records, _, _ = parse(head, b"x" * size)
    assert (len(records[0].body), records[0].body_length) == (BODY_KEEP, size)


def test_after_a_websocket_upgrade_only_the_upgrade_is_recorded() -> None:
    upgrade = (
        b"GET /chat HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    frame = b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58"  # a masked text frame, "Hello"
    records, parser, _ = parse(upgrade, frame, b"GET / HTTP/1.1\r\n\r\n")
    assert [r.target for r in records] == ["/chat"]
    assert parser.stopped


def test_connection_close_ends_the_parsing_and_garbage_stops_it() -> None:
    records, parser, _ = parse(b"GET /x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\nGET /y HTTP/1.1\r\n")
    assert [r.target for r in records] == ["/x"] and parser.stopped
    records, parser, heads = parse(b"\x16\x03\x01\x02\x00 not http\r\n\r\n")
    assert (records, parser.stopped, heads) == ([], True, [False])
