"""Scenario files: YAML with line numbers, checked against `schema.json`, turned into a `Scenario`.

Pure (no I/O beyond reading the file): every problem becomes a `ConfigError` naming the file, the line and
what was expected, before any process starts. The JSON schema is the single source of truth for the shape
of a scenario; `validate()` interprets the subset of JSON Schema it uses, and `_check_semantics()` adds the
cross-references a schema cannot express (a route names a known tunnel, `${origins.x.url}` names an origin).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from tunnel_lab.wire.errors import ConfigError

Path_ = tuple[str | int, ...]

ACTIONS = (
    "request",
    "websocket",
    "tcp",
    "udp",
    "raw",
    "parallel",
    "wait",
    "fault",
    "clear_faults",
    "origin",
    "connector",
    "edge",
    "history",
    "sleep",
    "access_login",
    "ssh",
    "cli",
    "v4_api",
)

_VAR = re.compile(r"\$\{([^}]*)\}")
_VAR_FORMS = re.compile(
    r"^(origins\.[A-Za-z0-9_-]+\.(url|address|host|port)|edge\.(http|https|warp|api|ca)"
    r"|tunnels\.[A-Za-z0-9_-]+\.(id|name)|datacenters\.[A-Za-z0-9_-]+\.address|state|protocol"
    r"|vars\.[A-Za-z0-9_-]+|cert\.(account|zone)"
    r"|access\.(team|apps\.[A-Za-z0-9_-]+\.aud|tokens\.[A-Za-z0-9_-]+\.(id|client_id|client_secret)"
    r"|users\.[A-Za-z0-9_-]+\.cookie|assertions\.[A-Za-z0-9_-]+\.(good|expired|wrong-aud|no-exp|forged)))$"
)


@cache
def schema() -> dict[str, Any]:
    """The scenario JSON schema shipped beside this module."""
    text = resources.files("tunnel_lab.lab.runner").joinpath("schema.json").read_text(encoding="utf-8")
    result: dict[str, Any] = json.loads(text)
    return result


# --- YAML with line numbers -----------------------------------------------------------------------


@dataclass
class Document:
    """A parsed YAML document: plain Python data plus the 1-based line of every path in it."""

    data: Any
    source: str
    lines: dict[Path_, int] = field(default_factory=dict)

    def line(self, path: Path_) -> int | None:
        """The line of `path`, or of its nearest ancestor that has one."""
        while True:
            if path in self.lines:
                return self.lines[path]
            if not path:
                return None
            path = path[:-1]

    def error(self, path: Path_, message: str, hint: str | None = None) -> ConfigError:
        return ConfigError(message, source=self.source, line=self.line(path), hint=hint)


def parse_yaml(text: str, source: str) -> Document:
    """Parse one YAML document keeping line numbers; YAML syntax errors become `ConfigError`."""
    try:
        node = _compose(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        raise ConfigError(
            f"invalid YAML: {exc.problem or exc.context}",
            source=source,
            line=line,
            hint="check indentation, colons and quoting",
        ) from exc
    except yaml.YAMLError as exc:  # composer errors without marks (e.g. several documents)
        raise ConfigError(
            f"invalid YAML: {exc}", source=source, hint="a scenario file holds exactly one YAML document"
        ) from exc
    doc = Document(data=None, source=source)
    if node is None:
        raise ConfigError(
            "the file is empty",
            source=source,
            line=1,
            hint="a scenario needs name, description, topology and steps",
        )
    constructor = yaml.SafeLoader("")
    doc.data = _convert(node, (), doc, constructor)
    return doc


def _compose(text: str) -> yaml.Node | None:
    """The node tree, through libyaml where PyYAML has it (0.010 against 0.158 CPU-second for the bundled
    library, paid by every `tunnel-lab run`); a file libyaml refuses is parsed again by the pure-Python
    parser, whose error messages are the ones reported."""
    fast = getattr(yaml, "CSafeLoader", None)
    if fast is not None:
        try:
            return yaml.compose(text, Loader=fast)
        except yaml.YAMLError:
            pass
    return yaml.compose(text, Loader=yaml.SafeLoader)


def _convert(node: yaml.Node, path: Path_, doc: Document, constructor: yaml.SafeLoader) -> Any:
    doc.lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise ConfigError(
                    "a mapping key must be a plain value",
                    source=doc.source,
                    line=key_node.start_mark.line + 1,
                )
            key = str(constructor.construct_object(key_node))
            if key == "<<":
                raise ConfigError(
                    "YAML merge keys (<<) are not supported",
                    source=doc.source,
                    line=key_node.start_mark.line + 1,
                )
            if key in out:
                raise ConfigError(
                    f"duplicate key {key!r}",
                    source=doc.source,
                    line=key_node.start_mark.line + 1,
                    hint="each key may appear once in a mapping",
                )
            doc.lines[(*path, key)] = key_node.start_mark.line + 1
            out[key] = _convert(value_node, (*path, key), doc, constructor)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_convert(item, (*path, i), doc, constructor) for i, item in enumerate(node.value)]
    try:
        return constructor.construct_object(node)
    except yaml.constructor.ConstructorError as exc:
        raise ConfigError(
            f"invalid value: {exc.problem}", source=doc.source, line=node.start_mark.line + 1
        ) from exc


# --- a small JSON Schema interpreter (the subset schema.json uses) --------------------------------

_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
    "null": (type(None),),
}


def _type_ok(value: Any, name: str) -> bool:
    if isinstance(value, bool) and name in ("integer", "number"):
        return False
    return isinstance(value, _TYPES[name])


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return f"the number {value}"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    if value is None:
        return "nothing (null)"
    return type(value).__name__


def _where(path: Path_) -> str:
    if not path:
        return "the scenario"
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def validate(doc: Document) -> None:
    """Check `doc.data` against the scenario schema; raise the first problem as a `ConfigError`."""
    root = schema()
    _validate(doc.data, root, (), doc, root)


def _resolve(sch: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in sch:
        ref = sch["$ref"]
        target: Any = root
        for part in ref.removeprefix("#/").split("/"):
            target = target[part]
        merged = {k: v for k, v in sch.items() if k != "$ref"}
        sch = {**target, **merged}
    return sch


def _validate(value: Any, sch: dict[str, Any], path: Path_, doc: Document, root: dict[str, Any]) -> None:
    sch = _resolve(sch, root)
    where = _where(path)
    desc = sch.get("description")
    types = sch.get("type")
    if types is not None:
        names = [types] if isinstance(types, str) else list(types)
        if not any(_type_ok(value, t) for t in names):
            expected = " or ".join(
                ("a mapping" if t == "object" else "a list" if t == "array" else f"a {t}") for t in names
            )
            raise doc.error(path, f"{where}: expected {expected}, got {_describe(value)}", desc)
    if "enum" in sch and value not in sch["enum"]:
        choices = ", ".join(str(c) for c in sch["enum"] if not isinstance(c, float))
        raise doc.error(path, f"{where}: {_describe(value)} is not allowed", f"expected one of: {choices}")
    if isinstance(value, str) and len(value.strip()) < sch.get("minLength", 0):
        raise doc.error(path, f"{where}: must not be empty", desc)
    if isinstance(value, str) and "pattern" in sch and not re.search(sch["pattern"], value):
        raise doc.error(
            path, f"{where}: {value!r} has the wrong form", desc or f"must match {sch['pattern']}"
        )
    if isinstance(value, int | float) and not isinstance(value, bool):
        if "minimum" in sch and value < sch["minimum"]:
            raise doc.error(path, f"{where}: {value} is below the minimum {sch['minimum']}")
        if "maximum" in sch and value > sch["maximum"]:
            raise doc.error(path, f"{where}: {value} is above the maximum {sch['maximum']}")
    if isinstance(value, dict):
        props: dict[str, Any] = sch.get("properties", {})
        for key in sch.get("required", []):
            if key not in value:
                raise doc.error(path, f"{where}: missing required key {key!r}", desc)
        extra = sch.get("additionalProperties", True)
        for key, item in value.items():
            if key in props:
                _validate(item, props[key], (*path, key), doc, root)
            elif extra is False:
                known = ", ".join(props)
                hint = f"expected one of: {known}" if known else None
                close = _close_match(key, props)
                if close:
                    hint = f"did you mean {close!r}? " + (hint or "")
                raise doc.error((*path, key), f"{where}: unknown key {key!r}", hint)
            elif isinstance(extra, dict):
                _validate(item, extra, (*path, key), doc, root)
    if isinstance(value, list):
        if "minItems" in sch and len(value) < sch["minItems"]:
            raise doc.error(
                path, f"{where}: needs at least {sch['minItems']} item(s), has {len(value)}", desc
            )
        if "maxItems" in sch and len(value) > sch["maxItems"]:
            raise doc.error(
                path, f"{where}: allows at most {sch['maxItems']} item(s), has {len(value)}", desc
            )
        if "items" in sch:
            for i, item in enumerate(value):
                _validate(item, sch["items"], (*path, i), doc, root)


def _close_match(key: str, options: Iterable[str]) -> str | None:
    import difflib

    found = difflib.get_close_matches(key, list(options), n=1, cutoff=0.75)
    return found[0] if found else None


# --- the model ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataCentre:
    name: str
    address: str  # 127.0.0.0/8 or ::1

    def listen(self, port: int | str = 0) -> str:
        """The tunnel listener's `HOST:PORT` (`[::1]:PORT` for IPv6)."""
        return f"[{self.address}]:{port}" if ":" in self.address else f"{self.address}:{port}"

    @property
    def ipv6(self) -> bool:
        return ":" in self.address


