"""`tunnel-lab bench --py-spy DIR`: sample the edge and the connector with py-spy during chosen workloads.

py-spy is a developer tool, not a project dependency (`pip install py-spy`). Each profiled (workload, path,
process) gets `DIR/WORKLOAD-PATH-PROCESS.txt` (py-spy's collapsed stacks: one `frame;frame;... count` line
per stack, loadable by speedscope or flamegraph.pl) and `...top.txt`, a summary: self time by function, and
time spent under each project source line (file:line), which is where a fix would go.

py-spy counts a thread as busy whenever it is not blocked, so on a loaded 2-core machine the time a process
waits to be scheduled right after a syscall (a send that woke its peer) is charged to that syscall.
"""

from __future__ import annotations

import collections
import contextlib
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

PROFILED_WORKLOADS = ("get-c32", "download", "upload")
PROFILED_PROCESSES = ("edge", "connector")
ATTACH_SECONDS = 0.5
PROJECT_DIRS = ("edge", "connector", "wire", "lab", "origin_fixtures")
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>.*?)(?::(?P<line>\d+))?\)$")


def available() -> str | None:
    """The py-spy executable, or None."""
    return shutil.which("py-spy")


@contextlib.contextmanager
def recording(out_dir: Path, name: str, pids: dict[str, int], rate: int = 200) -> Iterator[None]:
    """Record each of `pids` while the body runs; write the collapsed stacks and a summary per process."""
    exe = available()
    if exe is None:
        yield
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    procs: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
    for process, pid in pids.items():
        raw = out_dir / f"{name}-{process}.txt"
        cmd = [exe, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw", "--nonblocking",
               "--output", str(raw)]
        procs[process] = (subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                           stderr=subprocess.PIPE), raw)
    time.sleep(ATTACH_SECONDS)  # py-spy needs a moment to attach; a short workload would go unsampled
    try:
        yield
    finally:
        for proc, _ in procs.values():
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        for process, (proc, raw) in procs.items():
            try:
                _, err = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
            if raw.exists():
                raw.with_suffix(".top.txt").write_text(summarize(raw.read_text()))
            else:
                (out_dir / f"{name}-{process}.error.txt").write_bytes(
                    err or b"py-spy wrote nothing: no samples (the workload was too short?)\n")


def _short(path: str) -> str:
    for marker in ("/site-packages/", "/lib/python3."):
        if marker in path:
            path = path.split(marker, 1)[1]
            return path.split("/", 1)[1] if marker == "/lib/python3." and "/" in path else path
    parts = Path(path).parts
    for i, part in enumerate(parts):
        if part in PROJECT_DIRS and i + 1 < len(parts):
            return "/".join(parts[i:])
    return path


def summarize(collapsed: str, top: int = 25) -> str:
    """Self time per function and time under each project line, from py-spy's collapsed stacks."""
    self_time: collections.Counter[str] = collections.Counter()
    under_line: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = []
        for text in stack.split(";"):
            m = _FRAME.match(text)
            if m is None:
                continue
            frames.append((m.group("func"), _short(m.group("file")), m.group("line")))
        if not frames:
            continue
        func, file, _ = frames[-1]
        self_time[f"{func} ({file})"] += n
        seen: set[str] = set()
        for func, file, lineno in frames:
            if file.split("/", 1)[0] in PROJECT_DIRS and lineno:
                key = f"{file}:{lineno} {func}"
                if key not in seen:
                    seen.add(key)
                    under_line[key] += n
    if not total:
        return "no samples\n"
    out = [f"{total} samples", "", "self time by function:"]
    out += [f"  {100 * n / total:5.1f}%  {key}" for key, n in self_time.most_common(top)]
    out += ["", "time under each project line (inclusive):"]
    out += [f"  {100 * n / total:5.1f}%  {key}" for key, n in under_line.most_common(top)]
    return "\n".join(out) + "\n"
