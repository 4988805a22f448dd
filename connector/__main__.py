"""`python -m connector ...` is `tunnel-lab connector ...` (cloudflared's command line)."""

from __future__ import annotations

import sys

from tunnel_lab.connector.cli import main

if __name__ == "__main__":
    sys.exit(main())
