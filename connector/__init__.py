"""Our connector: a re-implementation of `cloudflared tunnel run` on the real wire protocol."""
