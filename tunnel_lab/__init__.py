"""tunnel-lab: an offline lab that reproduces Cloudflare Tunnel on one machine.

The repository keeps its top-level folders (wire/, edge/, connector/, lab/, bench/,
origin_fixtures/); this package exposes them under one distinct import name so an
installed tunnel-lab cannot collide with a user's own `lab/` or `bench/` folders.
"""
