"""Compiled bytecode for the lab's own modules, written once per run instead of once per process.

A scenario starts four to eight Python processes (admin steps, origins, the edge, our connector), and the
components run with `PYTHONDONTWRITEBYTECODE=1` (lab/runner/procs.py, `child_env`). Without cached
bytecode every one of them compiles every module of the project it imports: about 0.1 CPU-second per
process, a quarter of its start-up, paid some 300 times by the bundled library. So before the first
scenario the runner compiles whatever module has no valid cache yet.

The caches are hash-checked (PEP 552, `CHECKED_HASH`): an import compares the source's hash with the one
in the cache, so a source rewritten within the same second and at the same size (a mutation-testing tool,
an editor) can never run from a stale cache, which is the usual reason to keep bytecode off. They go where
Python looks for them (`__pycache__` beside each source, git-ignored); where that cannot be written (a
read-only install, which pip compiled anyway) nothing happens.
"""

from __future__ import annotations

import importlib.util
import os
import py_compile
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent.parent.parent / "tunnel_lab"
_HASH_FLAGS = 0b11  # PEP 552 flags: hash-based, check_source


def _cache_is_valid(source: Path, cache: Path) -> bool:
    """Whether `cache` matches `source`: by hash for hash-based caches, by mtime and size otherwise."""
    try:
        header = cache.read_bytes()[:16]
        if len(header) < 16 or header[:4] != importlib.util.MAGIC_NUMBER:
            return False
        flags = int.from_bytes(header[4:8], "little")
        if flags & 0b1:
            return header[8:16] == importlib.util.source_hash(source.read_bytes())
        stat = source.stat()
        mtime = int.from_bytes(header[8:12], "little")
        size = int.from_bytes(header[12:16], "little")
        return flags == 0 and mtime == int(stat.st_mtime) & 0xFFFF_FFFF and size == stat.st_size & 0xFFFF_FFFF
    except OSError:
        return False


def _sources(root: Path) -> list[Path]:
    # The package's folders are symlinks to the checkout's top-level folders: follow them.
    out: list[Path] = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        out += [Path(folder) / f for f in files if f.endswith(".py")]
    return sorted(out)


def warm(root: Path = PACKAGE_ROOT) -> int:
    """Compile every module under `root` whose cache is missing or stale; return how many were compiled."""
    compiled = 0
    for source in _sources(root):
        cache = Path(importlib.util.cache_from_source(str(source)))
        if _cache_is_valid(source, cache):
            continue
        try:
            py_compile.compile(str(source), cfile=str(cache), doraise=True,
                               invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH)
        except (OSError, py_compile.PyCompileError):
            continue  # not writable, or a broken file: the import will say what is wrong
        compiled += 1
    return compiled
