"""Process settings, read once from ``MESH_*`` environment variables and validated at start-up."""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mesh.errors import ConfigError

PREFIX = "MESH_"


def _default_data_dir() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "mesh"


class Settings(BaseModel):
    """Everything a mesh process can be configured with. Build it with `Settings.load()`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    nats_url: str | None = Field(
        default=None,
        description="NATS server URL(s), comma-separated for a cluster. Unset: use the server "
        "that `mesh up` started under the data dir.",
    )
    nats_creds: Path | None = Field(default=None, description="NATS credentials file.")
    data_dir: Path = Field(
        default_factory=_default_data_dir,
        description="Where the embedded server keeps its store, state file, logs and traces.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "console"] = "json"
    trace_exporter: Literal["auto", "otlp", "file", "console", "none"] = Field(
        default="auto",
        description="auto: OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set, else a JSON-lines file.",
    )
    trace_file: Path | None = Field(
        default=None, description="Span file for the file exporter (default: <data_dir>/traces.jsonl)."
    )
    max_message_bytes: int = Field(default=1 << 20, gt=0, description="Bigger bodies are dead-lettered.")
    max_hops: int = Field(default=32, gt=0, description="Messages past this hop count are dead-lettered.")
    concurrency: int = Field(default=64, gt=0, description="Handlers running at once per agent process.")
    drain_timeout: float = Field(
        default=30.0, gt=0, description="Seconds to finish in-flight work on SIGTERM."
    )
    connect_timeout: float = Field(default=5.0, gt=0)
    llm: Literal["auto", "offline", "anthropic"] = Field(
        default="auto", description="auto: Anthropic when ANTHROPIC_API_KEY is set, else offline."
    )
    anthropic_model: str = "claude-sonnet-4-5"
    types: str = Field(
        default="",
        description="Extra modules or .py files declaring message types, comma-separated; the CLI "
        "imports them to validate `mesh publish` and list them in `mesh schema`.",
    )
    dead_letter_stream: str = Field(default="MESH_DLQ", pattern=r"^[A-Za-z0-9_-]+$")

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Read and validate settings; a `ConfigError` names each bad variable and the fix."""
        env = os.environ if environ is None else environ
        known = {PREFIX + name.upper() for name in cls.model_fields}
        unknown = sorted(k for k in env if k.startswith(PREFIX) and k not in known)
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(key, known, n=1)
                hints.append(f"{key} (did you mean {close[0]}?)" if close else key)
            raise ConfigError(
                "unknown mesh setting(s): "
                + ", ".join(hints)
                + ". Known settings: "
                + ", ".join(sorted(known))
            )
        values: dict[str, object] = {
            name: env[PREFIX + name.upper()] for name in cls.model_fields if PREFIX + name.upper() in env
        }
        values.update(overrides)
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            problems = []
            for err in exc.errors():
                field = str(err["loc"][0]) if err["loc"] else "?"
                problems.append(f"{PREFIX}{field.upper()}={err.get('input')!r}: {err['msg']}")
            raise ConfigError("invalid mesh settings: " + "; ".join(problems)) from None

    @property
    def spans_path(self) -> Path:
        return self.trace_file or self.data_dir / "traces.jsonl"
