"""Settings: read once from MESH_* variables, validated with errors that say what to fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from mesh.wire.errors import ConfigError
from mesh.wire.settings import Settings


def test_defaults_and_overrides(tmp_path: Path) -> None:
    s = Settings.load(environ={"MESH_DATA_DIR": str(tmp_path), "MESH_CONCURRENCY": "8"})
    assert s.data_dir == tmp_path
    assert s.concurrency == 8
    assert s.spans_path == tmp_path / "traces.jsonl"
    assert s.nats_url is None


def test_settings_are_frozen() -> None:
    s = Settings.load(environ={})
    with pytest.raises(ValueError, match="frozen"):
        s.concurrency = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"MESH_CONCURRENCY": "lots"}, "MESH_CONCURRENCY='lots': Input should be a valid integer"),
        ({"MESH_CONCURRENCY": "0"}, "MESH_CONCURRENCY='0': Input should be greater than 0"),
        ({"MESH_LOG_LEVEL": "loud"}, "MESH_LOG_LEVEL='loud'"),
        ({"MESH_CONCURENCY": "4"}, "MESH_CONCURENCY (did you mean MESH_CONCURRENCY?)"),
        ({"MESH_EVENT_RETENTION": "60"}, "MESH_EVENT_RETENTION (60s) must be at least MESH_DEDUPE_WINDOW"),
        ({"MESH_PUBLISH_RETRY_ATTEMPTS": "0"}, "MESH_PUBLISH_RETRY_ATTEMPTS='0'"),
        (
            {"MESH_PUBLISH_RETRY_TIMEOUT": "300"},
            "MESH_PUBLISH_RETRY_TIMEOUT (300s) must be less than MESH_DEDUPE_WINDOW (300s)",
        ),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.load(environ=env)
    assert message in str(info.value)


def test_settings_pass_to_a_child_process_as_mesh_variables(tmp_path: Path) -> None:
    parent = Settings.load(
        environ={"MESH_REPLICAS": "3", "MESH_DATA_DIR": str(tmp_path)}, ack_wait=2.5, trace_exporter="none"
    )
    env = parent.environ()
    assert env == {
        "MESH_REPLICAS": "3",
        "MESH_DATA_DIR": str(tmp_path),
        "MESH_ACK_WAIT": "2.5",
        "MESH_TRACE_EXPORTER": "none",
    }
    assert Settings.load(environ=env) == parent
