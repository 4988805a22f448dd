"""Knobs (STYLE.md: every test-only behaviour a documented, named knob, logged when active): fields of the
frozen settings objects, each documented, and none a module global that tests patch."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import logging
import re
import uuid
from pathlib import Path

from tunnel_lab.connector import supervisor
from tunnel_lab.connector.settings import StatusService, TunnelSettings
from tunnel_lab.edge import cli as edge_cli
from tunnel_lab.edge.config import KNOBS, EdgeConfig, changed_knobs
from tunnel_lab.wire.credentials import Credentials

ROOT = Path(__file__).resolve().parents[2]


def _flag_fields() -> set[str]:
    """The EdgeConfig fields the edge's command line sets (keywords of its EdgeConfig call)."""
    tree = ast.parse(inspect.getsource(edge_cli.config_from_args))
    calls = [node for node in ast.walk(tree)
             if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "EdgeConfig"]
    assert len(calls) == 1
    return {kw.arg for kw in calls[0].keywords if kw.arg}


def test_every_edge_field_is_a_flag_or_a_documented_knob():
    names = {f.name for f in dataclasses.fields(EdgeConfig)}
    assert set(KNOBS) <= names
    assert names - set(KNOBS) == _flag_fields()
    doc = (ROOT / "docs" / "edge.md").read_text()
    assert [k for k in KNOBS if f"`{k}`" not in doc] == []


def test_changed_edge_knobs_are_named_with_their_default(tmp_path):
    assert changed_knobs(EdgeConfig(state_dir=tmp_path)) == []
    config = EdgeConfig(state_dir=tmp_path, write_timeout=1.0, eyeball_max_streams=7)
    assert changed_knobs(config) == [("write_timeout", 1.0, 30.0), ("eyeball_max_streams", 7, 100)]


def _settings(**knobs: float) -> TunnelSettings:
    from tunnel_lab.connector.settings import IngressRule

    rule = IngressRule(index=0, hostname=None, path=None, service=StatusService(status=503),
                       service_text="http_status:503")
    creds = Credentials(account_tag="a", tunnel_secret=b"s" * 32, tunnel_id=uuid.UUID(int=1))
    return TunnelSettings(credentials=creds, edge_addrs=("127.0.0.1:1",), ingress_rules=(rule,), **knobs)


def test_connector_knobs_are_documented_and_logged_when_changed(caplog):
    doc = (ROOT / "docs" / "connector.md").read_text()
    assert [k for k in supervisor.KNOBS if f"`{k}`" not in doc] == []
    caplog.set_level(logging.INFO, logger="tunnel_lab.connector.supervisor")
    supervisor.log_knobs(_settings())
    assert caplog.records == []
    supervisor.log_knobs(_settings(backoff_base=0.05, ha_start_interval=1.0))
    assert [r.getMessage() for r in caplog.records] == [
        "knob backoff_base=0.05s (default 1s)", "knob ha_start_interval=1s (default 0s)"]


# monkeypatch.setattr(module, "NAME", ...) or monkeypatch.setattr("pkg.module.NAME", ...) of a constant
PATCHED_CONSTANT = re.compile(
    r"""monkeypatch\.setattr\(\s*(?:[\w.]+\s*,\s*["']|["'][\w.]*\.)[A-Z][A-Z0-9_]*["']""")


def test_no_test_patches_a_module_constant():
    # Knobs are constructor arguments; patching a module's constant would bring the globals back.
    assert PATCHED_CONSTANT.search('monkeypatch.setattr(supervisor, "BACKOFF_BASE", 0.05)')
    assert PATCHED_CONSTANT.search('monkeypatch.setattr("connector.supervisor.BACKOFF_BASE", 0.05)')
    assert not PATCHED_CONSTANT.search('monkeypatch.setattr("connector.runtime", fake, raising=False)')
    patched = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        for line_no, line in enumerate(path.read_text().splitlines(), 1):
            if PATCHED_CONSTANT.search(line) and path.name != "test_knobs.py":
                patched.append(f"{path.relative_to(ROOT)}:{line_no}")
    assert patched == []
