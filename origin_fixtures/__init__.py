"""Origins for scenarios and tests: real servers on loopback."""
