"""`tunnel-lab trace show|diagram`: read protocol traces (docs/trace.md).

`show FILE...` prints one line per event (merged by timestamp, coloured per connection and stream on a
terminal); `diagram FILE... --ray ID` prints a Mermaid sequence diagram of one request (`--svg OUT` also
draws it as SVG). The trace of a multi-process edge names its workers' files, which are read with it. A
damaged trace is read as far as it goes: each unreadable line is reported on stderr with its file and line
number, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from tunnel_lab.lab import trace_view as tv


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tunnel-lab trace", description="Read protocol traces (docs/trace.md).")
    sub = p.add_subparsers(dest="command", required=True)
    show = sub.add_parser("show", help="the trace as a timeline, one line per event")
    show.add_argument("files", nargs="+", metavar="FILE", help="trace files (several are merged by time)")
    show.add_argument("--tunnel", metavar="ID", help="only records of this tunnel (a prefix of its id)")
    show.add_argument("--stream", metavar="N", type=int, help="only records of this stream id")
    show.add_argument("--ray", metavar="ID", help="only records of this request (its cf-ray)")
    show.add_argument("--conn", metavar="ID", help="only records of this connection (label or uuid)")
    show.add_argument("--kind", metavar="KIND", action="append", default=[],
                      help="only records of this kind or kind prefix (repeatable: h2, rpc, tls, origin, ...)")
    show.add_argument("--group", action="store_true",
                      help="group the lines by connection and stream instead of one timeline")
    show.add_argument("--color", choices=["auto", "always", "never"], default="auto",
                      help="colour per connection/stream (auto: only on a terminal)")
    diagram = sub.add_parser("diagram", help="a sequence diagram of one request (Mermaid; --svg too)")
    diagram.add_argument("files", nargs="+", metavar="FILE",
                         help="trace files (the edge's and the connector's of one run are merged)")
    diagram.add_argument("--ray", metavar="ID", required=True, help="the request's cf-ray")
    diagram.add_argument("--svg", metavar="OUT", help="also write the diagram as SVG to OUT")
    return p


def load(paths: list[str]) -> tuple[list[tv.TraceFile], list[str]]:
    """The trace files named, with the worker files a multi-process edge's trace names (each file once),
    and what could not be read."""
    files, problems = [], []
    queue: list[tuple[str, str | None]] = [(name, None) for name in paths]
    seen: set[Path] = set()
    while queue:
        name, named_by = queue.pop(0)
        key = Path(name).resolve()
        if key in seen:
            continue
        seen.add(key)
        try:
            with open(name, encoding="utf-8", errors="replace") as fh:
                trace = tv.read_trace(fh, name)
        except OSError as exc:
            problems.append(f"{name}: cannot read{f' (named by {named_by})' if named_by else ''}: "
                            f"{exc.strerror or exc}")
            continue
        files.append(trace)
        problems += trace.problems
        queue += [(str(Path(name).parent / part), name) for part in tv.parts(trace)]
    return files, problems


def main(argv: list[str] | None = None) -> int:
    """Entry point of `tunnel-lab trace`."""
    args = build_parser().parse_args(argv)
    files, problems = load(args.files)
    records = tv.merge(files)
    try:
        code = _show(args, records) if args.command == "show" else _diagram(args, records)
    except BrokenPipeError:  # `| head`
        sys.stderr.close()
        return 0
    for problem in problems:
        print(f"tunnel-lab trace: {problem}", file=sys.stderr)
    if not records:
        print("tunnel-lab trace: no readable record", file=sys.stderr)
        return 1
    return code


def _show(args: argparse.Namespace, records: list[dict[str, Any]]) -> int:
    chosen = tv.select(records, tunnel=args.tunnel, stream=args.stream, ray=args.ray, kinds=args.kind,
                       conn=args.conn)
    colour = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    start = records[0]["t"] if records else 0.0
    colours: dict[str, int] = {}
    if args.group:
        groups: dict[str, list[dict[str, Any]]] = {}
        for r in chosen:
            groups.setdefault(tv.group_key(r), []).append(r)
        for key, members in groups.items():
            print(f"== {key}")
            for r in members:
                print(tv.event_line(r, start=start, colour=colour, colours=colours))
    else:
        for r in chosen:
            print(tv.event_line(r, start=start, colour=colour, colours=colours))
    if records and not chosen:
        print("tunnel-lab trace: no record matches the filters", file=sys.stderr)
        return 1
    return 0


def _diagram(args: argparse.Namespace, records: list[dict[str, Any]]) -> int:
    steps = tv.sequence(records, args.ray)
    if not steps:
        known = tv.rays(records)
        listed = ", ".join(known[:10]) + (f" and {len(known) - 10} more" if len(known) > 10 else "")
        print(f"tunnel-lab trace: no record of ray {args.ray!r} in the trace"
              + (f"; rays there: {listed}" if known else "; the trace names no ray"), file=sys.stderr)
        return 1
    sys.stdout.write(tv.mermaid(steps, args.ray))
    if args.svg:
        try:
            Path(args.svg).write_text(tv.svg(steps, args.ray), encoding="utf-8")
        except OSError as exc:
            print(f"tunnel-lab trace: cannot write {args.svg}: {exc.strerror or exc}", file=sys.stderr)
            return 1
    return 0
