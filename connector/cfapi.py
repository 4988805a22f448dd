"""The Cloudflare v4 API as cloudflared's `cfapi` package calls it: requests and answers, no I/O.

Each method of `ApiClient` returns the `ApiRequest` cloudflared would send (method, URL with the query
sorted as Go's `url.Values.Encode` sorts it, JSON body); `decode_result` and `status_error` read an
`ApiResponse` the way cfapi does, so errors carry cloudflared's words:

- a 200 answer is an envelope (`success`, `errors`, `result`, `result_info`); errors in it win over
  `success`; `result` is then decoded into the caller's model;
- any other status: the envelope's errors when the Content-Type is exactly `application/json`
  (`Failed to create tunnel: code: 1013, reason: ...`), else a text by status (`unauthorized`, ...).

The shell that moves the bytes is `connector.admin`.
"""

from __future__ import annotations

import base64
import json
import re
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote, urlencode

from tunnel_lab.wire.errors import TunnelLabError

DEFAULT_API_URL = "https://api.cloudflare.com/client/v4"
DEFAULT_QUICK_SERVICE = "https://api.trycloudflare.com"
JSON_TYPE = "application/json"
ACCEPT = "application/json;version=1"
ZERO_TIME = datetime(1, 1, 1, tzinfo=UTC)
_HTTP_TEXT = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
              405: "Method Not Allowed", 409: "Conflict", 429: "Too Many Requests",
              500: "Internal Server Error", 501: "Not Implemented", 502: "Bad Gateway",
              503: "Service Unavailable", 504: "Gateway Timeout"}


class ApiError(TunnelLabError):
    """An API call failed; the message is cloudflared's text for the same failure."""


class TunnelNameConflict(ApiError):
    """409 on create: cloudflared's ErrTunnelNameConflict."""

    def __init__(self) -> None:
        super().__init__("tunnel with name already exists")


@dataclass(frozen=True)
class ApiRequest:
    method: str
    url: str
    body: bytes | None = None


@dataclass(frozen=True)
class ApiResponse:
    status: int
    content_type: str
    body: bytes


# --- models (cfapi's structs, decoded from the API's JSON) ---------------------------------------------

def parse_time(value: Any) -> datetime:
    """An RFC 3339 time from the API (Go's time.Time JSON form); null or absent is the zero time."""
    if not isinstance(value, str) or not value:
        return ZERO_TIME
    text = re.sub(r"(\.\d{6})\d+", r"\1", value.strip())  # Python keeps microseconds, Go nanoseconds
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ApiError(f"the Cloudflare API response was an unexpected type: bad time {value!r}") from None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def go_rfc3339(t: datetime) -> str:
    """Go's `t.Format(time.RFC3339)`: whole seconds, `Z` for UTC, else the offset."""
    offset = t.utcoffset() or timedelta(0)
    base = f"{t.year:04d}-{t.month:02d}-{t.day:02d}T{t.hour:02d}:{t.minute:02d}:{t.second:02d}"
    if offset == timedelta(0):
        return base + "Z"
    return base + _offset_text(offset, colon=True)


def go_time_string(t: datetime) -> str:
    """Go's `time.Time.String()` for a time decoded from JSON: `2026-12-04 20:03:40.5 +0000 UTC`."""
    text = f"{t.year:04d}-{t.month:02d}-{t.day:02d} {t.hour:02d}:{t.minute:02d}:{t.second:02d}"
    if t.microsecond:
        text += ("." + f"{t.microsecond:06d}").rstrip("0")
    offset = t.utcoffset() or timedelta(0)
    if offset == timedelta(0):
        return text + " +0000 UTC"
    zone = _offset_text(offset, colon=False)
    return f"{text} {zone} {zone}"


def _offset_text(offset: timedelta, *, colon: bool) -> str:
    minutes = int(offset.total_seconds()) // 60
    sign = "+" if minutes >= 0 else "-"
    hours, mins = divmod(abs(minutes), 60)
    return f"{sign}{hours:02d}:{mins:02d}" if colon else f"{sign}{hours:02d}{mins:02d}"


