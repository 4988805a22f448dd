"""originRequest.access in our connector: the table of connector/access_jwt.py, with the signing keys
fetched over TLS from a running lab edge's team domain (TUNNEL_LAB_ACCESS_ADDR), key rotation picked up
on an unknown kid, and the answers on a real tunnel stream (TunnelPair)."""

from __future__ import annotations

import base64
import json
import time

import pytest
import trio

from tests.component.test_edge_support import running_edge
from tests.component.tunnel_pair import open_tunnel_pair, request_headers
from tunnel_lab.connector.access_jwt import ADDR_ENV, AccessValidator
from tunnel_lab.connector.settings import AccessConfig, IngressRule, OriginRequestConfig, StatusService
from tunnel_lab.edge.access import gate_of
from tunnel_lab.edge.config import Address
from tunnel_lab.wire import jwt
from tunnel_lab.wire.headers import RESPONSE_META, first_value

ISS = "https://lab.cloudflareaccess.com"
AUD = "a" * 64


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def tokens(key: jwt.SigningKey) -> dict[str, str]:
    now = int(time.time())
    good = {"iss": ISS, "aud": [AUD], "email": "a@b.test", "sub": "s", "iat": now, "exp": now + 300}
    head = _b64(json.dumps({"alg": "none", "kid": key.kid}).encode())
    hs = _b64(json.dumps({"alg": "HS256", "kid": key.kid}).encode())
    body = _b64(json.dumps(good).encode())
    return {
        "good": jwt.sign(good, key),
        "wrong-aud": jwt.sign({**good, "aud": ["other"]}, key),
        "expired": jwt.sign({**good, "exp": now - 10}, key),
        "no-exp": jwt.sign({k: v for k, v in good.items() if k != "exp"}, key),
        "wrong-iss": jwt.sign({**good, "iss": "https://evil.cloudflareaccess.com"}, key),
        "forged": jwt.sign(good, jwt.SigningKey.generate(key.kid)),
        "alg-none": f"{head}.{body}.",
        "hs256": f"{hs}.{body}.c2ln",
        "truncated": jwt.sign(good, key)[:-7],
    }


EXPECTED = {"good": None, "wrong-aud": 403, "expired": 502, "no-exp": 502, "wrong-iss": 502, "forged": 502,
            "alg-none": 502, "hs256": 502, "truncated": 502}


async def test_validator_table_and_key_rotation(tmp_path, monkeypatch):
    with trio.fail_after(30):
        async with running_edge(tmp_path, https_listens=(Address("127.0.0.1", 0),)) as (edge, _nursery):
            monkeypatch.setenv(ADDR_ENV, edge.bound["https"])
            access = gate_of(edge.state).access
            validator = AccessValidator(str(edge.ca_pem_path))
            config = AccessConfig(required=True, team_name="lab", aud_tag=("x", AUD))
            assert (await validator.check([], config)).status == 403  # nothing fetched for that
            for name, token in tokens(access.signing_key()).items():
                refusal = await validator.check([(b"cf-access-jwt-assertion", token.encode())], config)
                assert (refusal.status if refusal else None) == EXPECTED[name], (name, refusal)
            # the 502 reasons say what is wrong, never the token
            refusal = await validator.check([(b"cf-access-jwt-assertion", tokens(access.signing_key())[
                "expired"].encode())], config)
            assert refusal is not None and "expired" in refusal.reason and "eyJ" not in refusal.reason
            # an empty audTag refuses everything
            empty = AccessConfig(required=True, team_name="lab", aud_tag=())
            refusal = await validator.check([(b"Cf-Access-Jwt-Assertion", tokens(access.signing_key())[
                "good"].encode())], empty)
            assert refusal is not None and refusal.status == 403
            # a new key: unknown kid -> the key set is fetched again
            fetched = validator.key_set("lab")._fetched
            access.rotate_keys()
            token = tokens(access.signing_key())["good"]
            assert await validator.check([(b"cf-access-jwt-assertion", token.encode())], config) is None
            assert validator.key_set("lab")._fetched == fetched + 1
            # another team's domain is not served: the fetch fails -> 502
            other = AccessConfig(required=True, team_name="nope", aud_tag=(AUD,))
            refusal = await validator.check([(b"cf-access-jwt-assertion", token.encode())], other)
            assert refusal is not None and refusal.status == 502
            assert "nope.cloudflareaccess.com" in refusal.reason


@pytest.mark.parametrize("case", ["good", "missing", "wrong-aud", "expired"])
async def test_tunnel_stream_answers(tmp_path, monkeypatch, case):
    access_cfg = AccessConfig(required=True, team_name="lab", aud_tag=(AUD,))
    rule = IngressRule(index=0, hostname=None, path=None, service=StatusService(status=204),
                       service_text="http_status:204",
                       origin_request=OriginRequestConfig(access=access_cfg))
    with trio.fail_after(30):
        async with running_edge(tmp_path, https_listens=(Address("127.0.0.1", 0),)) as (edge, _nursery):
            monkeypatch.setenv(ADDR_ENV, edge.bound["https"])
            key = gate_of(edge.state).access.signing_key()
            extra = () if case == "missing" else ((b"Cf-Access-Jwt-Assertion", tokens(key)[case].encode()),)
            async with open_tunnel_pair(tmp_path, (rule,), ca_cert=str(edge.ca_pem_path)) as pair:
                stream = await pair.edge_conn.open_stream(request_headers("GET", "/", extra), end_stream=True)
                head = await stream.response_headers()
                status = int(first_value(head, b":status") or b"0")
                meta = first_value(head, RESPONSE_META)
                _s, _h, body = await _response_rest(stream)
                await stream.release()
    want = {"good": (204, b'{"src":"origin"}'), "missing": (403, b'{"src":"origin"}'),
            "wrong-aud": (403, b'{"src":"origin"}'), "expired": (502, b'{"src":"cloudflared"}')}[case]
    assert (status, meta) == want and body == b""


async def _response_rest(stream):  # type: ignore[no-untyped-def]
    body = bytearray()
    while (item := await stream.receive()) is not None:
        body += item[0]
        await stream.ack(item[1])
    return 0, [], bytes(body)
