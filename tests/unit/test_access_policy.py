"""wire.access_policy: validation errors name the rule; the decision follows Cloudflare's order."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunnel_lab.wire.access_policy import Identity, decide, parse_app, parse_policy
from tunnel_lab.wire.errors import ConfigError


def pol(decision: str, *include: dict, name: str = "p", **extra: object) -> dict:
    return {"name": name, "decision": decision, "include": list(include), **extra}


def policies(*bodies: dict) -> list:
    return [parse_policy(b)[0] for b in bodies]


ALICE = Identity(ip="127.0.0.1", email="alice@example.test")
MALLORY = Identity(ip="127.0.0.1", email="mallory@evil.test")
ANON = Identity(ip="127.0.0.1")
TOKEN = Identity(ip="127.0.0.1", service_token_id="tok1")


def test_allow_by_email_and_domain() -> None:
    ps = policies(pol("allow", {"email": {"email": "Alice@Example.test"}}))
    assert decide(ps, ALICE)[0] == "allow"
    assert decide(ps, MALLORY) == ("deny", None)
    ps = policies(pol("allow", {"email_domain": {"domain": "example.test"}}))
    assert decide(ps, ALICE)[0] == "allow"
    assert decide(ps, MALLORY)[0] == "deny"


def test_deny_beats_allow_and_bypass_beats_all() -> None:
    ps = policies(pol("allow", {"everyone": {}}, name="all"),
                  pol("deny", {"email": {"email": "mallory@evil.test"}}, name="no-mallory"))
    assert decide(ps, ALICE)[0] == "allow"
    decision, which = decide(ps, MALLORY)
    assert decision == "deny" and which is not None and which.name == "no-mallory"
    ps = policies(pol("deny", {"everyone": {}}), pol("bypass", {"ip": {"ip": "127.0.0.0/8"}}))
    assert decide(ps, MALLORY)[0] == "bypass"
    assert decide(ps, ANON)[0] == "bypass"
    assert decide(ps, Identity(ip="10.1.1.1", email="a@b.test"))[0] == "deny"


def test_anonymous_meets_only_bypass() -> None:
    ps = policies(pol("allow", {"everyone": {}}))
    assert decide(ps, ANON) == ("deny", None)


def test_service_tokens() -> None:
    ps = policies(pol("non_identity", {"service_token": {"token_id": "tok1"}}))
    assert decide(ps, TOKEN)[0] == "non_identity"
    assert decide(ps, Identity(ip="127.0.0.1", service_token_id="tok2"))[0] == "deny"
    ps = policies(pol("non_identity", {"any_valid_service_token": {}}))
    assert decide(ps, TOKEN)[0] == "non_identity"
    assert decide(ps, ALICE)[0] == "deny"  # a user is not a service token
    # allow policies do not admit a service token
    assert decide(policies(pol("allow", {"everyone": {}})), TOKEN)[0] == "deny"


def test_require_and_exclude() -> None:
    ps = policies(pol("allow", {"everyone": {}}, require=[{"ip": {"ip": "127.0.0.0/8"}}],
                      exclude=[{"email": {"email": "mallory@evil.test"}}]))
    assert decide(ps, ALICE)[0] == "allow"
    assert decide(ps, MALLORY)[0] == "deny"
    assert decide(ps, Identity(ip="::1", email="alice@example.test"))[0] == "deny"


@pytest.mark.parametrize(("body", "message"), [
    ("x", "policy: must be an object"),
    ({"decision": "allow"}, "policy.name: must be a non-empty string"),
    (pol("permit", {"everyone": {}}), "policy 'p'.decision: 'permit' is not one of"),
    (pol("allow"), "policy 'p'.include: needs at least one rule"),
    (pol("allow", {"emial": {"email": "a@b"}}), "policy 'p'.include[0]: unknown rule 'emial'"),
    (pol("allow", {"email": {"email": "nobody"}}), "policy 'p'.include[0].email.email: 'nobody' is not"),
    (pol("allow", {"ip": {"ip": "10.0.0.300/8"}}), "policy 'p'.include[0].ip.ip: '10.0.0.300/8' is not"),
    (pol("allow", {"everyone": {}}, exclude=[{"everyone": {"x": 1}}]),
     "policy 'p'.exclude[0].everyone: takes"),
    (pol("allow", {"everyone": {}}, require="x"), "policy 'p'.require: must be a list"),
    (pol("allow", {"everyone": {}}, precedence="1"), "policy 'p'.precedence: must be an integer"),
    (pol("allow", {"everyone": {}}, colour="red"), "unknown field(s) colour"),
    (pol("allow", {"email": {}, "ip": {}}), "exactly one of"),
])
def test_malformed_policy_names_rule(body: object, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_policy(body)
    assert message in str(info.value)


def test_app_parsing() -> None:
    host, path, ps, doc = parse_app({"name": "a", "domain": "App.Example.test/admin/",
                                     "policies": [pol("allow", {"everyone": {}})]})
    assert (host, path, len(ps)) == ("app.example.test", "/admin", 1)
    assert doc["domain"] == "app.example.test/admin"
    with pytest.raises(ConfigError, match=r"application 'a' policies\[0\] 'p'.include\[0\]: unknown rule"):
        parse_app({"name": "a", "domain": "h.test", "policies": [pol("allow", {"nope": {}})]})
    with pytest.raises(ConfigError, match="self_hosted"):
        parse_app({"name": "a", "domain": "h.test", "type": "saas"})
    with pytest.raises(ConfigError, match="session_duration"):
        parse_app({"name": "a", "domain": "h.test", "session_duration": "forever"})


rules = st.sampled_from([{"everyone": {}}, {"email": {"email": "alice@example.test"}},
                         {"email_domain": {"domain": "evil.test"}}, {"ip": {"ip": "127.0.0.0/8"}},
                         {"service_token": {"token_id": "tok1"}}, {"any_valid_service_token": {}}])
bodies = st.builds(lambda d, inc, exc, req: pol(d, *inc, exclude=exc, require=req),
                   st.sampled_from(["allow", "deny", "bypass", "non_identity"]),
                   st.lists(rules, min_size=1, max_size=3), st.lists(rules, max_size=2),
                   st.lists(rules, max_size=2))


@given(st.lists(bodies, max_size=5), st.sampled_from([ALICE, MALLORY, ANON, TOKEN]))
def test_decision_is_consistent(bodies_: list, who: Identity) -> None:
    ps = policies(*bodies_)
    decision, which = decide(ps, who)
    if which is None:
        assert decision == "deny"
        assert not any(p.matches(who) for p in ps if p.decision == "bypass")
    else:
        assert which.decision == decision and which.matches(who)
        if decision != "bypass":  # a matching bypass always wins
            assert not any(p.matches(who) for p in ps if p.decision == "bypass")
    if who is ANON:
        assert decision in ("bypass", "deny")
