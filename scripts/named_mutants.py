"""Hand-written mutants of wire/ that mutmut cannot make, each of which the unit tests must kill.

mutmut mutates code inside functions only; these change module-level tables or drop a term that mutmut
would rewrite differently. For each one: copy the committed tree to a temporary directory, apply the
change, run the unit tests there, and report whether they failed (killed) or passed (survived).
Run from the repository root: `.venv/bin/python scripts/named_mutants.py` (scripts/mutation.sh runs it).
Exit status 1 if any mutant survives.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (name, file, text to replace, replacement, the tests to run)
MUTANTS = [
    ("composite list range without the tag word", "wire/capnp.py",
     "self._check_range(target.seg, target.word, words + 1, what)",
     "self._check_range(target.seg, target.word, words, what)",
     ["tests/unit/test_capnp_codec.py", "tests/unit/test_capnp_pinned.py"]),
    ("`trailer` out of the eyeball hop-by-hop set", "wire/eyeball.py",
     'b"te", b"trailer"})', 'b"te"})',
     ["tests/unit/test_eyeball.py"]),
    ("fields named in Connection kept for the eyeball", "wire/eyeball.py",
     "if k.lower() not in HOP_BY_HOP and k.lower() not in named]",
     "if k.lower() not in HOP_BY_HOP]",
     ["tests/unit/test_eyeball.py"]),
    ("BodyEncoder.encode lets one byte too many through", "wire/origin.py",
     "if self.content_length is not None and self.sent > self.content_length:",
     "if self.content_length is not None and self.sent > self.content_length + 1:",
     ["tests/unit/test_origin.py", "tests/unit/test_origin_pinned.py"]),
    ("_check_range allows one word past the segment end", "wire/capnp.py",
     "if start < 0 or start + words > self._sizes[seg]:",
     "if start < 0 or start + words > self._sizes[seg] + 1:",
     ["tests/unit/test_capnp_codec.py", "tests/unit/test_capnp_pinned.py"]),
    ("0x0B out of the sniffer's binary bytes", "wire/sniff.py",
     "| {0x0B} |", "|",
     ["tests/unit/test_sniff.py"]),
    ("form feed out of the sniffer's leading whitespace", "wire/sniff.py",
     '_WHITESPACE = b"\\t\\n\\x0c\\r "', '_WHITESPACE = b"\\t\\n\\r "',
     ["tests/unit/test_sniff.py"]),
    ("`>` out of the sniffer's tag-terminating bytes", "wire/sniff.py",
     '_TAG_END = b" >"', '_TAG_END = b" "',
     ["tests/unit/test_sniff.py"]),
]


def run_tests(tree: str, tests: list[str]) -> bool:
    """True when the tests pass in `tree`."""
    args = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
    return subprocess.run(args, cwd=tree, capture_output=True, text=True).returncode == 0


def main() -> int:
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    files = listed.decode().split("\0")[:-1]
    survived = 0
    for name, path, old, new, tests in MUTANTS:
        with tempfile.TemporaryDirectory(prefix="named-mutant-") as tmp:
            # the tracked files only: pytest puts this rootdir first on sys.path, so its wire/ is used
            subprocess.run(["cp", "-a", "--parents", "-t", tmp, *files], cwd=ROOT, check=True)
            target = Path(tmp) / path
            source = target.read_text()
            if source.count(old) != 1:
                print(f"?? {name}: the text to mutate is not in {path} exactly once; update this script")
                survived += 1
                continue
            if not run_tests(tmp, tests):  # control: the copy passes before it is mutated
                print(f"?? {name}: the tests fail without the mutant; fix them first")
                survived += 1
                continue
            target.write_text(source.replace(old, new))
            killed = not run_tests(tmp, tests)
            survived += not killed
            print(f"{'killed  ' if killed else 'SURVIVED'} {name} ({path})")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
