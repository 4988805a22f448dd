"""The scenario steps that run an Access client (docs/access.md): `access_login` and `ssh`.

The client is the run's connector's: `tunnel-lab access` with our connector, `cloudflared access` with the
real one. Ours is pointed at the edge's HTTP eyeball listener (`--edge-eyeball`); cloudflared finds the
lab by name, as in the sandbox: for a cloudflared run with `topology.access`, the namespace's DNS stub
answers the team domain, the tunnels' hostnames and login.cloudflareaccess.org with the address of the
edge's HTTPS listener on port 443 (`Lab._claim_team_domain`), and SSL_CERT_FILE trusts the lab CA.

- `access_login: {url, email}` runs `access login URL`, reads the link it prints, walks it as a browser
  would (the login page, the one-time code from the management API, back to `/cdn-cgi/access/cli`), and
  expects the client to exit 0 having printed a token for `email`.
- `ssh: {host, origin, command, service_token?, expect: {stdout?, exit?}}` runs OpenSSH's `ssh` with
  `ProxyCommand=<client> access ssh --hostname %h` (plus the service token's flags) against the sshd
  origin, authenticating with that origin's client key.
"""

from __future__ import annotations

import re
import shlex
import shutil
from typing import Any

import trio

from tunnel_lab.lab.runner import client
from tunnel_lab.lab.runner.access import API_PREFIX, sign_in
from tunnel_lab.lab.runner.procs import TUNNEL_LAB
from tunnel_lab.wire import jwt
from tunnel_lab.wire.errors import TunnelLabError

LINK = re.compile(r"https://\S+/cdn-cgi/access/cli\S*")
DEFAULT_TIMEOUT = 60.0


class AccessStepError(TunnelLabError):
    """The step did not do what it expects (the message says what happened)."""


def client_argv(lab: Any, subcommand: str) -> list[str]:
    """`<client> access SUBCOMMAND` for this run, with our client's route to the edge."""
    if lab.options.connector == "cloudflared":
        return [lab.options.cloudflared or "cloudflared", "access", subcommand]
    return [*TUNNEL_LAB, "access", subcommand, "--edge-eyeball", f"http://{lab.edge_ready['http']}"]


def client_env(lab: Any) -> dict[str, str]:
    env: dict[str, str] = lab.env()
    if lab.edge_ready.get("ca"):
        env["SSL_CERT_FILE"] = str(lab.edge_ready["ca"])
    return env


async def _base(lab: Any) -> str:
    tunnels = await lab.api("GET", "/tunnels")
    return f"{API_PREFIX}/{tunnels[0]['account_tag']}/access"


async def access_login(lab: Any, spec: dict[str, Any], timeout: float) -> str:
    """Run `access login`, sign in on the link it prints; returns a summary, raises AccessStepError."""
    url, email = str(spec["url"]), str(spec["email"])
    argv = [*client_argv(lab, "login"), url]
    printed = bytearray()
    link: list[str] = []
    found = trio.Event()
    with trio.move_on_after(timeout) as scope:
        async with trio.open_nursery() as nursery:
            process = await nursery.start(_run, argv, client_env(lab), printed, link, found)
            await found.wait()
            if not link:
                code = await process.wait()
                raise AccessStepError(f"`access login` exited with {code} without printing a link: "
                                      f"{printed.decode(errors='replace')[-400:]}")
            host = urllib_host(link[0])
            path = link[0].split(host, 1)[1]
            cookie = await sign_in(lab, await _base(lab), email, host + path)
            lab.redactor.add(cookie)
            answer = await client.http_request(str(lab.edge_ready["http"]), host=host, path=path,
                                               headers=[("cookie", f"CF_Authorization={cookie}")])
            if answer.status != 200:
                raise AccessStepError(f"/cdn-cgi/access/cli answered {answer.status} after the sign-in")
            code = await process.wait()
    if scope.cancelled_caught:
        raise AccessStepError(f"`access login` did not finish within {timeout:g}s; it printed: "
                              f"{printed.decode(errors='replace')[-400:]}")
    text = printed.decode(errors="replace")
    if code != 0:
        raise AccessStepError(f"`access login` exited with {code}: {text[-400:]}")
    tokens = [t for t in re.findall(r"[\w-]+\.[\w-]+\.[\w-]+", text) if _email_of(t) is not None]
    if not tokens:
        raise AccessStepError(f"`access login` printed no token: {text[-400:]}")
    for token in tokens:
        lab.redactor.add(token)
    if _email_of(tokens[-1]) != email.lower():
        raise AccessStepError(f"the token is for {_email_of(tokens[-1])!r}, not {email!r}")
    return f"signed in as {email}"


def urllib_host(link: str) -> str:
    return link.split("://", 1)[1].split("/", 1)[0]


def _email_of(token: str) -> str | None:
    try:
        email = jwt.decode(token).claims.get("email")
    except jwt.JwtError:
        return None
    return email if isinstance(email, str) else None


async def _run(argv: list[str], env: dict[str, str], printed: bytearray, link: list[str], found: trio.Event,
               *, task_status: trio.TaskStatus[trio.Process] = trio.TASK_STATUS_IGNORED) -> None:
    """Start the client; collect stdout and stderr into `printed`; set `found` once the link shows."""
    import subprocess

    process = await trio.lowlevel.open_process(argv, env=env, stdin=subprocess.DEVNULL,
                                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    task_status.started(process)
    assert process.stdout is not None
    try:
        while chunk := await process.stdout.receive_some(65536):
            printed.extend(chunk)
            if not found.is_set():
                match = LINK.search(printed.decode(errors="replace"))
                if match:
                    link.append(match.group(0))
                    found.set()
    finally:
        found.set()  # also when the client ended without a link: the step sees `link` empty


async def ssh(lab: Any, spec: dict[str, Any], timeout: float) -> str:
    """Run one ssh command through the access client; returns its stdout, raises AccessStepError."""
    if shutil.which("ssh") is None:
        raise AccessStepError("OpenSSH's ssh client is not installed")
    origin = lab.components.get(f"origin:{spec['origin']}")
    key = origin.ready.get("client_key") if origin is not None else None
    if not key:
        raise AccessStepError(f"origin {spec['origin']!r} is not a running sshd origin")
    proxy = [*client_argv(lab, "ssh"), "--hostname", "%h"]
    if "service_token" in spec:
        name = spec["service_token"]
        proxy += ["--service-token-id", lab.access_vars[f"access.tokens.{name}.client_id"],
                  "--service-token-secret", lab.access_vars[f"access.tokens.{name}.client_secret"]]
    argv = ["ssh", "-F", "/dev/null", "-i", str(key), "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
            "-o", f"ConnectTimeout={int(timeout)}", "-o", "ProxyCommand=" + shlex.join(proxy),
            f"root@{spec['host']}", str(spec["command"])]
    with trio.move_on_after(timeout) as scope:
        done = await trio.run_process(argv, env=client_env(lab), capture_stdout=True, capture_stderr=True,
                                      check=False)
    if scope.cancelled_caught:
        raise AccessStepError(f"ssh did not finish within {timeout:g}s")
    out = done.stdout.decode(errors="replace").strip()
    expect = spec.get("expect", {})
    want_exit = int(expect.get("exit", 0))
    if done.returncode != want_exit:
        err = lab.redactor.text(done.stderr.decode(errors="replace"))[-600:]
        raise AccessStepError(f"ssh exited with {done.returncode}, expected {want_exit}: {err}")
    if "stdout" in expect and out != str(expect["stdout"]):
        raise AccessStepError(f"ssh printed {out[:200]!r}, expected {expect['stdout']!r}")
    return out
