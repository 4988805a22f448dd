"""`tunnel-lab origin KIND`: run an origin fixture in the foreground until SIGINT/SIGTERM.

    tunnel-lab origin KIND --listen 127.0.0.1:0 [--tls CERT] [--hostname NAME] [--state DIR]
                           [--ready-file PATH] [--history FILE] [--loglevel LEVEL]

Once listening it prints `origin KIND listening on URL` and writes the ready file (atomically):
`{"pid": ..., "kind": ..., "address": "127.0.0.1:40010", "url": "http://127.0.0.1:40010", "tls": null}`.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import signal
import sys
import tempfile
from pathlib import Path

import trio

from tunnel_lab.origin_fixtures.history import History
from tunnel_lab.origin_fixtures.server import KINDS, OriginConfig, format_address, serve_origin
from tunnel_lab.origin_fixtures.tls import CERT_KINDS
from tunnel_lab.wire.errors import ConfigError, TunnelLabError

log = logging.getLogger(__name__)


class _UsageError(TunnelLabError):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="tunnel-lab origin", description="Run an origin fixture on loopback.")
    p.add_argument("kind", choices=(*KINDS, "sshd"), help="what the origin does (docs/origins.md)")
    p.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT to bind (loopback; port 0: any)")
    p.add_argument("--tls", metavar="CERT", choices=CERT_KINDS,
                   help="serve HTTPS with a lab certificate: valid, or a broken kind")
    p.add_argument("--hostname", help="the name the --tls certificate is for (default localhost)")
    p.add_argument("--state", help="state directory (for the lab PKI)")
    p.add_argument("--ready-file", help="write the bound address here as JSON once listening")
    p.add_argument("--history", help="append one JSON line per request served to this file")
    p.add_argument("--loglevel", default="info", choices=("debug", "info", "warning", "error"))
    return p


def parse_listen(text: str) -> tuple[str, int]:
    """`127.0.0.1:0`, `[::1]:8080`, `localhost:0` -> (host, port); loopback only."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise ConfigError(f"--listen {text!r}: want HOST:PORT", source="--listen")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host != "localhost":
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ConfigError(f"--listen {text!r}: origin fixtures listen on loopback only",
                              source="--listen", hint="use 127.0.0.1, 127.0.0.2, ::1 or localhost")
    return host, int(port_text)


def write_ready_file(path: str | os.PathLike[str], data: dict[str, object]) -> None:
    """Write JSON to `path` atomically (temporary file in the same directory, then rename)."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh)
            fh.write("\n")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


async def _run(args: argparse.Namespace, host: str, port: int, options: OriginConfig) -> int:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            bound_host, bound_port = await nursery.start(serve_origin, args.kind, host, port, options)
            address = format_address(bound_host, bound_port)
            url = f"{'https' if args.tls else 'http'}://{address}"
            if args.kind == "tcp-echo":
                url = f"tcp://{address}"
            elif args.kind in ("udp-echo", "dns"):
                url = f"udp://{address}"
            if args.ready_file:
                write_ready_file(args.ready_file, {
                    "pid": os.getpid(), "kind": args.kind, "address": address, "url": url,
                    "tls": args.tls, "history": str(Path(args.history).absolute()) if args.history else None})
            print(f"origin {args.kind} listening on {url}", flush=True)
            async for signum in signals:
                log.info("origin kind=%s stopping on %s", args.kind, signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break
    return 0


def _unwrap(group: BaseExceptionGroup[BaseException]) -> BaseException:
    # A failure before the listener is up comes out of the nursery as a group of one.
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def main(argv: list[str]) -> int:
    """Entry point of `tunnel-lab origin`."""
    try:
        args = _parser().parse_args(argv)
    except _UsageError as exc:
        print(f"tunnel-lab origin: {exc}\n{_parser().format_usage().rstrip()}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.loglevel.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        host, port = parse_listen(args.listen)
        if args.kind == "sshd":  # a real OpenSSH server, not a trio fixture
            from tunnel_lab.lab.paths import state_dir
            from tunnel_lab.origin_fixtures import sshd

            return sshd.run(host, port, state_dir(args.state) / "sshd",
                            lambda data: write_ready_file(args.ready_file, data) if args.ready_file else None)
        ssl_context = None
        if args.tls:
            from tunnel_lab.lab.paths import state_dir
            from tunnel_lab.origin_fixtures.tls import origin_ssl_context

            ssl_context = origin_ssl_context(state_dir(args.state), args.tls, args.hostname)
        elif args.hostname:
            # Harmless: a runner may name the host for every origin, TLS or not.
            log.info("origin kind=%s --hostname %s ignored without --tls", args.kind, args.hostname)
        options = OriginConfig(ssl_context=ssl_context, history=History(args.history))
        try:
            return trio.run(_run, args, host, port, options)
        except BaseExceptionGroup as group:
            raise _unwrap(group) from None
    except TunnelLabError as exc:
        print(f"tunnel-lab: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"tunnel-lab: origin {args.kind}: cannot listen on {args.listen}: {exc.strerror or exc}",
              file=sys.stderr)
        return 1
