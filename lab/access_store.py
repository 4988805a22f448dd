"""Access state in the lab's store (`STATE/state.db`): applications with their policies, service
tokens, the team's auth domain and the signing keys.

Tables of their own beside the tunnel tables, created on first use; every write is one `Store`
transaction (the version counter moves, so the edge sees changes at once), and an object is validated
whole before anything is written: a malformed application or policy changes nothing.

Secrets: a service token's secret is returned once, at creation; only its SHA-256 is kept. The signing
keys' private halves never leave this module except to sign (`signing_key`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import threading
import uuid
from dataclasses import dataclass
from typing import Any

from tunnel_lab.lab.store import Store, _now, format_time
from tunnel_lab.wire import jwt
from tunnel_lab.wire.access_policy import Policy, parse_app, parse_duration, parse_policy
from tunnel_lab.wire.errors import ConfigError

DEFAULT_AUTH_DOMAIN = "lab.cloudflareaccess.com"
AUTH_DOMAIN_SUFFIX = ".cloudflareaccess.com"
MAX_APPS = 1000
MAX_TOKENS = 1000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS access_apps (
    id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    path TEXT NOT NULL,
    aud TEXT NOT NULL UNIQUE,
    body TEXT NOT NULL,
    UNIQUE (host, path)
);
CREATE TABLE IF NOT EXISTS access_service_tokens (
    id TEXT PRIMARY KEY,
    client_id TEXT NOT NULL UNIQUE,
    secret_sha256 TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS access_keys (
    kid TEXT PRIMARY KEY,
    pem BLOB NOT NULL,
    created_at TEXT NOT NULL
);
"""


class NotFound(ConfigError):
    """No such application, policy or service token."""


@dataclass(frozen=True)
class App:
    """An application as the edge matches it."""

    id: str
    host: str
    path: str
    aud: str
    policies: tuple[Policy, ...]
    body: dict[str, Any]  # the API's view (policies with their ids)

    def covers(self, path: str) -> bool:
        """Does this application protect a request path (prefix on a segment boundary)?"""
        if self.path == "/":
            return True
        return path == self.path or path.startswith(self.path + "/") or path.startswith(self.path + "?")


