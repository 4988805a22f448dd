"""Origins for scenarios and tests: real servers on loopback.

In process: `await nursery.start(serve_origin, kind, host, port, OriginConfig(...))` gives back the bound
`(host, port)`; `OriginConfig.history.records` lists what the origin saw. From the command line:
`tunnel-lab origin KIND` (`origin_fixtures.cli`). docs/origins.md describes every kind.
"""

from tunnel_lab.origin_fixtures.bodies import body_sha256, generate_body
from tunnel_lab.origin_fixtures.history import History, RequestRecord
from tunnel_lab.origin_fixtures.kinds import echo_document
from tunnel_lab.origin_fixtures.server import KINDS, OriginConfig, serve_origin

__all__ = ["KINDS", "History", "OriginConfig", "RequestRecord", "body_sha256", "echo_document",
           "generate_body", "serve_origin"]
