"""Static checks of docker-compose.yml and the Dockerfile it builds; no Docker engine needed.

`check_compose` reads the compose document the way `docker compose up` would use it and
returns one line per problem: settings the agents would reject at start-up, agent specs
that do not load, commands `mesh` does not have, unpinned images, dangling `depends_on`,
and a Dockerfile that copies paths that are not there.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
import pytest
import yaml

from mesh.agent.declaration import Agent
from mesh.agent.loader import load_agent
from mesh.cli.main import cli
from mesh.wire.errors import ConfigError
from mesh.wire.settings import PREFIX, Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"

# Settings whose value is a URL of another service in the same compose project.
URL_SETTINGS = ("MESH_NATS_URL", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


# -- the Dockerfile ------------------------------------------------------------------


@dataclass
class Dockerfile:
    """The parts of a Dockerfile the checks need (only the final stage's ENV/USER/ENTRYPOINT)."""

    froms: list[str] = field(default_factory=list)
    stages: set[str] = field(default_factory=set)
    copies: list[list[str]] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    user: str | None = None
    entrypoint: list[str] | None = None
    entrypoint_is_exec_form: bool = True


def _instructions(text: str) -> Iterator[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction, continuation lines joined, comments dropped."""
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, rest = (pending + line).partition(" ")
        pending = ""
        yield keyword.upper(), rest.strip()


def parse_dockerfile(text: str) -> Dockerfile:
    df = Dockerfile()
    # ENV, USER and ENTRYPOINT of each named stage, which a later `FROM <stage>` inherits.
    finished: dict[str, tuple[dict[str, str], str | None, list[str] | None]] = {}
    stage = ""
    for keyword, rest in _instructions(text):
        if keyword == "FROM":
            if stage:
                finished[stage] = (df.env, df.user, df.entrypoint)
            words = [w for w in rest.split() if not w.startswith("--")]
            df.froms.append(words[0])
            stage = words[2] if len(words) == 3 and words[1].lower() == "as" else ""
            if stage:
                df.stages.add(stage)
            env, df.user, df.entrypoint = finished.get(words[0], ({}, None, None))
            df.env = dict(env)
        elif keyword in ("COPY", "ADD"):
            words = json.loads(rest) if rest.startswith("[") else shlex.split(rest)
            if any(w.startswith("--from") for w in words):
                continue  # copies from another stage or image, not from the build context
            df.copies.append([w for w in words if not w.startswith("--")][:-1])
        elif keyword == "ENV":
            words = shlex.split(rest)
            if words and "=" not in words[0]:  # legacy `ENV KEY value with spaces`
                df.env[words[0]] = " ".join(words[1:])
            else:
                for word in words:
                    key, _, value = word.partition("=")
                    df.env[key] = value
        elif keyword == "USER":
            df.user = rest
        elif keyword == "ENTRYPOINT":
            df.entrypoint_is_exec_form = rest.startswith("[")
            df.entrypoint = json.loads(rest) if df.entrypoint_is_exec_form else shlex.split(rest)
    return df


def _dockerignore(context: Path) -> list[str]:
    path = context / ".dockerignore"
    if not path.exists():
        return []
    lines = (line.strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _ignored(rel: str, patterns: list[str]) -> bool:
    """Whether .dockerignore `patterns` keep `rel` (or a parent of it) out of the context."""
    parts = Path(rel).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw.lstrip("!").strip("/")
        if pattern.startswith("**/"):
            tail = pattern[3:]
            hit = any(
                fnmatch("/".join(parts[j : i + 1]), tail) for i in range(len(parts)) for j in range(i + 1)
            )
        else:
            hit = any(fnmatch(prefix, pattern) for prefix in prefixes)
        if hit:
            ignored = not negate
    return ignored


def image_pin_problem(ref: str) -> str | None:
    """Why `ref` is not a pinned image reference, or None when it is."""
    if "@sha256:" in ref:
        return None
    if "$" in ref:
        return f"image {ref!r} is not a fixed reference"
    name = ref.rsplit("/", 1)[-1]
    if ":" not in name:
        return f"image {ref!r} has no tag (that means latest): pin a version"
    if name.rsplit(":", 1)[1] == "latest":
        return f"image {ref!r} uses the latest tag: pin a version"
    return None


def check_dockerfile(df: Dockerfile, context: Path, ignore: list[str] | None = None) -> list[str]:
    """Problems of a parsed Dockerfile built from `context` (with `ignore` as its .dockerignore)."""
    problems: list[str] = []
    ignore = _dockerignore(context) if ignore is None else ignore
    if not df.froms:
        problems.append("no FROM")
    for base in df.froms:
        if base not in df.stages and base != "scratch" and (why := image_pin_problem(base)):
            problems.append(f"FROM {why}")
    for sources in df.copies:
        copied, missing = [], []
        for src in sources:
            if Path(src).is_absolute() or ".." in Path(src).parts:
                missing.append(f"COPY {src}: outside the build context")
            elif any(c in src for c in "*?["):
                # A wildcard may match nothing, as long as the instruction copies something.
                copied += [p.relative_to(context).as_posix() for p in sorted(context.glob(src))]
            elif (context / src).exists():
                copied.append(src.rstrip("/") or ".")
            else:
                missing.append(f"COPY {src}: no such path in the build context")
        problems += missing
        if not copied and not missing:
            problems.append(f"COPY {' '.join(sources)}: nothing matches")
        problems += [f"COPY {rel}: excluded by .dockerignore" for rel in copied if _ignored(rel, ignore)]
    if df.user is None or df.user.split(":")[0] in ("root", "0"):
        problems.append("runs as root: add a USER")
    if not df.entrypoint_is_exec_form:
        problems.append("ENTRYPOINT in shell form: use the exec form so SIGTERM reaches mesh")
    return problems


# -- the compose file ----------------------------------------------------------------


def _depends_on(service: Mapping[str, Any]) -> list[str]:
    deps = service.get("depends_on") or []
    return list(deps) if isinstance(deps, Mapping) else [str(d) for d in deps]


def _environment(service: Mapping[str, Any]) -> dict[str, Any]:
    env = service.get("environment") or {}
    if isinstance(env, Mapping):
        return dict(env)
    pairs = (str(item).partition("=") for item in env)
    return {key: (value if sep else None) for key, sep, value in pairs}


def _named_volumes(service: Mapping[str, Any]) -> list[str]:
    names = []
    for volume in service.get("volumes") or []:
        if isinstance(volume, Mapping):
            if volume.get("type") == "volume" and volume.get("source"):
                names.append(str(volume["source"]))
        elif ":" in volume and not volume.startswith((".", "/", "~", "$")):
            names.append(volume.split(":", 1)[0])
    return names


def _build(service: Mapping[str, Any], root: Path) -> tuple[Path, Path]:
    """(context dir, Dockerfile path) of a service's `build`."""
    build = service["build"]
    if isinstance(build, str):
        build = {"context": build}
    context = (root / build.get("context", ".")).resolve()
    return context, context / build.get("dockerfile", "Dockerfile")


def _check_settings(env: Mapping[str, Any]) -> list[str]:
    """What `Settings.load` would say about the MESH_* part of a container's environment."""
    known = {PREFIX + name.upper() for name in Settings.model_fields}
    problems = [
        f"{key}={value!r}: quote it; compose rejects unquoted booleans"
        for key, value in env.items()
        if isinstance(value, bool)
    ]
    # A key without a value is passed through from the host: only its name can be checked.
    mesh_env = {
        key: "" if value is None else str(value)
        for key, value in env.items()
        if key.startswith(PREFIX) and (value is not None or key not in known)
    }
    try:
        Settings.load(environ=mesh_env)
    except ConfigError as exc:
        problems.append(str(exc))
    return problems


def _check_urls(env: Mapping[str, Any], services: Mapping[str, Any], deps: list[str]) -> list[str]:
    problems = []
    for key in URL_SETTINGS:
        value = env.get(key)
        if not isinstance(value, str) or "$" in value:
            continue
        for url in filter(None, (u.strip() for u in value.split(","))):
            host = urlsplit(url).hostname
            if host not in services:
                problems.append(f"{key}={url}: host {host!r} is not a service of this file")
            elif host not in deps:
                problems.append(f"{key}={url}: add {host!r} to depends_on")
    return problems


def _check_mesh_command(args: list[str]) -> list[str]:
    """Problems of `mesh <args>`: the subcommand, its arguments, and for `run` the agent spec."""
    if not args:
        return ["no command: the image's default just prints `mesh --help`"]
    name, rest = args[0], args[1:]
    command = cli.commands.get(name)
    if command is None:
        return [f"command {args!r}: `mesh` has no subcommand {name!r} (it has {', '.join(cli.commands)})"]
    try:
        ctx = command.make_context(f"mesh {name}", list(rest))
    except (click.ClickException, click.exceptions.Exit) as exc:
        message = exc.format_message() if isinstance(exc, click.ClickException) else "exits at once"
        return [f"command {args!r}: {message}"]
    if name == "run":
        spec = ctx.params["spec"]
        try:
            agent = load_agent(spec)
        except Exception as exc:  # ConfigError, or whatever importing the module raised
            return [f"agent spec {spec!r} does not load: {exc}"]
        if not isinstance(agent, Agent):
            return [f"agent spec {spec!r} is a {type(agent).__name__}, not a mesh.Agent"]
    return []


def check_compose(doc: Mapping[str, Any], root: Path = ROOT) -> list[str]:
    """Every problem found in a parsed compose document, as `<service or file>: <problem>`."""
    services: Mapping[str, Any] = doc.get("services") or {}
    if not services:
        return ["no services"]
    declared_volumes = set(doc.get("volumes") or {})
    dockerfiles: dict[Path, Dockerfile | None] = {}
    problems: list[str] = []

    for name, service in services.items():
        found: list[str] = []
        deps = _depends_on(service)
        found += [f"depends_on names undefined service {dep!r}" for dep in deps if dep not in services]
        found += [
            f"volume {v!r} is not declared under the top-level volumes"
            for v in _named_volumes(service)
            if v not in declared_volumes
        ]
        env = _environment(service)

        if "build" not in service:
            if "image" not in service:
                found.append("neither image nor build")
            elif why := image_pin_problem(str(service["image"])):
                found.append(why)
            found += _check_settings(env)
        else:
            context, path = _build(service, root)
            rel = path.relative_to(root) if path.is_relative_to(root) else path
            if path not in dockerfiles:
                dockerfiles[path] = None
                if path.is_file():
                    dockerfiles[path] = parse_dockerfile(path.read_text())
                    problems += [f"{rel}: {p}" for p in check_dockerfile(dockerfiles[path], context)]
            if dockerfiles[path] is None:
                found.append(f"build: no Dockerfile at {rel}")
            image = dockerfiles[path]
            if image is not None:
                # The container sees the image's ENV overlaid by the service's environment.
                found += _check_settings({**image.env, **env})
                entrypoint = service.get("entrypoint", image.entrypoint)
                if isinstance(entrypoint, str):
                    entrypoint = shlex.split(entrypoint)
                if entrypoint != ["mesh"]:
                    found.append(f"entrypoint is {entrypoint!r}, not ['mesh']")
                else:
                    command = service.get("command")
                    args = shlex.split(command) if isinstance(command, str) else list(command or [])
                    found += _check_mesh_command([str(a) for a in args])
        found += _check_urls(env, services, deps)
        problems += [f"{name}: {p}" for p in found]
    return problems


def load_compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(doc, dict)
    return doc


# -- tests ---------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _own_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading an agent can open its state (the memory service opens its store): keep that
    in a temporary directory, never in the user's own data dir."""
    monkeypatch.setenv("MESH_DATA_DIR", str(tmp_path / "data"))


def test_compose_file_has_no_problems() -> None:
    assert check_compose(load_compose()) == []


def test_compose_runs_each_demo_agent_as_the_service_of_its_name() -> None:
    from mesh.agents.support import AGENTS

    services = load_compose()["services"]
    for spec in AGENTS:
        name = load_agent(spec).name
        assert services[name]["command"] == ["run", spec]
        assert set(_depends_on(services[name])) - {"qdrant"} == {"nats", "jaeger", "setup"}


def test_compose_gives_each_agent_its_own_credentials_and_no_other() -> None:
    """Authentication is on: nats-server reads the users `creds` issued, and each agent
    mounts only its own identity's directory of the `auth` volume (a subpath)."""
    from mesh.agents.support import AGENTS

    services = load_compose()["services"]
    assert "/auth/nats.conf" in services["nats"]["command"]
    assert set(_depends_on(services["nats"])) == {"creds"}
    issued = services["creds"]["command"][services["creds"]["command"].index("--agents") + 1].split(",")
    for spec in AGENTS:
        name = load_agent(spec).name
        assert spec in issued
        env = _environment(services[name])
        assert env["MESH_NATS_CREDS"] == f"/creds/{name}.creds"
        mount, public = services[name]["volumes"]
        assert mount["source"] == "auth" and mount["read_only"] is True
        assert mount["volume"]["subpath"] == f"agents/{name}"
        # and the public keys it verifies senders against, no seed
        assert public["source"] == "auth" and public["volume"]["subpath"] == "public"
        assert env["MESH_IDENTITIES"] == public["target"]


def test_image_pin_problem() -> None:
    assert image_pin_problem("nats:2.11.9") is None
    assert image_pin_problem("localhost:5000/team/app:1.2") is None
    assert image_pin_problem("nats@sha256:" + "0" * 64) is None
    assert "no tag" in str(image_pin_problem("localhost:5000/team/app"))
    assert "latest" in str(image_pin_problem("qdrant/qdrant:latest"))


def _replace(doc: dict[str, Any], service: str, **values: Any) -> None:
    # The agents share their `environment`, `depends_on` and `build` objects through a YAML
    # merge key, so a change must replace a value, never mutate it in place.
    doc["services"][service] = {**doc["services"][service], **values}


def test_broken_document_yields_the_matching_problems() -> None:
    doc = load_compose()
    env = doc["services"]["triage"]["environment"]
    _replace(doc, "triage", environment={**env, "MESH_QDRANT_ADDRESS": "http://qdrant:6333"})
    _replace(doc, "research", command=["run", "mesh.agents.support.nope:agent"])
    _replace(doc, "writer", depends_on=["nats", "jaeger", "redis"])

    problems = check_compose(doc)

    assert len(problems) == 3, problems
    research, triage, writer = sorted(problems)
    assert triage.startswith("triage: unknown mesh setting(s): MESH_QDRANT_ADDRESS")
    assert research.startswith("research: agent spec 'mesh.agents.support.nope:agent' does not load")
    assert writer == "writer: depends_on names undefined service 'redis'"


BROKEN: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "latest image": (lambda d: _replace(d, "qdrant", image="qdrant/qdrant:latest"), "qdrant: image"),
    "untagged image": (lambda d: _replace(d, "nats", image="nats"), "nats: image 'nats' has no tag"),
    "unknown subcommand": (
        lambda d: _replace(d, "triage", command=["serve", "mesh.agents.support.triage:agent"]),
        "triage: command ['serve', 'mesh.agents.support.triage:agent']: `mesh` has no subcommand",
    ),
    "missing argument": (lambda d: _replace(d, "triage", command="run"), "triage: command ['run']: Missing"),
    "not an agent": (
        lambda d: _replace(d, "writer", command=["run", "mesh.agents.support.writer:on_findings"]),
        "writer: agent spec 'mesh.agents.support.writer:on_findings' does not load",
    ),
    "no command": (lambda d: _replace(d, "writer", command=None), "writer: no command"),
    "bad setting value": (
        lambda d: _replace(d, "triage", environment={"MESH_LOG_LEVEL": "verbose"}),
        "triage: invalid mesh settings: MESH_LOG_LEVEL='verbose'",
    ),
    "unquoted boolean": (
        lambda d: _replace(d, "jaeger", environment={"COLLECTOR_OTLP_ENABLED": True}),
        "jaeger: COLLECTOR_OTLP_ENABLED=True: quote it",
    ),
    "nats on localhost": (
        lambda d: _replace(d, "triage", environment=["MESH_NATS_URL=nats://localhost:4222"]),
        "triage: MESH_NATS_URL=nats://localhost:4222: host 'localhost' is not a service",
    ),
    "url without depends_on": (
        lambda d: _replace(d, "triage", depends_on=["nats"]),
        "triage: OTEL_EXPORTER_OTLP_ENDPOINT=http://jaeger:4318: add 'jaeger' to depends_on",
    ),
    "missing Dockerfile": (
        lambda d: _replace(d, "triage", build={"context": ".", "dockerfile": "Nope.Dockerfile"}),
        "triage: build: no Dockerfile at",
    ),
    "entrypoint override": (
        lambda d: _replace(d, "triage", entrypoint="python -m mesh"),
        "triage: entrypoint is ['python', '-m', 'mesh'], not ['mesh']",
    ),
    "undeclared volume": (
        lambda d: _replace(d, "qdrant", volumes=["qdrant-store:/qdrant/storage"]),
        "qdrant: volume 'qdrant-store' is not declared",
    ),
}


@pytest.mark.parametrize("case", BROKEN)
def test_check_compose_finds(case: str) -> None:
    doc = load_compose()
    breaks, expected = BROKEN[case]
    breaks(doc)
    problems = check_compose(doc)
    assert any(p.startswith(expected) for p in problems), problems


def test_check_dockerfile_finds_problems(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "build").mkdir()
    text = """
        FROM python:latest
        COPY pyproject.toml \\
             missing.txt ./
        COPY build/ build/
        COPY --from=ghcr.io/astral-sh/uv:0.4 /uv /bin/uv
        ENTRYPOINT mesh
    """
    problems = check_dockerfile(parse_dockerfile(text), tmp_path, ignore=["build", "*.md"])
    assert problems == [
        "FROM image 'python:latest' uses the latest tag: pin a version",
        "COPY missing.txt: no such path in the build context",
        "COPY build: excluded by .dockerignore",
        "runs as root: add a USER",
        "ENTRYPOINT in shell form: use the exec form so SIGTERM reaches mesh",
    ]


def test_dockerfile_installs_the_project_as_mesh_with_its_data_dir() -> None:
    df = parse_dockerfile((ROOT / "Dockerfile").read_text())
    assert df.froms == ["python:3.11-slim"]
    assert df.entrypoint == ["mesh"]
    assert df.env["MESH_DATA_DIR"] == "/data"
    copied = {src.rstrip("/") for sources in df.copies for src in sources}
    assert {"pyproject.toml", "README.md", "mesh", "schemas", "agents"} <= copied