class AccessStore:
    """Access objects in one `Store`."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._apps: tuple[int, list[App]] | None = None
        self._keys: list[jwt.SigningKey] | None = None
        # The store's own transaction and query helpers: this module is part of the store.
        with store._write() as db:
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    db.execute(stmt)

    # -- the team

    @property
    def auth_domain(self) -> str:
        """`<team>.cloudflareaccess.com`."""
        rows = self.store._query("SELECT value FROM meta WHERE key = 'access_auth_domain'")
        return str(rows[0][0]) if rows else DEFAULT_AUTH_DOMAIN

    def set_auth_domain(self, domain: Any) -> str:
        """Rename the team (`PUT .../access/organizations`)."""
        if not isinstance(domain, str) or not domain.lower().endswith(AUTH_DOMAIN_SUFFIX):
            raise ConfigError(f"auth_domain {domain!r} must be <team>{AUTH_DOMAIN_SUFFIX}", source="access")
        team = domain.lower()[: -len(AUTH_DOMAIN_SUFFIX)]
        if not team or not all(c.isalnum() or c == "-" for c in team):
            raise ConfigError(f"auth_domain {domain!r}: the team name is letters, digits and '-'",
                              source="access")
        with self.store._write() as db:
            db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('access_auth_domain', ?)",
                       (domain.lower(),))
        return domain.lower()

    @property
    def issuer(self) -> str:
        """The `iss` of every token the team signs."""
        return f"https://{self.auth_domain}"

    # -- signing keys

    def signing_keys(self) -> list[jwt.SigningKey]:
        """The team's keys, newest first; one is created on first use."""
        with self._lock:
            if self._keys is None:
                rows = self.store._query("SELECT kid, pem FROM access_keys ORDER BY rowid DESC")
                if not rows:
                    key = jwt.SigningKey.generate(secrets.token_hex(32))
                    with self.store._write() as db:
                        db.execute("INSERT OR IGNORE INTO access_keys(kid, pem, created_at) VALUES (?, ?, ?)",
                                   (key.kid, key.to_pem(), format_time(_now())))
                    rows = self.store._query("SELECT kid, pem FROM access_keys ORDER BY rowid DESC")
                self._keys = [jwt.SigningKey.from_pem(str(kid), bytes(pem)) for kid, pem in rows]
            return list(self._keys)

    def signing_key(self) -> jwt.SigningKey:
        """The key new tokens are signed with."""
        return self.signing_keys()[0]

    def rotate_keys(self) -> str:
        """Add a new signing key (the old one stays in the JWKS); returns its kid."""
        key = jwt.SigningKey.generate(secrets.token_hex(32))
        with self.store._write() as db:
            db.execute("INSERT INTO access_keys(kid, pem, created_at) VALUES (?, ?, ?)",
                       (key.kid, key.to_pem(), format_time(_now())))
        with self._lock:
            self._keys = None
        return key.kid

    def jwks(self) -> dict[str, Any]:
        """The public JWKS served at `/cdn-cgi/access/certs`."""
        return jwt.jwks_document(self.signing_keys())

    # -- applications

    def _app_from_row(self, row: tuple[Any, ...]) -> App:
        app_id, host, path, aud, body = row
        doc = json.loads(body)
        policies = tuple(parse_policy(p)[0] for p in doc.get("policies", []))
        return App(str(app_id), str(host), str(path), str(aud), policies, {"id": app_id, "aud": aud, **doc})

    def apps(self) -> list[App]:
        """Every application, longest path prefix first (cached by the store's version)."""
        version = self.store.version()
        with self._lock:
            if self._apps is not None and self._apps[0] == version:
                return self._apps[1]
        rows = self.store._query("SELECT id, host, path, aud, body FROM access_apps")
        apps = sorted((self._app_from_row(r) for r in rows), key=lambda a: (-len(a.path), a.host))
        with self._lock:
            self._apps = (version, apps)
        return apps

    def app_for(self, host: str, path: str) -> App | None:
        """The application protecting host + path (the longest path prefix wins)."""
        for app in self.apps():
            if app.host == host and app.covers(path):
                return app
        return None

    def get_app(self, app_id: str) -> App:
        rows = self.store._query("SELECT id, host, path, aud, body FROM access_apps WHERE id = ? OR aud = ?",
                                 (app_id, app_id))
        if not rows:
            raise NotFound(f"no Access application {app_id!r}", source="access")
        return self._app_from_row(rows[0])

    @staticmethod
    def _with_policy_ids(doc: dict[str, Any], old: dict[str, Any] | None) -> dict[str, Any]:
        old_ids = {p.get("name"): p.get("id") for p in (old or {}).get("policies", [])}
        for policy, given in zip(doc["policies"], doc.pop("_given_ids"), strict=True):
            policy["id"] = given or old_ids.get(policy["name"]) or str(uuid.uuid4())
        return doc

    def _parse(self, body: Any) -> tuple[str, str, dict[str, Any]]:
        host, path, _policies, doc = parse_app(body)
        given = [p.get("id") if isinstance(p, dict) and isinstance(p.get("id"), str) else None
                 for p in body.get("policies", [])]
        doc["_given_ids"] = given
        return host, path, doc

    def create_app(self, body: Any) -> dict[str, Any]:
        """Validate and add an application; returns it with its `id` and `aud`."""
        host, path, doc = self._parse(body)
        doc = self._with_policy_ids(doc, None)
        app_id, aud = str(uuid.uuid4()), secrets.token_hex(32)
        now = format_time(_now())
        doc.update(created_at=now, updated_at=now)
        with self.store._write() as db:
            if db.execute("SELECT COUNT(*) FROM access_apps").fetchone()[0] >= MAX_APPS:
                raise ConfigError(f"at most {MAX_APPS} Access applications", source="access")
            if db.execute("SELECT 1 FROM access_apps WHERE host = ? AND path = ?", (host, path)).fetchone():
                raise ConfigError(f"an Access application already protects {doc['domain']!r}",
                                  source="access")
            db.execute("INSERT INTO access_apps(id, host, path, aud, body) VALUES (?, ?, ?, ?, ?)",
                       (app_id, host, path, aud, json.dumps(doc)))
        return {"id": app_id, "aud": aud, **doc}

    def update_app(self, app_id: str, body: Any) -> dict[str, Any]:
        """Replace an application's settings (id and aud stay)."""
        old = self.get_app(app_id)
        host, path, doc = self._parse(body)
        doc = self._with_policy_ids(doc, old.body)
        doc.update(created_at=old.body.get("created_at"), updated_at=format_time(_now()))
        with self.store._write() as db:
            clash = db.execute("SELECT id FROM access_apps WHERE host = ? AND path = ? AND id != ?",
                               (host, path, old.id)).fetchone()
            if clash:
                raise ConfigError(f"an Access application already protects {doc['domain']!r}",
                                  source="access")
            db.execute("UPDATE access_apps SET host = ?, path = ?, body = ? WHERE id = ?",
                       (host, path, json.dumps(doc), old.id))
        return {"id": old.id, "aud": old.aud, **doc}

    def delete_app(self, app_id: str) -> dict[str, Any]:
        app = self.get_app(app_id)
        with self.store._write() as db:
            db.execute("DELETE FROM access_apps WHERE id = ?", (app.id,))
        return {"id": app.id}

    def _app_input(self, app: App) -> dict[str, Any]:
        keep = ("name", "domain", "type", "session_duration")
        return {**{k: app.body[k] for k in keep if k in app.body},
                "policies": [dict(p) for p in app.body.get("policies", [])]}

    def add_policy(self, app_id: str, body: Any) -> dict[str, Any]:
        """Add one policy to an application (validated with the whole application)."""
        app = self.get_app(app_id)
        if not isinstance(body, dict):
            raise ConfigError("policy: must be an object", source="access")
        new = self._app_input(app)
        new["policies"].append({k: v for k, v in body.items() if k != "id"})
        result = self.update_app(app.id, new)
        return dict(result["policies"][-1])

    def replace_policy(self, app_id: str, policy_id: str, body: Any) -> dict[str, Any]:
        app = self.get_app(app_id)
        if not isinstance(body, dict):
            raise ConfigError("policy: must be an object", source="access")
        new = self._app_input(app)
        index = next((i for i, p in enumerate(new["policies"]) if p.get("id") == policy_id), None)
        if index is None:
            raise NotFound(f"application {app.body['name']!r} has no policy {policy_id!r}", source="access")
        new["policies"][index] = {**{k: v for k, v in body.items() if k != "id"}, "id": policy_id}
        return dict(self.update_app(app.id, new)["policies"][index])

    def delete_policy(self, app_id: str, policy_id: str) -> dict[str, Any]:
        app = self.get_app(app_id)
        new = self._app_input(app)
        kept = [p for p in new["policies"] if p.get("id") != policy_id]
        if len(kept) == len(new["policies"]):
            raise NotFound(f"application {app.body['name']!r} has no policy {policy_id!r}", source="access")
        new["policies"] = kept
        self.update_app(app.id, new)
        return {"id": policy_id}

    # -- service tokens

    def create_service_token(self, body: Any) -> dict[str, Any]:
        """A new token; the answer is the only place its `client_secret` ever appears."""
        if not isinstance(body, dict) or not isinstance(body.get("name"), str) or not body["name"].strip():
            raise ConfigError("service token: name must be a non-empty string", source="access")
        duration = body.get("duration", "8760h")
        if not isinstance(duration, str) or (duration != "forever"
                                             and parse_duration_hours(duration) is None):
            raise ConfigError(f"service token {body['name']!r}.duration: {duration!r} is not like 8760h "
                              "or forever", source="access")
        token_id, client_id = str(uuid.uuid4()), secrets.token_hex(16) + ".access"
        secret = secrets.token_hex(32)
        now = _now()
        doc: dict[str, Any] = {"id": token_id, "name": body["name"].strip(), "client_id": client_id,
                               "duration": duration, "created_at": format_time(now),
                               "updated_at": format_time(now)}
        seconds = parse_duration_hours(duration)
        if seconds is not None:
            doc["expires_at"] = format_time(now + _timedelta(seconds))
        with self.store._write() as db:
            if db.execute("SELECT COUNT(*) FROM access_service_tokens").fetchone()[0] >= MAX_TOKENS:
                raise ConfigError(f"at most {MAX_TOKENS} service tokens", source="access")
            db.execute("INSERT INTO access_service_tokens(id, client_id, secret_sha256, body) "
                       "VALUES (?, ?, ?, ?)",
                       (token_id, client_id, _sha256(secret), json.dumps(doc)))
        return {**doc, "client_secret": secret}

    def service_tokens(self) -> list[dict[str, Any]]:
        rows = self.store._query("SELECT body FROM access_service_tokens ORDER BY id")
        return [json.loads(r[0]) for r in rows]

    def delete_service_token(self, token_id: str) -> dict[str, Any]:
        with self.store._write() as db:
            cur = db.execute("DELETE FROM access_service_tokens WHERE id = ?", (token_id,))
            if cur.rowcount == 0:
                raise NotFound(f"no service token {token_id!r}", source="access")
        return {"id": token_id}

    def check_service_token(self, client_id: str, secret: str, now: Any = None) -> str | None:
        """The token's id when `client_id`/`secret` match an unexpired token, else None."""
        rows = self.store._query(
            "SELECT id, secret_sha256, body FROM access_service_tokens WHERE client_id = ?",
            (client_id.strip(),))
        if not rows:
            return None
        token_id, digest, body = rows[0]
        if not hmac.compare_digest(str(digest), _sha256(secret.strip())):
            return None
        expires = json.loads(body).get("expires_at")
        if expires and expires < format_time(now or _now()):
            return None
        return str(token_id)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


def _timedelta(seconds: float) -> Any:
    import datetime

    return datetime.timedelta(seconds=seconds)


def parse_duration_hours(text: str) -> float | None:
    """A service token's duration: `8760h`, `30m`... (no upper bound but a century)."""
    if text.endswith("h") and text[:-1].isdigit():
        hours = int(text[:-1])
        return hours * 3600.0 if 0 < hours <= 100 * 8760 else None
    return parse_duration(text)
