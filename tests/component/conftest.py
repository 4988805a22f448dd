"""Fixtures shared by the component tests (one place for all of them).

The connector's timing knobs are not fixtures: tests pass them to `TunnelSettings` (see `FAST_KNOBS` in
tests/component/connector_edge.py, which `make_settings` applies by default).
"""
