"""The lab's shared infrastructure (state directory, PKI, tunnel store) and the `tunnel-lab` command."""
