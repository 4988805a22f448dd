"""Remotely managed tunnels: the configurations set through the API, and the management signing key.

`PUT /accounts/A/cfd_tunnel/ID/configurations` stores `{"config": {...}}` here with the next version
(`STATE/remote-configs.json`); the edge reads it when a connector of that tunnel registers (it then says
the tunnel is remotely managed and pushes the latest version) and the API shell has the edge push a new
version to the running connectors. The API process and the edge are separate processes: every write
holds a lock file and replaces the file atomically.

The management key (`STATE/management-key.pem`, P-256) signs the tokens `cloudflared tail` gets from
the API (`wire.mgmt_token`); the edge checks them with its public half.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from tunnel_lab.lab.store import format_time
from tunnel_lab.wire import mgmt_token
from tunnel_lab.wire.errors import ConfigError

CONFIGS_FILE = "remote-configs.json"
KEY_FILE = "management-key.pem"
MAX_RULES = 1000  # lab


@dataclass(frozen=True, kw_only=True)
class RemoteConfig:
    """One tunnel's current remote configuration."""

    tunnel_id: str
    version: int
    config: dict[str, Any]
    created_at: str

    def as_result(self, account: str) -> dict[str, Any]:
        """The v4 API's `result` for GET/PUT `.../configurations`."""
        return {"tunnel_id": self.tunnel_id, "account_id": account, "version": self.version,
                "config": self.config, "source": "cloudflare", "created_at": self.created_at}

    def push_body(self) -> dict[str, Any]:
        """What the edge sends to a connector (http2 stream body; QUIC: version + the config's JSON)."""
        return {"version": self.version, "config": self.config}


def check_config(config: Any) -> dict[str, Any]:
    """The `config` object of a PUT, checked as cloudflared will parse it; ConfigError says what and where.

    Only what would make every connector refuse the whole update is refused here (a missing service, a
    last rule that is not a catch-all); cloudflared checks the rest and reports it in its own log.
    """
    if not isinstance(config, dict):
        raise ConfigError("config must be a JSON object", source="config")
    ingress = config.get("ingress", [])
    if not isinstance(ingress, list):
        raise ConfigError("config.ingress must be a list of rules", source="config.ingress")
    if len(ingress) > MAX_RULES:
        raise ConfigError(f"config.ingress has more than {MAX_RULES} rules", source="config.ingress")
    for n, rule in enumerate(ingress):
        where = f"config.ingress[{n}]"
        if not isinstance(rule, dict):
            raise ConfigError("a rule must be a JSON object", source=where)
        if not isinstance(rule.get("service"), str) or not rule["service"]:
            raise ConfigError("a rule needs a service (a URL or http_status:NNN)", source=f"{where}.service")
        for key in ("hostname", "path"):
            if rule.get(key) is not None and not isinstance(rule[key], str):
                raise ConfigError(f"{key} must be a string", source=f"{where}.{key}")
    if ingress and (ingress[-1].get("hostname") not in (None, "", "*") or ingress[-1].get("path")):
        raise ConfigError("the last rule must match every request (no hostname, no path): a catch-all "
                          "such as {\"service\": \"http_status:404\"}",
                          source=f"config.ingress[{len(ingress) - 1}]")
    for key in ("originRequest", "warp-routing"):
        if config.get(key) is not None and not isinstance(config[key], dict):
            raise ConfigError(f"{key} must be a JSON object", source=f"config.{key}")
    return config


class RemoteConfigs:
    """The remote configurations of one state directory."""

    def __init__(self, state: Path) -> None:
        self.path = state / CONFIGS_FILE

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.path.with_name(CONFIGS_FILE + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read the remote configurations: {exc}", source=str(self.path),
                              hint="delete it to forget every remote configuration") from exc
        if not isinstance(data, dict):
            raise ConfigError("the remote configurations file is not a JSON object", source=str(self.path))
        return data

    def _write(self, data: Mapping[str, Any]) -> None:
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, self.path)

    def get(self, tunnel_id: str) -> RemoteConfig | None:
        """The tunnel's current configuration, or None (a locally managed tunnel)."""
        entry = self._read().get(tunnel_id)
        if not isinstance(entry, dict):
            return None
        return RemoteConfig(tunnel_id=tunnel_id, version=int(entry.get("version") or 0),
                            config=dict(entry.get("config") or {}), created_at=str(entry.get("created_at")))

    def put(self, tunnel_id: str, config: dict[str, Any]) -> RemoteConfig:
        """Store `config` (checked by the caller) as the next version (the first is 1)."""
        with self._locked():
            data = self._read()
            old = data.get(tunnel_id)
            version = (int(old.get("version") or 0) if isinstance(old, dict) else 0) + 1
            created = format_time(datetime.datetime.now(datetime.UTC))
            data[tunnel_id] = {"version": version, "config": config, "created_at": created}
            self._write(data)
        return RemoteConfig(tunnel_id=tunnel_id, version=version, config=config, created_at=created)

    def forget(self, tunnel_id: str) -> None:
        """Drop a deleted tunnel's configuration."""
        with self._locked():
            data = self._read()
            if data.pop(tunnel_id, None) is not None:
                self._write(data)


def management_key(state: Path) -> ec.EllipticCurvePrivateKey:
    """The lab's management signing key, created on first use (by whichever process asks first)."""
    path = state / KEY_FILE
    if not path.exists():
        # Written aside and linked into place: a reader never sees a half-written key, and of two
        # processes creating it at once the first link wins.
        tmp = state / f"{KEY_FILE}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(mgmt_token.key_pem(mgmt_token.new_key()))
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
        tmp.unlink()
    try:
        pem = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the management signing key: {exc.strerror or exc}",
                          source=str(path)) from exc
    try:
        return mgmt_token.load_key(pem)
    except mgmt_token.JwtError as exc:
        raise ConfigError(str(exc), source=str(path), hint="delete it; a new one is made") from exc
