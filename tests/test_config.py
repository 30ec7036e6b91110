"""Configuration: TOML, environment overrides, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from babelhub.errors import ConfigError
from babelhub.services import config as cfg

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "hub.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", ["default.toml", "example.toml"])
def test_the_shipped_configs_load(name: str) -> None:
    config = cfg.load(ROOT / "configs" / name, env={})
    assert config.tenants and config.connections


def test_environment_and_flags_override_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[hub]\nhttp = "127.0.0.1:1"\nsubject_prefix = "x"\n')
    config = cfg.load(path, env={"BABELHUB_SUBJECT_PREFIX": "envp", "BABELHUB_HTTP": "127.0.0.1:2"},
                      overrides={"http": "127.0.0.1:3", "nats": None})
    assert config.hub.subject_prefix == "envp"
    assert config.hub.http == "127.0.0.1:3"


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ('[hub]\nhtp = "x"\n', {}, "Object contains unknown field `htp` - at `$.hub`"),
        ('[[tenants]]\nid = "a"\n[[connections]]\nid = "c"\ntenant = "a"\nchannel = "telegram"\nsecret = 1\n', {},
         "unknown field `secret` - at `$.connections[0]`"),
        ('[[tenants]]\nid = "a"\n[[connections]]\nid = "c"\ntenant = "b"\nchannel = "telegram"\n', {},
         "$.connections[0].tenant: no tenant 'b'"),
        ('[[tenants]]\nid = "a"\n[[connections]]\nid = "c"\ntenant = "a"\nchannel = "telegram"\nmax_rate = -1\n', {},
         "$.connections[0].max_rate: -1.0 is not a rate"),
        ('[[tenants]]\nid = "a"\n[[connections]]\nid = "c"\ntenant = "a"\nchannel = "telegram"\nmax_rate = nan\n', {},
         "$.connections[0].max_rate: nan is not a rate"),
        ('[[tenants]]\nid = "a.b"\n', {}, "$.tenants[0].id: 'a.b' may only use"),
        ('[[tenants]]\nid = "a"\n[[tenants]]\nid = "a"\n', {}, "$.tenants[1].id: 'a' is used twice"),
        ("", {"BABELHUB_NOPE": "1"}, "unknown environment variable BABELHUB_NOPE"),
        ("[hub\n", {}, "not valid TOML"),
    ],
)
def test_bad_configs_are_rejected_with_the_key_named(tmp_path: Path, text: str, env: dict[str, str],
                                                     message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        cfg.load(write(tmp_path, text), env=env)
    assert message in str(caught.value)