@dataclass(frozen=True)
class OriginSpec:
    name: str
    kind: str
    tls: str | None = None
    hostname: str | None = None
    start: bool = True


@dataclass(frozen=True)
class TunnelSpec:
    name: str
    dns: tuple[str, ...] = ()
    ip: tuple[str, ...] = ()


@dataclass(frozen=True)
class ConnectorSpec:
    tunnel: str
    ha_connections: int = 1
    grace_period: float = 2.0
    retries: int = 2
    url: str | None = None
    ingress: tuple[dict[str, Any], ...] | None = None
    origin_request: dict[str, Any] | None = None
    warp_routing: bool = False
    flags: tuple[str, ...] = ()
    run_flags: tuple[str, ...] = ()
    credentials: str = "valid"
    token: bool = False
    start: bool = True
    wait_ready: int = 1
    protocol: str | None = None  # the scenario's own transport (UDP needs quic), over `run --protocol`


@dataclass(frozen=True)
class Step:
    """One step: `action` is the key that says what it does, `spec` its value, `line` where it is."""

    index: str  # "3" or "3.2" inside a parallel block
    action: str
    spec: Any
    line: int | None
    name: str | None = None
    after: float = 0.0
    repeat: int = 1
    concurrency: int = 1
    children: tuple[Step, ...] = ()
    http2_only: str = ""  # why the step holds only over http2 (not run under `run --protocol quic`)

    @property
    def title(self) -> str:
        label = self.name or self.action
        return (
            f"step {self.index} ({label}, line {self.line})" if self.line else f"step {self.index} ({label})"
        )


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    source: str
    tags: tuple[str, ...]
    requires: tuple[str, ...]
    timeout: float
    datacentres: tuple[DataCentre, ...]
    edge: dict[str, Any]
    origins: tuple[OriginSpec, ...]
    tunnels: tuple[TunnelSpec, ...]
    connector: ConnectorSpec | None
    steps: tuple[Step, ...]
    # connector ("builtin" | "cloudflared") -> why it is known to fail this scenario (docs/scenarios.md)
    known_deviations: dict[str, str] = field(default_factory=dict)
    access: dict[str, Any] | None = None  # topology.access (docs/access.md), checked by _check_access
    waf: dict[str, Any] | None = None  # topology.waf (docs/waf.md): custom and ratelimit rules
    http2_only: str = ""  # why the whole scenario holds only over http2 (skipped under --protocol quic)
    internet: bool = False  # topology.internet: the lab plays Cloudflare (lab/runner/internet.py)

    def origin(self, name: str) -> OriginSpec:
        return next(o for o in self.origins if o.name == name)


