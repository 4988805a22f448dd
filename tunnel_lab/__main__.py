"""`python -m tunnel_lab ARGS` is `tunnel-lab ARGS`."""

from tunnel_lab.lab.cli import main

raise SystemExit(main())
