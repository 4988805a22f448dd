"""lab.runner.leaks: the secret scan CI runs over the whole library's results."""

from __future__ import annotations

import base64
import json
from pathlib import Path

from tunnel_lab.lab.runner.leaks import leaks, main, secrets_in

SECRET = base64.b64encode(b"\x01" * 32).decode()


def make_state(root: Path) -> Path:
    state = root / "tunnel-lab-abc"
    (state / "credentials").mkdir(parents=True)
    (state / "credentials" / "t.json").write_text(json.dumps({"TunnelSecret": SECRET}))
    (state / "api-token").write_text("api-token-value-0123456789abcdef\n")
    return state


def test_secrets_are_found_literally_and_inside_a_token(tmp_path: Path) -> None:
    secrets = secrets_in(make_state(tmp_path))
    assert set(secrets) == {"api-token", "TunnelSecret of t.json"}
    token = base64.b64encode(json.dumps({"a": "x", "t": "y", "s": SECRET}).encode())
    assert leaks(b"--token " + token, secrets) == ["TunnelSecret of t.json (base64)"]
    assert leaks(b"Authorization: Bearer api-token-value-0123456789abcdef", secrets) == ["api-token"]
    assert leaks(b"--token <redacted>", secrets) == []


def test_main_exit_codes(tmp_path: Path, capsys) -> None:
    make_state(tmp_path / "states")
    results = tmp_path / "results"
    results.mkdir()
    (results / "clean.log").write_text("--- start #1: cloudflared tunnel run --token <redacted>\n")
    assert main([str(tmp_path / "states"), str(results)]) == 0
    (results / "leaky.log").write_text(f"secret {SECRET}\n")
    assert main([str(tmp_path / "states"), str(results)]) == 1
    assert "leaky.log: tunnel-lab-abc: TunnelSecret of t.json" in capsys.readouterr().err
    assert main([str(tmp_path / "nothing"), str(results)]) == 2  # no state: nothing was checked
    assert main([]) == 2


def test_access_signing_keys_are_secrets(tmp_path):  # type: ignore[no-untyped-def]
    from tunnel_lab.lab.access_store import AccessStore
    from tunnel_lab.lab.runner.leaks import leaks, secrets_in
    from tunnel_lab.lab.store import Store

    with Store(tmp_path / "state.db") as store:
        pem = AccessStore(store).signing_key().to_pem().decode()
    found = secrets_in(tmp_path)
    names = [n for n in found if n.startswith("Access signing key")]
    assert names
    line = pem.splitlines()[3]
    assert leaks(f"log: {line}".encode(), found)