def parse_duration(value: Any) -> float:
    """`2`, `2.5`, `"500ms"`, `"2s"`, `"1m"` -> seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    text = str(value).strip()
    m = re.fullmatch(r"([0-9.]+)(ms|s|m)?", text)
    if not m:
        raise ValueError(f"not a duration: {value!r}")
    number = float(m.group(1))
    return {"ms": number / 1000, "s": number, "m": number * 60, None: number}[m.group(2)]


# A scenario is a test plan, not a data file: bodies that big belong in `body_generated`/`body_sha256`.
# Bigger files are refused before the YAML parser spends minutes and memory on them.
MAX_SCENARIO_BYTES = 1024 * 1024


def load_scenario(path: str | Path) -> Scenario:
    """Read, validate and build one scenario file; any problem is a `ConfigError` with file:line."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_SCENARIO_BYTES:
            raise ConfigError(f"the scenario file is {size} bytes, over the limit of {MAX_SCENARIO_BYTES}",
                              source=str(path),
                              hint="describe large bodies with body_generated / a digest, not literally")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the scenario: {exc}", source=str(path)) from exc
    return parse_scenario(text, str(path))


def parse_scenario(text: str, source: str) -> Scenario:
    """Validate and build a scenario from YAML text (`source` names it in errors)."""
    if len(text) > MAX_SCENARIO_BYTES:
        raise ConfigError(f"the scenario is {len(text)} characters, over the limit of {MAX_SCENARIO_BYTES}",
                          source=source, hint="describe large bodies with body_generated / a digest")
    doc = parse_yaml(text, source)
    validate(doc)
    return _build(doc)


