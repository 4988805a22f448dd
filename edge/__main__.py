"""`python -m edge`."""

import sys

from tunnel_lab.edge.cli import main

sys.exit(main())
