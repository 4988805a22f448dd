"""edge.access's pure parts: what reaches the tunnel from an eyeball on a protected hostname, and what the
history records."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tunnel_lab.edge.access import STRIPPED, Verdict, for_history, forward_headers
from tunnel_lab.wire.eyeball import EyeballRequest

names = st.sampled_from([b"cf-access-jwt-assertion", b"Cf-Access-Client-Secret", b"CF-ACCESS-TOKEN",
                         b"cf-access-client-id", b"cf-access-authenticated-user-email", b"x-other",
                         b"cookie"])
fields = st.lists(st.tuples(names, st.binary(min_size=1, max_size=8)), max_size=8)


@given(fields)
def test_protected_requests_carry_only_the_edges_access_fields(eyeball: list) -> None:
    added = [(b"cf-access-jwt-assertion", b"edge-signed")]
    out = forward_headers(eyeball, Verdict(headers=added))
    assert [f for f in out if f[0].lower() in STRIPPED] == added
    kept = [f for f in eyeball if f[0].lower() not in STRIPPED]
    assert [f for f in out if f[0].lower() not in STRIPPED] == kept


@given(fields)
def test_unprotected_requests_are_untouched(eyeball: list) -> None:
    assert forward_headers(eyeball, Verdict()) == eyeball


def test_history_drops_the_query_of_access_paths() -> None:
    def req(target: str) -> EyeballRequest:
        return EyeballRequest(method="GET", target=target, headers=(), scheme="http", client_ip="127.0.0.1",
                              host="a.test")

    assert for_history(req("/cdn-cgi/access/authorized?token=eyJ.x.y&redirect_url=/")).target == \
        "/cdn-cgi/access/authorized"
    assert for_history(req("/search?q=1")).target == "/search?q=1"