def _build(doc: Document) -> Scenario:
    data = doc.data
    topo = data["topology"]
    dcs: list[DataCentre] = []
    internet = bool(topo.get("internet", False))
    for key in ("datacenters", "connector") if internet else ():
        if key in topo:
            raise doc.error(("topology", key), f"topology.{key} and topology.internet exclude each other",
                            "with internet the lab makes LAB1-LAB4 (two per region, as edge discovery "
                            "names them) and a `cli` step with `background: true` runs the connector")
    default_dcs = ["LAB1", "LAB2", "LAB3", "LAB4"] if internet else ["LAB1", "LAB2"]
    for i, item in enumerate(topo.get("datacenters", default_dcs)):
        if isinstance(item, str):
            dcs.append(DataCentre(item, f"127.0.0.{i + 1}"))
        else:
            dcs.append(DataCentre(item["name"], item.get("address", f"127.0.0.{i + 1}")))
    names = [d.name for d in dcs]
    for i, dc in enumerate(dcs):
        if names.count(dc.name) > 1:
            raise doc.error(("topology", "datacenters", i), f"data centre {dc.name!r} is listed twice")
        if not dc.address.startswith("127.") and dc.address != "::1":
            raise doc.error(
                ("topology", "datacenters", i),
                f"data centre address {dc.address!r} is not loopback",
                "the lab only uses 127.0.0.0/8 and ::1 (several data centres may share ::1: each "
                "listens on its own port)",
            )
    origins = tuple(
        OriginSpec(
            name=n, kind=o["kind"], tls=o.get("tls"), hostname=o.get("hostname"), start=o.get("start", True)
        )
        for n, o in topo.get("origins", {}).items()
    )
    tunnels = tuple(
        TunnelSpec(name=n, dns=tuple(t.get("dns", [])), ip=tuple(t.get("ip", [])))
        for n, t in topo.get("tunnels", {}).items()
    )
    connector = None
    if "connector" in topo:
        c = topo["connector"]
        if c["tunnel"] not in {t.name for t in tunnels}:
            raise doc.error(
                ("topology", "connector", "tunnel"),
                f"connector.tunnel {c['tunnel']!r} is not a tunnel",
                "name one of topology.tunnels",
            )
        ha = c.get("ha_connections", 1)
        if ha >= len(dcs):
            raise doc.error(
                ("topology", "connector", "ha_connections"),
                f"ha_connections {ha} needs at least {ha + 1} data centres, there are {len(dcs)}",
                "give the connector more --edge addresses than HA connections (docs/protocol.md §9.4)",
            )
        if "url" in c and "ingress" in c:
            raise doc.error(
                ("topology", "connector", "url"), "connector.url and connector.ingress exclude each other"
            )
        connector = ConnectorSpec(
            tunnel=c["tunnel"],
            ha_connections=ha,
            grace_period=parse_duration(c.get("grace_period", 2)),
            retries=c.get("retries", 2),
            url=c.get("url"),
            ingress=tuple(c["ingress"]) if "ingress" in c else None,
            origin_request=c.get("originRequest"),
            warp_routing=c.get("warp_routing", False),
            protocol=c.get("protocol"),
            flags=tuple(c.get("flags", [])),
            run_flags=tuple(c.get("run_flags", [])),
            credentials=c.get("credentials", "valid"),
            token=c.get("token", False),
            start=c.get("start", True),
            wait_ready=c.get("wait_ready", ha if c.get("credentials", "valid") == "valid" else 0),
        )
    steps = tuple(_build_step(doc, s, ("steps", i), str(i + 1)) for i, s in enumerate(data["steps"]))
    scenario = Scenario(
        name=data["name"],
        description=data["description"],
        source=doc.source,
        tags=tuple(data.get("tags", [])),
        requires=tuple(data.get("requires", [])),
        timeout=float(data.get("timeout", 60)),
        datacentres=tuple(dcs),
        edge=dict(topo.get("edge", {})),
        origins=origins,
        tunnels=tunnels,
        connector=connector,
        steps=steps,
        known_deviations={k: v.strip() for k, v in data.get("known_deviations", {}).items()},
        access=topo.get("access"),
        waf=topo.get("waf"),
        http2_only=str(data.get("http2_only", "")).strip(),
        internet=internet,
    )
    _check_semantics(doc, scenario)
    return scenario


