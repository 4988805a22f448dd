"""Every exception the project defines derives from its base, `wire.errors.TunnelLabError` (STYLE.md,
"Errors"), so a command line's top-level `except TunnelLabError` turns any of them into a message."""

from __future__ import annotations

import importlib
import inspect

import pytest

from tests.unit.test_import_graph import ROOT, module_files, project_packages
from tunnel_lab.wire.errors import TunnelLabError

MODULES = sorted(m for m in module_files(ROOT, project_packages()) if not m.endswith("__main__"))


@pytest.mark.parametrize("name", MODULES)
def test_every_exception_derives_from_the_project_base(name):
    module = importlib.import_module(f"tunnel_lab.{name}")  # the import name of the folder's module
    defined = [obj for obj in vars(module).values()
               if inspect.isclass(obj) and issubclass(obj, BaseException)
               and obj.__module__ == module.__name__]
    assert [cls.__qualname__ for cls in defined if not issubclass(cls, TunnelLabError)] == []


def test_the_check_sees_the_modules():
    assert {"wire.errors", "edge.api", "connector.flags", "lab.runner.engine", "bench.load"} <= set(MODULES)
