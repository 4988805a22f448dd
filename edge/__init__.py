"""The fake Cloudflare edge (trio): tunnel listeners, eyeball listeners, management API."""