def _build_step(doc: Document, raw: dict[str, Any], path: Path_, index: str) -> Step:
    actions = [k for k in raw if k in ACTIONS]
    if len(actions) != 1:
        found = ", ".join(actions) if actions else "none"
        raise doc.error(
            path,
            f"{_where(path)}: a step needs exactly one action (found {found})",
            "one of: " + ", ".join(ACTIONS),
        )
    action = actions[0]
    if ("repeat" in raw or "concurrency" in raw) and action not in ("request", "websocket", "tcp"):
        raise doc.error(
            path, f"{_where(path)}: repeat/concurrency only apply to request, websocket and tcp steps"
        )
    children: tuple[Step, ...] = ()
    if action == "parallel":
        children = tuple(
            _build_step(doc, s, (*path, "parallel", j), f"{index}.{j + 1}")
            for j, s in enumerate(raw["parallel"])
        )
    try:
        after = parse_duration(raw.get("after", 0))
    except ValueError as exc:
        raise doc.error((*path, "after"), str(exc)) from exc
    return Step(
        index=index,
        action=action,
        spec=raw[action],
        line=doc.line(path),
        name=raw.get("name"),
        after=after,
        repeat=raw.get("repeat", 1),
        concurrency=raw.get("concurrency", 1),
        children=children,
        http2_only=str(raw.get("http2_only", "")).strip(),
    )


