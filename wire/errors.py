"""The project's exceptions: one base, families by cause.

Every exception a user can meet carries enough to act on: what was wrong and where.
"""

from __future__ import annotations


class TunnelLabError(Exception):
    """Base of every error tunnel-lab raises on purpose."""


class ProtocolError(TunnelLabError):
    """Bytes from a peer break the tunnel protocol (HTTP/2 usage, Cap'n Proto, header serialization)."""


class CapnpError(ProtocolError):
    """A Cap'n Proto message is malformed: framing, pointers, sizes or types."""


class RpcError(ProtocolError):
    """A Cap'n Proto RPC message is well-formed but makes no sense in the conversation."""


class HeaderSerializationError(ProtocolError):
    """A `cf-cloudflared-response-headers` value cannot be decoded."""


class StreamConversionError(ProtocolError):
    """A tunnel stream or an HTTP message cannot be converted (bad pseudo-headers, bad framing)."""


class DatagramError(ProtocolError):
    """A QUIC datagram (v2 or v3) cannot be decoded or encoded: size, type or layout."""


class OriginError(TunnelLabError):
    """The origin could not be reached or answered with something that is not HTTP."""


class TLSSetupError(TunnelLabError):
    """Certificates or keys are missing, unreadable or unusable."""


class ConfigError(TunnelLabError):
    """User input is wrong: a config, credentials, scenario or command line.

    `source` names the file (or flag), `line` the 1-based line where known, `hint` what to do.
    """

    def __init__(self, message: str, *, source: str | None = None, line: int | None = None,
                 hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.source = source
        self.line = line
        self.hint = hint

    def __str__(self) -> str:
        where = ""
        if self.source:
            where = f"{self.source}:{self.line}: " if self.line else f"{self.source}: "
        text = f"{where}{self.message}"
        if self.hint:
            text += f" ({self.hint})"
        return text
