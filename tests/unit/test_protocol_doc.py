"""The repository stands on its own: section citations of docs/protocol.md resolve, and the golden
vectors the tests read are all in tests/vectors (and documented in its README)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.golden import FOLDERS, VECTORS_ROOT

ROOT = Path(__file__).resolve().parents[2]
PROTOCOL = ROOT / "docs" / "protocol.md"
TEXT_SUFFIXES = {".py", ".md", ".capnp", ".yml", ".yaml", ".toml", ".ini", ".cfg", ".sh", ".txt", ".json"}
# mutants: the working copy of the tree that mutmut (scripts/mutation.sh) leaves, git-ignored
SKIP_DIRS = {"vectors", "node_modules", "build", "dist", "tunnel-lab-results", "state", "__pycache__",
             "mutants"}

SECTION = r"§\d+(?:\.\d+)*"
JOIN = r"(?:\s|,|;|and|-|\u2013)*"  # "\u2013" is an en dash: "§3\u2013§5"
# `docs/protocol.md` followed by one or more sections: "§5.3", "§9.1, §9.4-§9.6", "§8 and §4.3".
CITATION = re.compile(rf"docs/protocol\.md((?:{JOIN}{SECTION})+)")
APPENDIX_CITATION = re.compile(r"docs/protocol\.md,?\s+Appendix ([A-Z])")
HEADING = re.compile(r"^(##|###) (?:(\d+)\.|(\d+\.\d+)|Appendix ([A-Z])\.) ", re.MULTILINE)
# Any other `§N`: allowed after an RFC number or inside docs/protocol.md itself; nowhere else (a bare
# section number would not say which document it means).
RFC_SECTION = re.compile(rf"RFC \d+ {SECTION}(?:{JOIN}{SECTION})*")


def _sections() -> tuple[set[str], set[str]]:
    sections, appendices = set(), set()
    for _level, number, nested, appendix in HEADING.findall(PROTOCOL.read_text()):
        if appendix:
            appendices.add(appendix)
        elif number or nested:
            sections.add(number or nested)
    return sections, appendices


def _repository_files() -> list[Path]:
    out = []
    for path in sorted(ROOT.rglob("*")):
        rel = path.relative_to(ROOT)
        if any(part.startswith(".") or part in SKIP_DIRS or part.endswith(".egg-info") for part in rel.parts):
            continue
        # This file spells citations out as examples.
        if path.is_file() and path.suffix in TEXT_SUFFIXES and path != Path(__file__).resolve():
            out.append(path)
    return out


def _cited(text: str) -> list[str]:
    return [s.lstrip("§") for m in CITATION.finditer(text) for s in re.findall(SECTION, m.group(1))]


def test_protocol_doc_has_numbered_sections() -> None:
    sections, _ = _sections()
    # Every chapter the code cites most exists, and nested numbers belong to an existing chapter.
    assert {"3", "3.7", "4.1", "5.3", "5.5", "9.4", "12"} <= sections
    assert all(s.split(".")[0] in sections for s in sections)


def test_the_citation_pattern_reads_lists_and_ranges() -> None:
    text = "see docs/protocol.md §9.1, §9.4-§9.6 and docs/protocol.md\n  §2.3; also §7 (bare)"
    assert _cited(text) == ["9.1", "9.4", "9.6", "2.3"]


def test_every_protocol_citation_names_an_existing_section() -> None:
    sections, appendices = _sections()
    files = _repository_files()
    assert PROTOCOL in files and Path(__file__).resolve() not in files
    missing, bare, seen = [], [], 0
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        rel = path.relative_to(ROOT)
        for number in _cited(text):
            seen += 1
            if number not in sections:
                missing.append(f"{rel}: §{number}")
        for letter in APPENDIX_CITATION.findall(text):
            if letter not in appendices:
                missing.append(f"{rel}: Appendix {letter}")
        if path == PROTOCOL:
            # Cross-references inside the document are bare.
            missing += [f"{rel}: {s}" for s in re.findall(SECTION, text) if s.lstrip("§") not in sections]
            continue
        rest = RFC_SECTION.sub("", CITATION.sub("", text))
        bare += [f"{rel}: {s}" for s in re.findall(SECTION, rest)]
    assert seen > 50  # the code cites the document throughout; a broken pattern must not pass silently
    assert missing == []
    assert bare == [], "say which document a § number refers to (docs/protocol.md or an RFC)"


def _documented_vector_files() -> set[str]:
    readme = (VECTORS_ROOT / "README.md").read_text()
    return set(re.findall(r"`([\w.-]+\.(?:json|log|yml))`", readme))


def test_vectors_folder_matches_its_readme() -> None:
    # Every capture folder, the QUIC one included (it has no transcripts, so it is not in FOLDERS).
    folders = [f for f in VECTORS_ROOT.iterdir() if f.is_dir()]
    assert set(FOLDERS) < set(folders)
    on_disk = {p.name for folder in folders for p in folder.iterdir() if p.name != "README.md"}
    documented = _documented_vector_files()
    assert sorted(documented - on_disk) == [], "listed in tests/vectors/README.md but missing"
    assert sorted(on_disk - documented) == [], "in tests/vectors but not described in its README"


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda p: p.name)
def test_each_vector_folder_has_its_credentials_and_transcripts(folder: Path) -> None:
    names = {p.name for p in folder.iterdir()}
    assert "creds.json" in names
    runs = {n.split("-")[0] for n in names if n.endswith("-transcript.json")}
    assert runs and all(f"{run}-cloudflared.log" in names for run in runs)


def test_every_vector_file_the_tests_name_exists() -> None:
    names = {p.name for folder in FOLDERS for p in folder.iterdir()}
    pattern = re.compile(
        r"[\"'/]([A-G]\d\d[a-z]?-[a-z0-9-]+\.json|[A-G]-(?:transcript\.json|cloudflared\.log)"
        r"|creds\.json|capnp-edge-returns\.json|ingress-config-B\.yml)[\"']")
    wanted = {m for path in (ROOT / "tests").rglob("*.py") for m in pattern.findall(path.read_text())}
    assert len(wanted) > 20
    assert sorted(wanted - names) == []
