"""What keeps the scenario library fast: bytecode compiled once per run (hash-checked), the run order,
the default number of jobs, the fork server's switch, and `tunnel-lab bench library`'s verdicts."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from tunnel_lab.bench import library
from tunnel_lab.lab.runner import bytecode
from tunnel_lab.lab.runner.cli import build_parser, default_jobs
from tunnel_lab.lab.runner.loader import Scenario
from tunnel_lab.lab.runner.runall import longest_first


def _cache(path: Path) -> Path:
    return Path(importlib.util.cache_from_source(str(path)))


def test_warm_compiles_once_and_checks_the_source_hash(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    module = tmp_path / "pkg" / "mod.py"
    module.write_text("VALUE = 1\n")
    assert bytecode.warm(tmp_path) == 1
    flags = int.from_bytes(_cache(module).read_bytes()[4:8], "little")
    assert flags == 0b11  # PEP 552: hash-based, checked against the source at every import
    assert bytecode.warm(tmp_path) == 0  # up to date: nothing to do
    # Same size, same mtime, other text: only the hash tells, and warm() sees it.
    stat = module.stat()
    module.write_text("VALUE = 2\n")
    os.utime(module, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert bytecode.warm(tmp_path) == 1


def test_warm_accepts_a_valid_timestamp_cache(tmp_path: Path) -> None:
    import py_compile

    module = tmp_path / "mod.py"
    module.write_text("VALUE = 1\n")
    py_compile.compile(str(module), cfile=str(_cache(module)), doraise=True,
                       invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP)
    assert bytecode.warm(tmp_path) == 0  # what pip writes at install time is good enough


def test_warm_skips_what_it_cannot_write(tmp_path: Path) -> None:
    module = tmp_path / "mod.py"
    module.write_text("VALUE = 1\n")
    (tmp_path / "__pycache__").write_text("a file where the cache folder would go")
    assert bytecode.warm(tmp_path) == 0


def _scenario(name: str, timeout: float) -> Scenario:
    return Scenario(name=name, description="", source=f"{name}.yaml", tags=(), requires=(), timeout=timeout,
                    datacentres=(), edge={}, origins=(), tunnels=(), connector=None, steps=())


def test_longest_first_keeps_the_order_among_equals() -> None:
    order = longest_first([_scenario("a", 30), _scenario("b", 90), _scenario("c", 30), _scenario("d", 60)])
    assert [s.name for s in order] == ["b", "d", "a", "c"]


def test_jobs_default_to_six_per_core() -> None:
    cores = len(os.sched_getaffinity(0))
    assert default_jobs() == 6 * cores
    assert build_parser().parse_args([]).jobs == 6 * cores
    assert build_parser().parse_args(["--jobs", "1"]).jobs == 1


def test_processes_are_forked_unless_told_otherwise() -> None:
    assert build_parser().parse_args([]).fork_server is True
    assert build_parser().parse_args(["--no-fork-server"]).fork_server is False


def test_bench_library_gives_a_verdict_for_the_whole_library_only() -> None:
    run = library.LibraryRun("builtin", "http2", wall=30.0, cpu=50.0, summary={"passed": 66})
    slow = library.LibraryRun("cloudflared", "quic", wall=120.0, summary={"passed": 60, "skipped": 6})
    table = library.render([run, slow], 2, whole=True)
    assert "met; 66 passed" in table
    assert "missed; 60 passed, 6 skipped" in table
    assert "selection (no verdict)" in library.render([run], 2, whole=False)
    assert library.is_selection(["-k", "http"]) and library.is_selection(["x.yaml"])
    assert not library.is_selection(["--jobs", "2"])
    assert run.as_json()["ratio_to_target"] == 0.75
