"""lab.access_store: applications, policies and service tokens in the store; nothing half-saved;
edge.access's one-time codes."""

from __future__ import annotations

import datetime

import pytest

from tunnel_lab.edge.access import MAX_ATTEMPTS, LoginCodes
from tunnel_lab.lab.access_store import AccessStore, NotFound
from tunnel_lab.lab.store import Store
from tunnel_lab.wire.errors import ConfigError

ALLOW = {"name": "staff", "decision": "allow", "include": [{"everyone": {}}]}


@pytest.fixture
def access(tmp_path):  # type: ignore[no-untyped-def]
    with Store(tmp_path / "state.db") as store:
        yield AccessStore(store)


def test_apps_by_host_and_longest_prefix(access: AccessStore) -> None:
    root = access.create_app({"name": "root", "domain": "a.test", "policies": [ALLOW]})
    admin = access.create_app({"name": "admin", "domain": "a.test/admin", "policies": [ALLOW]})
    assert len(root["aud"]) == 64 and root["aud"] != admin["aud"]
    assert root["policies"][0]["id"]
    assert access.app_for("a.test", "/admin/x").id == admin["id"]  # type: ignore[union-attr]
    assert access.app_for("a.test", "/administrator").id == root["id"]  # type: ignore[union-attr]
    assert access.app_for("b.test", "/") is None
    assert access.get_app(root["aud"]).id == root["id"]
    with pytest.raises(ConfigError, match=r"already protects 'a\.test/admin'"):
        access.create_app({"name": "again", "domain": "A.test/admin/"})


def test_a_bad_policy_changes_nothing(access: AccessStore) -> None:
    app = access.create_app({"name": "root", "domain": "a.test", "policies": [ALLOW]})
    version = access.store.version()
    with pytest.raises(ConfigError, match=r"policies\[1\] 'x'.include\[0\]: unknown rule 'nope'"):
        access.add_policy(app["id"], {"name": "x", "decision": "allow", "include": [{"nope": {}}]})
    with pytest.raises(ConfigError):
        access.update_app(app["id"], {"name": "root", "domain": "a.test", "policies": [{"name": "y"}]})
    assert access.store.version() == version
    assert [p["name"] for p in access.get_app(app["id"]).body["policies"]] == ["staff"]
    with pytest.raises(NotFound):
        access.delete_policy(app["id"], "no-such-id")


def test_policy_ids_survive_updates(access: AccessStore) -> None:
    app = access.create_app({"name": "root", "domain": "a.test", "policies": [ALLOW]})
    pid = app["policies"][0]["id"]
    added = access.add_policy(app["id"], {"name": "ops", "decision": "deny", "include": [{"everyone": {}}]})
    body = access.get_app(app["id"]).body
    assert [p["id"] for p in body["policies"]] == [pid, added["id"]]
    replaced = access.replace_policy(app["id"], pid, {**ALLOW, "name": "staff2"})
    assert replaced["id"] == pid and replaced["name"] == "staff2"


def test_service_tokens(access: AccessStore) -> None:
    token = access.create_service_token({"name": "ci"})
    assert token["client_id"].endswith(".access") and len(token["client_secret"]) == 64
    assert access.check_service_token(token["client_id"], token["client_secret"]) == token["id"]
    assert access.check_service_token(token["client_id"], token["client_secret"] + "x") is None
    assert access.check_service_token("nobody.access", token["client_secret"]) is None
    listed = access.service_tokens()
    assert listed[0]["id"] == token["id"] and "client_secret" not in listed[0]
    rows = access.store._query("SELECT secret_sha256, body FROM access_service_tokens")
    assert token["client_secret"] not in repr(rows)
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=400)
    assert access.check_service_token(token["client_id"], token["client_secret"], now=later) is None
    with pytest.raises(ConfigError, match="duration"):
        access.create_service_token({"name": "x", "duration": "soon"})
    access.delete_service_token(token["id"])
    with pytest.raises(NotFound):
        access.delete_service_token(token["id"])


def test_keys_rotate_and_persist(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with Store(tmp_path / "state.db") as store:
        first = AccessStore(store).signing_key().kid
    with Store(tmp_path / "state.db") as store:
        access = AccessStore(store)
        assert access.signing_key().kid == first
        new = access.rotate_keys()
        assert access.signing_key().kid == new
        assert {k["kid"] for k in access.jwks()["keys"]} == {first, new}


def test_auth_domain(access: AccessStore) -> None:
    assert access.issuer == "https://lab.cloudflareaccess.com"
    access.set_auth_domain("Team-1.cloudflareaccess.com")
    assert access.auth_domain == "team-1.cloudflareaccess.com"
    for bad in ("team.example.com", ".cloudflareaccess.com", "a.b.cloudflareaccess.com", 3):
        with pytest.raises(ConfigError):
            access.set_auth_domain(bad)


def test_login_codes() -> None:
    codes = LoginCodes()
    entry = codes.issue("a@b.test", "app.test", now=0.0)
    assert len(entry.code) == 6 and entry.code.isdigit()
    assert not codes.redeem("a@b.test", "x", now=1.0)
    assert codes.redeem("a@b.test", entry.code, now=2.0)
    assert not codes.redeem("a@b.test", entry.code, now=3.0)  # one time
    entry = codes.issue("a@b.test", "app.test", now=0.0)
    assert not codes.redeem("a@b.test", entry.code, now=10_000.0)  # expired
    entry = codes.issue("a@b.test", "app.test", now=0.0)
    for _ in range(MAX_ATTEMPTS):
        codes.redeem("a@b.test", "wrong", now=1.0)
    assert not codes.redeem("a@b.test", entry.code, now=1.0)  # too many tries: gone
