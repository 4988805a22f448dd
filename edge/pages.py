"""Error pages the edge serves to eyeballs, with the real edge's status codes (docs/protocol.md §11.3)."""

from __future__ import annotations

import html

Headers = list[tuple[bytes, bytes]]

TITLES = {
    400: "Bad request",
    404: "No tunnel route for this host",
    408: "Request timeout",
    431: "Request header fields too large",
    502: "Bad gateway",
    503: "Service unavailable",
    524: "A timeout occurred",
    429: "Error 1015: You are being rate limited",
    530: "Error 1033: Argo Tunnel error",
}


def error_page(status: int, detail: str, *, ray: str = "", hint: str = "") -> tuple[Headers, bytes]:
    """An HTML error page: (headers, body). `detail` and `hint` are plain text (escaped here)."""
    title = TITLES.get(status, "Error")
    parts = [
        "<!DOCTYPE html>",
        f"<html><head><meta charset=\"utf-8\"><title>{status} {html.escape(title)} | tunnel-lab edge</title>"
        "</head><body>",
        f"<h1>{status} {html.escape(title)}</h1>",
        f"<p>{html.escape(detail)}</p>",
    ]
    if hint:
        parts.append(f"<p><b>What to do:</b> {html.escape(hint)}</p>")
    if ray:
        parts.append(f"<p><small>Ray ID: {html.escape(ray)} &middot; tunnel-lab edge</small></p>")
    parts.append("</body></html>\n")
    body = "\n".join(parts).encode()
    headers: Headers = [
        (b"content-type", b"text/html; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
    ]
    if ray:
        headers.append((b"cf-ray", ray.encode()))
    return headers, body


def no_route_page(host: str, ray: str) -> tuple[Headers, bytes]:
    """404: no hostname route points at a tunnel."""
    return error_page(
        404, f"The lab edge has no tunnel route for the host {host!r}.", ray=ray,
        hint=f"route it with `tunnel-lab tunnel route dns TUNNEL {host}` "
             "(the running edge picks the route up without a restart)")


def no_connection_page(host: str, tunnel: str, ray: str) -> tuple[Headers, bytes]:
    """530 / Error 1033: the tunnel has no healthy connection."""
    return error_page(
        530, f"Error 1033: the tunnel {tunnel} routed for {host!r} has no healthy connection "
             "to the edge right now.", ray=ray,
        hint="start the connector (`tunnel-lab connector tunnel run ...`) and wait until it logs "
             "`Registered tunnel connection`")