def _uuid(value: Any, what: str) -> uuid.UUID:
    try:
        return uuid.UUID(str(value))
    except ValueError:
        raise ApiError(f"the Cloudflare API response was an unexpected type: {what} {value!r} is not a UUID"
                       ) from None


def _obj(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ApiError(f"the Cloudflare API response was an unexpected type: {what} is not an object")
    return value


def _list(value: Any, what: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ApiError(f"the Cloudflare API response was an unexpected type: {what} is not a list")
    return value


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


@dataclass(frozen=True)
class Connection:
    colo_name: str
    id: uuid.UUID
    is_pending_reconnect: bool
    origin_ip: str
    opened_at: datetime

    @classmethod
    def from_json(cls, value: Any) -> Connection:
        doc = _obj(value, "connection")
        return cls(colo_name=_str(doc.get("colo_name")), id=_uuid(doc.get("id"), "connection id"),
                   is_pending_reconnect=doc.get("is_pending_reconnect") is True,
                   origin_ip=_str(doc.get("origin_ip")), opened_at=parse_time(doc.get("opened_at")))

    def to_json(self) -> dict[str, Any]:
        return {"colo_name": self.colo_name, "id": str(self.id),
                "is_pending_reconnect": self.is_pending_reconnect,
                "origin_ip": self.origin_ip or None, "opened_at": _json_time(self.opened_at)}


@dataclass(frozen=True)
class Tunnel:
    id: uuid.UUID
    name: str
    created_at: datetime
    deleted_at: datetime
    connections: tuple[Connection, ...] = ()

    @classmethod
    def from_json(cls, value: Any) -> Tunnel:
        doc = _obj(value, "tunnel")
        return cls(id=_uuid(doc.get("id"), "tunnel id"), name=_str(doc.get("name")),
                   created_at=parse_time(doc.get("created_at")), deleted_at=parse_time(doc.get("deleted_at")),
                   connections=tuple(Connection.from_json(c) for c in _list(doc.get("connections"),
                                                                             "connections")))

    def to_json(self) -> dict[str, Any]:
        return {"id": str(self.id), "name": self.name, "created_at": _json_time(self.created_at),
                "deleted_at": _json_time(self.deleted_at),
                "connections": [c.to_json() for c in self.connections]}


@dataclass(frozen=True)
class ActiveClient:
    id: uuid.UUID
    features: tuple[str, ...]
    version: str
    arch: str
    run_at: datetime
    connections: tuple[Connection, ...]

    @classmethod
    def from_json(cls, value: Any) -> ActiveClient:
        doc = _obj(value, "connector")
        return cls(id=_uuid(doc.get("id"), "connector id"),
                   features=tuple(_str(f) for f in _list(doc.get("features"), "features")),
                   version=_str(doc.get("version")), arch=_str(doc.get("arch")),
                   run_at=parse_time(doc.get("run_at")),
                   connections=tuple(Connection.from_json(c) for c in _list(doc.get("conns"), "conns")))

    def to_json(self) -> dict[str, Any]:
        return {"id": str(self.id), "features": list(self.features), "version": self.version,
                "arch": self.arch, "run_at": _json_time(self.run_at),
                "conns": [c.to_json() for c in self.connections]}


@dataclass(frozen=True)
class DetailedRoute:
    id: uuid.UUID
    network: str
    tunnel_id: uuid.UUID
    vnet_id: uuid.UUID | None
    comment: str
    created_at: datetime
    deleted_at: datetime
    tunnel_name: str

    @classmethod
    def from_json(cls, value: Any) -> DetailedRoute:
        doc = _obj(value, "route")
        vnet = doc.get("virtual_network_id")
        nil = "00000000-0000-0000-0000-000000000000"
        return cls(id=_uuid(doc.get("id") or nil, "route id"), network=_str(doc.get("network")),
                   tunnel_id=_uuid(doc.get("tunnel_id") or nil, "tunnel_id"),
                   vnet_id=_uuid(vnet, "virtual_network_id") if vnet else None,
                   comment=_str(doc.get("comment")), created_at=parse_time(doc.get("created_at")),
                   deleted_at=parse_time(doc.get("deleted_at")), tunnel_name=_str(doc.get("tunnel_name")))

    @property
    def is_zero(self) -> bool:
        return self.tunnel_id.int == 0

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": str(self.id), "network": self.network, "tunnel_id": str(self.tunnel_id)}
        if self.vnet_id is not None:
            out["virtual_network_id"] = str(self.vnet_id)
        out.update({"comment": self.comment, "created_at": _json_time(self.created_at),
                    "deleted_at": _json_time(self.deleted_at), "tunnel_name": self.tunnel_name})
        return out


@dataclass(frozen=True)
class VirtualNetwork:
    id: uuid.UUID
    name: str
    comment: str
    is_default: bool
    created_at: datetime
    deleted_at: datetime

    @classmethod
    def from_json(cls, value: Any) -> VirtualNetwork:
        doc = _obj(value, "virtual network")
        return cls(id=_uuid(doc.get("id"), "virtual network id"), name=_str(doc.get("name")),
                   comment=_str(doc.get("comment")), is_default=doc.get("is_default_network") is True,
                   created_at=parse_time(doc.get("created_at")), deleted_at=parse_time(doc.get("deleted_at")))

    def to_json(self) -> dict[str, Any]:
        return {"id": str(self.id), "comment": self.comment, "name": self.name,
                "is_default_network": self.is_default, "created_at": _json_time(self.created_at),
                "deleted_at": _json_time(self.deleted_at)}


def _json_time(t: datetime) -> str:
    """Go's time.Time JSON (RFC 3339 with nanoseconds, trailing zeros dropped)."""
    text = go_rfc3339(t)
    if t.microsecond:
        frac = ("." + f"{t.microsecond:06d}").rstrip("0")
        text = text[:19] + frac + text[19:]
    return text


@dataclass(frozen=True)
class QuickTunnel:
    id: uuid.UUID
    name: str
    hostname: str
    account_tag: str
    secret: bytes

    def __repr__(self) -> str:
        return f"QuickTunnel(id={self.id}, hostname={self.hostname!r}, secret=<hidden>)"


# --- requests -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TunnelFilter:
    """cfapi.TunnelFilter's query parameters (`page` is set per request)."""

    params: dict[str, str] = field(default_factory=dict)

    def query(self, page: int) -> str:
        return urlencode(sorted({**self.params, "page": str(page)}.items()), quote_via=quote)


@dataclass(frozen=True)
class ApiClient:
    """Builds cloudflared's requests for one account and zone (from the origin certificate)."""

    base_url: str
    account_tag: str
    zone_tag: str

    @property
    def _tunnels(self) -> str:
        return f"{self.base_url.rstrip('/')}/accounts/{self.account_tag}/cfd_tunnel"

    @property
    def _routes(self) -> str:
        return f"{self.base_url.rstrip('/')}/accounts/{self.account_tag}/teamnet/routes"

    def create_tunnel(self, name: str, secret: bytes) -> ApiRequest:
        if not name:
            raise ApiError("tunnel name required")
        try:
            uuid.UUID(name)
        except ValueError:
            pass
        else:
            raise ApiError("you cannot use UUIDs as tunnel names")
        body = {"name": name, "tunnel_secret": base64.b64encode(secret).decode("ascii")}
        return ApiRequest("POST", self._tunnels, _json(body))

    def get_tunnel(self, tunnel_id: uuid.UUID) -> ApiRequest:
        return ApiRequest("GET", f"{self._tunnels}/{tunnel_id}")

    def tunnel_token(self, tunnel_id: uuid.UUID) -> ApiRequest:
        return ApiRequest("GET", f"{self._tunnels}/{tunnel_id}/token")

    def management_token(self, tunnel_id: uuid.UUID, resource: str = "logs") -> ApiRequest:
        return ApiRequest("POST", f"{self._tunnels}/{tunnel_id}/management/{resource}")

    def delete_tunnel(self, tunnel_id: uuid.UUID, cascade: bool) -> ApiRequest:
        return ApiRequest("DELETE", f"{self._tunnels}/{tunnel_id}" + ("?cascade=true" if cascade else ""))

    def list_tunnels(self, tunnel_filter: TunnelFilter, page: int) -> ApiRequest:
        return ApiRequest("GET", f"{self._tunnels}?{tunnel_filter.query(page)}")

    def active_clients(self, tunnel_id: uuid.UUID) -> ApiRequest:
        return ApiRequest("GET", f"{self._tunnels}/{tunnel_id}/connections")

    def cleanup_connections(self, tunnel_id: uuid.UUID, client_id: uuid.UUID | None) -> ApiRequest:
        query = f"?client_id={client_id}" if client_id is not None else ""
        return ApiRequest("DELETE", f"{self._tunnels}/{tunnel_id}/connections{query}")

    def route_dns(self, tunnel_id: uuid.UUID, hostname: str, overwrite: bool) -> ApiRequest:
        body = {"type": "dns", "user_hostname": hostname, "overwrite_existing": overwrite}
        url = f"{self.base_url.rstrip('/')}/zones/{self.zone_tag}/tunnels/{tunnel_id}/routes"
        return ApiRequest("PUT", url, _json(body))

    def route_lb(self, tunnel_id: uuid.UUID, lb_name: str, pool: str) -> ApiRequest:
        body = {"type": "lb", "lb_name": lb_name, "lb_pool": pool}
        url = f"{self.base_url.rstrip('/')}/zones/{self.zone_tag}/tunnels/{tunnel_id}/routes"
        return ApiRequest("PUT", url, _json(body))

    def list_routes(self, params: dict[str, str], page: int) -> ApiRequest:
        query = urlencode(sorted({"tun_types": "cfd_tunnel", **params, "page": str(page)}.items()),
                          quote_via=quote)
        return ApiRequest("GET", f"{self._routes}?{query}")

    def add_route(self, network: str, tunnel_id: uuid.UUID, comment: str,
                  vnet_id: uuid.UUID | None = None) -> ApiRequest:
        body: dict[str, Any] = {"network": network, "tunnel_id": str(tunnel_id), "comment": comment}
        if vnet_id is not None:
            body["virtual_network_id"] = str(vnet_id)
        return ApiRequest("POST", self._routes, _json(body))

    def delete_route(self, route_id: uuid.UUID) -> ApiRequest:
        return ApiRequest("DELETE", f"{self._routes}/{route_id}")

    def route_by_ip(self, ip: str, vnet_id: uuid.UUID | None = None) -> ApiRequest:
        query = f"?virtual_network_id={vnet_id}" if vnet_id is not None else ""
        return ApiRequest("GET", f"{self._routes}/ip/{quote(ip, safe='')}{query}")

    @property
    def _vnets(self) -> str:
        return f"{self.base_url.rstrip('/')}/accounts/{self.account_tag}/teamnet/virtual_networks"

    def create_vnet(self, name: str, comment: str, is_default: bool) -> ApiRequest:
        return ApiRequest("POST", self._vnets, _json({"name": name, "comment": comment,
                                                      "is_default_network": is_default}))

    def list_vnets(self, params: dict[str, str]) -> ApiRequest:
        query = urlencode(sorted(params.items()), quote_via=quote)
        return ApiRequest("GET", self._vnets + (f"?{query}" if query else ""))

    def delete_vnet(self, vnet_id: uuid.UUID, force: bool) -> ApiRequest:
        return ApiRequest("DELETE", f"{self._vnets}/{vnet_id}" + ("?force=true" if force else ""))

    def update_vnet(self, vnet_id: uuid.UUID, updates: dict[str, Any]) -> ApiRequest:
        return ApiRequest("PATCH", f"{self._vnets}/{vnet_id}", _json(updates))


def quick_tunnel_request(quick_service: str) -> ApiRequest:
    """`tunnel --url` without a tunnel: POST {quick-service}/tunnel, no body, no account."""
    return ApiRequest("POST", f"{quick_service}/tunnel")


def _json(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


# --- answers ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Envelope:
    result: Any
    count: int = 0
    per_page: int = 0
    total_count: int = 0


def _envelope_errors(doc: dict[str, Any]) -> str | None:
    errors = doc.get("errors") or []
    if not isinstance(errors, list) or not errors:
        return None
    texts = [f"code: {_code(e)}, reason: {_str(e.get('message')) if isinstance(e, dict) else ''}"
             for e in errors]
    if len(texts) == 1:
        return texts[0]
    return "API errors: " + "".join(f"{t}; " for t in texts)


def _code(err: Any) -> str:
    code = err.get("code") if isinstance(err, dict) else None
    return "" if code is None or isinstance(code, bool) else str(code)


def decode_envelope(resp: ApiResponse) -> Envelope:
    """cfapi's parseResponseEnvelope: the body of a 200 answer."""
    try:
        doc = json.loads(resp.body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(f"failed to decode response: {exc}") from None
    if not isinstance(doc, dict):
        raise ApiError("failed to decode response: the body is not a JSON object")
    errors = _envelope_errors(doc)
    if errors is not None:
        raise ApiError(errors)
    if doc.get("success") is not True:
        raise ApiError("API call failed")
    raw_info = doc.get("result_info")
    info: dict[str, Any] = raw_info if isinstance(raw_info, dict) else {}

    def num(key: str) -> int:
        value = info.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else 0

    return Envelope(result=doc.get("result"), count=num("count"), per_page=num("per_page"),
                    total_count=num("total_count"))


def status_error(op: str, resp: ApiResponse) -> ApiError | None:
    """cfapi's statusCodeToError: None for a 200 without errors in its body."""
    if resp.content_type == JSON_TYPE:
        try:
            doc = json.loads(resp.body)
        except (ValueError, UnicodeDecodeError):
            doc = None
        if isinstance(doc, dict):
            errors = _envelope_errors(doc)
            if errors is not None:
                return ApiError(f"Failed to {op}: {errors}")
    if resp.status == 200:
        return None
    if resp.status == 400:
        return ApiError("incorrect request parameters")
    if resp.status in (401, 403):
        return ApiError("unauthorized")
    if resp.status == 404:
        return ApiError("not found")
    return ApiError(f"API call to {op} failed with status {resp.status}: {_HTTP_TEXT.get(resp.status, '')}")


def decode_quick_tunnel(body: bytes) -> QuickTunnel:
    """The quick-tunnel service's answer `{success, result{id, name, hostname, account_tag, secret}}`.

    As cloudflared: only a body that is not JSON fails to unmarshal; a failure answer (no result) then
    fails on its empty tunnel ID.
    """
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(f"failed to unmarshal quick Tunnel: {exc}") from None
    result = doc.get("result") if isinstance(doc, dict) else None
    result = result if isinstance(result, dict) else {}
    raw_id = _str(result.get("id"))
    try:
        tunnel_id = uuid.UUID(raw_id)
    except ValueError:
        raise ApiError(f"failed to parse quick Tunnel ID: invalid UUID length: {len(raw_id)}") from None
    try:
        secret = base64.b64decode(_str(result.get("secret")), validate=True)
    except ValueError as exc:
        raise ApiError(f"failed to unmarshal quick Tunnel: secret: {exc}") from None
    return QuickTunnel(id=tunnel_id, name=_str(result.get("name")), hostname=_str(result.get("hostname")),
                       account_tag=_str(result.get("account_tag")), secret=secret)
