"""The scenario engine behind `tunnel-lab run`."""