def _walk_strings(value: Any, path: Path_) -> Iterable[tuple[Path_, str]]:
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _walk_strings(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _walk_strings(v, (*path, i))


def _access_names(access: dict[str, Any], kind: str) -> set[str]:
    """Names `${access.KIND.NAME...}` may use (assertions are signed for applications)."""
    if kind == "tokens":
        return set(access.get("service_tokens", []))
    if kind in ("apps", "assertions"):
        return set(access.get("apps", {}))
    return set(access.get("users", {}))


def _check_access(doc: Document, access: dict[str, Any]) -> None:
    """Every application valid as the v4 API would take it; users name an application."""
    from tunnel_lab.wire.access_policy import parse_app

    for name, body in access.get("apps", {}).items():
        try:
            parse_app({"name": name, **body})
        except ConfigError as exc:
            raise doc.error(("topology", "access", "apps", name), exc.message) from None
    for name, user in access.get("users", {}).items():
        if user["app"] not in access.get("apps", {}):
            raise doc.error(("topology", "access", "users", name, "app"),
                            f"user {name!r} signs in to {user['app']!r}, which is not in "
                            "topology.access.apps")


def _saves(step: Step) -> list[str]:
    """The ${vars.NAME} names a step (or its parallel branches) saves."""
    spec = step.spec
    if step.action == "cli" and isinstance(spec, dict):
        return list(spec.get("save", {}))
    if step.action == "wait" and isinstance(spec.get("log"), dict) and "save" in spec["log"]:
        return [spec["log"]["save"]]
    return [name for child in step.children for name in _saves(child)]


def _check_vars(doc: Document, sc: Scenario, path: Path_, expr: str) -> None:
    """`${vars.NAME}` only after a step that saves NAME; `${cert...}` only with topology.internet."""
    parts = expr.split(".")
    if parts[0] == "cert" and not sc.internet:
        raise doc.error(path, f"${{{expr}}} needs topology.internet: true (the cert.pem of `tunnel login`)")
    if parts[0] != "vars":
        return
    if len(path) < 2 or path[0] != "steps" or not isinstance(path[1], int):
        raise doc.error(path, f"${{{expr}}} can only be used in steps, after the step that saves it")
    before = {name for step in sc.steps[:path[1]] for name in _saves(step)}
    if parts[1] not in before:
        raise doc.error(path, f"${{{expr}}}: no earlier step saves {parts[1]!r}",
                        "save it with a cli step's `save: {NAME: REGEX}` or a log wait's `save: NAME`")


def _named_connectors(step: Step) -> list[str]:
    """The connector names a step (or its parallel branches) starts: background cli steps' `connector`."""
    spec = step.spec
    if step.action == "cli" and isinstance(spec, dict) and spec.get("background") and "connector" in spec:
        return [spec["connector"]]
    return [name for child in step.children for name in _named_connectors(child)]


def _connector_refs(step: Step) -> list[tuple[str, str]]:
    """(what, name) for every named connector a step acts on or waits for."""
    spec = step.spec
    if step.action == "connector" and "name" in spec:
        return [("connector step", spec["name"])]
    if step.action == "wait" and "connector" in spec.get("exit", {}):
        return [("wait exit", spec["exit"]["connector"])]
    component = spec.get("log", {}).get("component", "") if step.action == "wait" else ""
    if component.startswith("connector:"):
        return [("log component", component.removeprefix("connector:"))]
    return []


def _check_connector_names(sc: Scenario, step: Step, started: set[str]) -> None:
    """A named connector is acted on only after a background cli step started it; only that starts it."""
    def fail(message: str, hint: str | None = None) -> ConfigError:
        return ConfigError(f"{step.title}: {message}", source=sc.source, line=step.line, hint=hint)

    spec = step.spec
    if step.action == "cli" and isinstance(spec, dict) and "connector" in spec and not spec.get("background"):
        raise fail("cli: `connector` names a background command and needs background: true")
    if step.action == "connector" and "name" in spec and spec["action"] in ("start", "restart"):
        raise fail(f"connector {spec['name']!r} cannot {spec['action']}: a named connector is started by its "
                   "background cli step",
                   "stop it with a signal, then start it with another background cli step")
    for what, name in _connector_refs(step):
        if name not in started:
            raise fail(f"{what}: no earlier step starts a connector named {name!r}",
                       f"start it with a cli step's `background: true, connector: {name}`"
                       + (f" (earlier ones: {', '.join(sorted(started))})" if started else ""))


def _check_cli(doc: Document, sc: Scenario, step: Step) -> None:
    """`cli` and `v4_api` steps: their topology, and options that exclude each other."""
    import shlex

    def fail(message: str, hint: str | None = None) -> ConfigError:
        return ConfigError(f"{step.title}: {message}", source=sc.source, line=step.line, hint=hint)

    if not sc.internet:
        raise fail(f"{step.action} needs topology.internet: true",
                   "the connector's own commands need the lab's DNS and API (docs/scenarios.md)")
    if step.action != "cli":
        return
    spec = step.spec if isinstance(step.spec, dict) else {"args": step.spec}
    try:
        words = shlex.split(spec["args"])
    except ValueError as exc:
        raise fail(f"cannot split the arguments {spec['args']!r}: {exc}") from None
    if not words:
        raise fail("cli needs arguments (what follows CONNECTOR)")
    if spec.get("background"):
        extra = [k for k in ("expect", "save", "approve_login") if k in spec]
        if extra:
            raise fail(f"a background command has no exit to check: {', '.join(extra)} do not apply",
                       "wait for its log lines or connections in later steps")
    for name, regex in spec.get("save", {}).items():
        if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            raise fail(f"save: {name!r} is not a NAME (letters, digits, _ and -)")
        try:
            re.compile(regex)
        except re.error as exc:
            raise fail(f"save {name}: bad regex: {exc}") from None
    if "output" in spec.get("expect", {}):
        try:
            re.compile(spec["expect"]["output"])
        except re.error as exc:
            raise fail(f"expect.output: bad regex: {exc}") from None


def _check_semantics(doc: Document, sc: Scenario) -> None:
    origin_names = {o.name for o in sc.origins}
    tunnel_names = {t.name for t in sc.tunnels}
    dc_names = {d.name for d in sc.datacentres}
    for path, text in _walk_strings(doc.data, ()):
        for m in _VAR.finditer(text):
            expr = m.group(1)
            if not _VAR_FORMS.match(expr):
                raise doc.error(
                    path,
                    f"unknown variable ${{{expr}}}",
                    "use ${origins.NAME.url|address|host|port}, ${edge.http|https|warp|api|ca}, "
                    "${tunnels.NAME.id|name}, ${datacenters.NAME.address}, ${state}, ${protocol}, "
                    "${vars.NAME}, ${cert.account|zone} or ${access...} (docs/access.md)",
                )
            parts = expr.split(".")
            _check_vars(doc, sc, path, expr)
            if parts[0] == "origins" and parts[1] not in origin_names:
                raise doc.error(
                    path,
                    f"${{{expr}}} names an unknown origin {parts[1]!r}",
                    f"origins: {', '.join(sorted(origin_names)) or 'none'}",
                )
            if parts[0] == "tunnels" and parts[1] not in tunnel_names:
                raise doc.error(path, f"${{{expr}}} names an unknown tunnel {parts[1]!r}")
            if parts[0] == "datacenters" and parts[1] not in dc_names:
                raise doc.error(path, f"${{{expr}}} names an unknown data centre {parts[1]!r}")
            if parts[0] == "access" and parts[1] != "team":
                known = _access_names(sc.access or {}, parts[1])
                if parts[2] not in known:
                    raise doc.error(path, f"${{{expr}}} names an unknown {parts[1][:-1]} {parts[2]!r}",
                                    f"topology.access.{parts[1]}: {', '.join(sorted(known)) or 'none'}")
    if sc.access is not None:
        _check_access(doc, sc.access)
    if sc.waf is not None:
        from tunnel_lab.wire import waf

        for key, parse in (("custom", waf.parse_rules), ("ratelimit", waf.parse_rate_rules)):
            try:
                parse(sc.waf.get(key, []))
            except waf.WafError as exc:
                raise doc.error(("topology", "waf", key), exc.message) from None
    for o in sc.origins:
        if o.tls and o.kind in ("tcp-echo",):
            raise doc.error(
                ("topology", "origins", o.name, "tls"), f"origin {o.name!r}: kind tcp-echo has no TLS"
            )

    def check(steps: tuple[Step, ...], started: set[str]) -> None:
        for step in steps:
            spec = step.spec
            where = ("steps",)
            _check_connector_names(sc, step, started)
            if step.action == "origin" and spec["name"] not in origin_names:
                raise ConfigError(
                    f"{step.title}: unknown origin {spec['name']!r}", source=sc.source, line=step.line
                )
            if step.action in ("cli", "v4_api"):
                _check_cli(doc, sc, step)
            if step.action in ("connector",) and sc.connector is None and (
                    not sc.internet or spec["action"] in ("start", "restart")):
                raise ConfigError(
                    f"{step.title}: the topology has no connector"
                    + (" to start (start it with a background cli step)" if sc.internet else ""),
                    source=sc.source, line=step.line
                )
            if step.action == "wait" and not any(
                k in spec for k in ("ready", "connections", "log", "metric", "exit")
            ):
                raise ConfigError(
                    f"{step.title}: wait needs one of ready, connections, log, metric, exit",
                    source=sc.source,
                    line=step.line,
                )
            if step.action == "wait" and "log" in spec:
                try:
                    re.compile(spec["log"]["regex"])
                except re.error as exc:
                    raise ConfigError(
                        f"{step.title}: bad regex: {exc}", source=sc.source, line=step.line
                    ) from exc
            if step.action == "tcp":
                if spec["via"] == "access" and "host" not in spec:
                    raise ConfigError(
                        f"{step.title}: tcp via access needs host", source=sc.source, line=step.line
                    )
                if spec["via"] == "warp" and "target" not in spec:
                    raise ConfigError(
                        f"{step.title}: tcp via warp needs target", source=sc.source, line=step.line
                    )
                if spec["via"] == "warp" and not sc.edge.get("warp", False):
                    raise ConfigError(
                        f"{step.title}: tcp via warp needs topology.edge.warp: true",
                        source=sc.source,
                        line=step.line,
                    )
            if step.action == "raw" and ("send" in spec) == ("h2_rapid_reset" in spec):
                raise ConfigError(
                    f"{step.title}: raw needs exactly one of send, h2_rapid_reset",
                    source=sc.source,
                    line=step.line,
                )
            if step.action == "request" and "body" in spec and "body_generated" in spec:
                raise ConfigError(
                    f"{step.title}: body and body_generated exclude each other",
                    source=sc.source,
                    line=step.line,
                )
            del where
            check(step.children, started)

    for i, step in enumerate(sc.steps):
        # a connector started in one branch of a parallel block is not "earlier" for another branch
        check((step,), {name for before in sc.steps[:i] for name in _named_connectors(before)})


# --- selection and sharding -----------------------------------------------------------------------


def matches(sc: Scenario, pattern: str | None) -> bool:
    """pytest-like `-k`: words joined by `and`/`or`/`not`, each a substring of the name or a tag."""
    if not pattern:
        return True
    haystack = [sc.name, *sc.tags]
    tokens = re.findall(r"\(|\)|[^\s()]+", pattern)
    expr: list[str] = []
    for tok in tokens:
        if tok in ("and", "or", "not", "(", ")"):
            expr.append(tok)
        else:
            expr.append(str(any(tok.lower() in h.lower() for h in haystack)))
    try:
        return bool(eval(" ".join(expr), {"__builtins__": {}}, {}))
    except SyntaxError as exc:
        raise ConfigError(
            f"invalid -k expression {pattern!r}",
            source="-k",
            hint="words joined by and / or / not, with parentheses",
        ) from exc


def parse_shard(text: str) -> tuple[int, int]:
    """`I/N` (1-based) -> (I, N)."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or not (1 <= int(m.group(1)) <= int(m.group(2))):
        raise ConfigError(
            f"invalid --shard {text!r}", source="--shard", hint="I/N with 1 <= I <= N, e.g. 2/4"
        )
    return int(m.group(1)), int(m.group(2))


def shard(items: list[Scenario], index: int, total: int) -> list[Scenario]:
    """Shard I of N: scenarios sorted by name, every N-th from I. Stable across machines."""
    ordered = sorted(items, key=lambda s: s.name)
    return [s for i, s in enumerate(ordered) if i % total == index - 1]
