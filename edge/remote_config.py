"""Remote configuration push: what the edge does for a remotely managed tunnel.

A tunnel has a remote configuration once one was set through the API (`lab.remote_config`). Then a
registration answers `tunnelIsRemotelyManaged`, and the edge pushes the latest version to the new
connection; the API has the edge push each new version to every running connector of the tunnel
(one connection per connector: a connector applies a version once for all its connections).

Over QUIC the push is the `updateConfiguration` RPC; over http2 a stream with
`cf-cloudflared-proxy-connection-upgrade: update-configuration` whose body is
`{"version": N, "config": {...}}` and whose answer is `{"lastAppliedVersion": N, "err": ...}`
(docs/protocol.md §3.7).
"""

from __future__ import annotations

import json
import logging
from typing import Any, Protocol, runtime_checkable

import trio

from tunnel_lab.edge.state import EdgeState
from tunnel_lab.lab.remote_config import RemoteConfig, RemoteConfigs
from tunnel_lab.transport.tunnel import TunnelConnection, TunnelStreamError
from tunnel_lab.wire.errors import TunnelLabError

log = logging.getLogger(__name__)

PUSH_TIMEOUT = 10.0
MAX_ANSWER = 64 * 1024


class PushError(TunnelLabError):
    """A connector did not take a configuration push (no answer, a reset, an unreadable answer)."""


@runtime_checkable
class RpcConfigPush(Protocol):
    """A connection that pushes over the `updateConfiguration` RPC (QUIC)."""

    async def push_configuration(self, version: int, config: bytes) -> tuple[int, str]: ...


def current(edge: EdgeState[TunnelConnection], tunnel_id: str) -> RemoteConfig | None:
    """The tunnel's latest remote configuration, or None; a broken file is logged and means none."""
    try:
        return RemoteConfigs(edge.config.state_dir).get(tunnel_id)
    except TunnelLabError as exc:
        log.warning("remote configuration of tunnel=%s unreadable: %s", tunnel_id, exc)
        return None


async def push(conn: TunnelConnection, version: int, config: Any) -> tuple[int, str | None]:
    """Push one version on one connection: (the version the connector now runs, its error or None)."""
    body = json.dumps(config, separators=(",", ":")).encode()
    try:
        with trio.fail_after(PUSH_TIMEOUT):
            if isinstance(conn, RpcConfigPush):
                latest, error = await conn.push_configuration(version, body)
                return latest, error or None
            return await _push_h2(conn, version, body)
    except trio.TooSlowError:
        raise PushError(f"no answer to the configuration push in {PUSH_TIMEOUT:.0f}s") from None
    except TunnelStreamError as exc:
        raise PushError(f"configuration push failed: {exc}") from None


async def _push_h2(conn: TunnelConnection, version: int, config: bytes) -> tuple[int, str | None]:
    headers = [(b":method", b"PUT"), (b":scheme", b"https"), (b":authority", b"cloudflared"),
               (b":path", b"/"), (b"cf-cloudflared-proxy-connection-upgrade", b"update-configuration")]
    stream = await conn.open_stream(headers, end_stream=False)
    try:
        await stream.send(b'{"version":%d,"config":%s}' % (version, config), end=True)
        answer = await stream.response_headers()
        status = dict(answer).get(b":status", b"")
        body = bytearray()
        while (item := await stream.receive()) is not None:
            data, length = item
            body += data
            await stream.ack(length)
            if len(body) > MAX_ANSWER:
                raise PushError(f"configuration push answer over {MAX_ANSWER} bytes")
    finally:
        await stream.release()
    if status != b"200":
        raise PushError(f"the connector answered the configuration push with status {status.decode()!r}")
    try:
        value = json.loads(body)
        latest = int(value["lastAppliedVersion"])
    except (ValueError, TypeError, KeyError):
        raise PushError(f"unreadable configuration push answer {bytes(body[:200])!r}") from None
    err = value.get("err")
    # cloudflared serialises its Go error as `{}`: the reason is only in its own log.
    return latest, (json.dumps(err) if err is not None else None)


def connector_targets(edge: EdgeState[TunnelConnection], tunnel_id: str) -> list[TunnelConnection]:
    """One registered connection per connector of the tunnel (its lowest connIndex)."""
    chosen: dict[str, TunnelConnection] = {}
    for conn in edge.registry.listed():
        reg = conn.registration
        if reg is None or not conn.routable or str(reg.tunnel_id) != tunnel_id:
            continue
        key = str(reg.connector_id)
        old = chosen.get(key)
        if old is None or (old.registration is not None and reg.conn_index < old.registration.conn_index):
            chosen[key] = conn
    return list(chosen.values())


async def push_to_connectors(edge: EdgeState[TunnelConnection], tunnel_id: str, version: int,
                             config: Any) -> list[dict[str, Any]]:
    """Push to every running connector of the tunnel; one result per connector (errors included)."""
    results = []
    for conn in connector_targets(edge, tunnel_id):
        reg = conn.registration
        entry: dict[str, Any] = {"connection": conn.id,
                                 "connector_id": str(reg.connector_id) if reg else None}
        try:
            latest, error = await push(conn, version, config)
        except PushError as exc:
            log.warning("configuration version=%d not pushed: %s %s", version, exc, conn.ident())
            entry.update(lastAppliedVersion=None, err=str(exc))
        else:
            log.info("configuration version=%d pushed: the connector runs version %d%s %s", version, latest,
                     f" (error {error})" if error else "", conn.ident())
            entry.update(lastAppliedVersion=latest, err=error)
        results.append(entry)
    return results


async def push_after_registration(edge: EdgeState[TunnelConnection], conn: TunnelConnection,
                                  remote: RemoteConfig) -> None:
    """A newly registered connection of a remotely managed tunnel gets the latest version (never raises)."""
    try:
        latest, error = await push(conn, remote.version, remote.config)
    except PushError as exc:
        log.warning("configuration version=%d not pushed after registration: %s %s", remote.version, exc,
                    conn.ident())
        return
    log.info("configuration version=%d pushed after registration: the connector runs version %d%s %s",
             remote.version, latest, f" (error {error})" if error else "", conn.ident())
