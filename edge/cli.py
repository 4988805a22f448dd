"""`tunnel-lab edge` / `python -m edge`: run the fake edge in the foreground."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

import trio

from tunnel_lab.edge.config import Address, EdgeConfig, parse_address, parse_listens, parse_tunnel_listen
from tunnel_lab.wire.errors import TunnelLabError

log = logging.getLogger("tunnel_lab.edge")


def build_parser() -> argparse.ArgumentParser:
    """The command line (docs/architecture.md, "Processes"; docs/edge.md)."""
    p = argparse.ArgumentParser(
        prog="tunnel-lab edge",
        description="Run the fake Cloudflare edge: tunnel listeners for connectors (one per data "
                    "centre), eyeball listeners, and the management API.")
    p.add_argument("--state", metavar="DIR", help="state directory (env TUNNEL_LAB_STATE)")
    p.add_argument("--tunnel-listen", metavar="[LOC=]ADDR:PORT", action="append", default=[],
                   help="a TLS listener for connectors, one per data centre (repeatable; "
                        "default LAB1=127.0.0.1:7844)")
    p.add_argument("--http-listen", metavar="ADDR:PORT", action="append", default=[],
                   help="HTTP/1.1 eyeball listener (repeatable, e.g. 127.0.0.1:80 and [::1]:80)")
    p.add_argument("--https-listen", metavar="ADDR:PORT", action="append", default=[],
                   help="HTTPS eyeball listener (certificate per host by SNI; h2 and http/1.1; repeatable)")
    p.add_argument("--warp-listen", metavar="ADDR:PORT",
                   help="HTTP CONNECT proxy to private networks (`tunnel route ip`)")
    p.add_argument("--udp-forward", metavar="ADDR:PORT=DEST:PORT", action="append", default=[],
                   help="a UDP port whose datagrams go to DEST (an IP in a `tunnel route ip` network) "
                        "through the tunnel, over QUIC (repeatable; edge/udp.py)")
    p.add_argument("--api-listen", metavar="ADDR:PORT", default="127.0.0.1:0",
                   help="management API listener (default 127.0.0.1:0)")
    p.add_argument("--origin-timeout", metavar="SECONDS", type=float, default=100.0,
                   help="answer 524 when no response headers came within this time (default 100)")
    p.add_argument("--max-response-headers", metavar="BYTES", type=int, default=256 * 1024,
                   help="the lab's limit on a response header block; over it the request gets 502 "
                        "(default 262144)")
    p.add_argument("--shutdown-timeout", metavar="SECONDS", type=float, default=10.0,
                   help="on SIGINT/SIGTERM, how long in-flight streams may finish (default 10)")
    p.add_argument("--drain-timeout", metavar="SECONDS", type=float, default=30.0,
                   help="after unregisterConnection, how long in-flight streams may finish (default 30)")
    p.add_argument("--no-quic", action="store_true",
                   help="no QUIC (UDP) listeners beside the tunnel listeners: connectors get http2 only")
    p.add_argument("--processes", metavar="N", type=int, default=1,
                   help="run the data centres in N worker processes (dealt out in turn), with the management "
                        "API, faults, history and metrics whole in a parent process (default 1: one process; "
                        "docs/architecture.md, \"The edge in several processes\")")
    p.add_argument("--worker-control", metavar="FD", type=int, help=argparse.SUPPRESS)  # edge/worker.py
    p.add_argument("--ready-file", metavar="PATH", help="write the bound addresses here as JSON")
    p.add_argument("--trace", metavar="FILE",
                   help="write a protocol trace (JSON Lines, secrets redacted; docs/trace.md) to FILE")
    p.add_argument("--loglevel", default="info", choices=["debug", "info", "warning", "error"],
                   help="log level (default info)")
    return p


def config_from_args(args: argparse.Namespace) -> EdgeConfig:
    """Turn parsed flags into an EdgeConfig (ConfigError on bad values)."""
    from tunnel_lab.lab import paths

    specs = args.tunnel_listen or ["LAB1=127.0.0.1:7844"]
    tunnel_listens = tuple(parse_tunnel_listen(text, i + 1) for i, text in enumerate(specs))
    locations = [t.location for t in tunnel_listens]
    if len(set(locations)) != len(locations):
        from tunnel_lab.wire.errors import ConfigError

        raise ConfigError("two tunnel listeners share a location name", source="--tunnel-listen")

    def addr(value: str | None, flag: str) -> Address | None:
        return parse_address(value, source=flag) if value else None

    return EdgeConfig(
        state_dir=paths.state_dir(args.state),
        tunnel_listens=tunnel_listens,
        http_listens=parse_listens(args.http_listen, source="--http-listen"),
        https_listens=parse_listens(args.https_listen, source="--https-listen"),
        warp_listen=addr(args.warp_listen, "--warp-listen"),
        api_listen=addr(args.api_listen, "--api-listen"),
        ready_file=Path(args.ready_file).absolute() if args.ready_file else None,
        origin_timeout=args.origin_timeout,
        max_response_headers=args.max_response_headers,
        shutdown_timeout=args.shutdown_timeout,
        drain_timeout=args.drain_timeout,
        quic=not args.no_quic,
        udp_forwards=_udp_forwards(args.udp_forward),
        trace=Path(args.trace).absolute() if args.trace else None,
    )


async def run_edge(config: EdgeConfig, processes: int = 1) -> None:
    """Run until SIGINT/SIGTERM (graceful), a second signal stops at once."""
    from tunnel_lab.edge.cluster import Cluster
    from tunnel_lab.edge.server import Edge

    edge: Edge | Cluster = Cluster(config, processes) if processes > 1 else Edge(config)
    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            await nursery.start(edge.serve)

            async def watch() -> None:
                count = 0
                async for signum in signals:
                    count += 1
                    if count == 1:
                        log.info("received %s: graceful shutdown (again to stop at once)",
                                 signal.Signals(signum).name)
                        edge.request_shutdown()
                    else:
                        log.warning("second signal: stopping now")
                        nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            await edge.stopped.wait()
            nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    """Entry point of `tunnel-lab edge`."""
    parser = build_parser()
    args = parser.parse_args(argv)
    who = "[worker pid %(process)d] " if args.worker_control is not None else ""
    logging.basicConfig(level=getattr(logging, args.loglevel.upper()), stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)-7s {who}%(name)s: %(message)s",
                        datefmt="%Y-%m-%dT%H:%M:%S")
    for noisy in ("hpack", "h2"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.worker_control is not None:
        return _worker_main(args.worker_control)
    try:
        config = config_from_args(args)
        if args.processes > 1:
            from tunnel_lab.edge.cluster import check_supported, split_locations

            split_locations(config, args.processes)
            check_supported(config)
        trio.run(run_edge, config, args.processes)
    except (TunnelLabError, OSError, BaseExceptionGroup) as exc:
        return _report(exc, "tunnel-lab: ", "cannot start the edge: ")
    return 0


def _worker_main(control_fd: int) -> int:
    """A worker process of `--processes N` (edge/worker.py): started by the parent, which owns the signals
    (a Ctrl-C reaches the whole process group; the parent turns it into one orderly shutdown)."""
    from tunnel_lab.edge.worker import run_worker

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        trio.run(run_worker, control_fd)
    except (TunnelLabError, OSError, BaseExceptionGroup) as exc:
        return _report(exc, "tunnel-lab: edge worker: ", "cannot start: ")
    return 0


def _report(exc: BaseException, who: str, os_prefix: str) -> int:
    """The user-facing error in `exc` on stderr, exit code 1; anything else is re-raised (a bug)."""
    error = _first_error(exc)
    if error is None:
        raise exc
    prefix = os_prefix if isinstance(error, OSError) else ""
    print(f"{who}{prefix}{error}", file=sys.stderr)
    return 1


def _first_error(exc: BaseException) -> BaseException | None:
    """The user-facing error inside (possibly nested) exception groups, else None."""
    if isinstance(exc, TunnelLabError | OSError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _first_error(inner)
            if found is not None:
                return found
    return None


def _udp_forwards(values: list[str]) -> tuple[tuple[tuple[str, int], tuple[str, int]], ...]:
    from tunnel_lab.edge.udp import parse_forward
    from tunnel_lab.wire.errors import ConfigError

    out = []
    for value in values:
        try:
            out.append(parse_forward(value))
        except ValueError as exc:
            raise ConfigError(str(exc), source="--udp-forward",
                              hint="write LISTEN=DEST, e.g. 127.0.0.1:0=10.0.0.53:53") from None
    return tuple(out)
