"""Typed channel settings: each codec declares its connections' secrets and options, and the config is
checked against them at start, so a missing, misspelt or mistyped setting is named by its path."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import msgspec
import pytest

from babelhub.codecs import available, load
from babelhub.codecs.settings import ConnectionOptions, Settings, field_docs, read_settings
from babelhub.errors import ConfigError
from babelhub.services import config as cfg
from tests import test_cross_channel, test_hub_statuses
from tests.hubkit import telegram_config

ROOT = Path(__file__).resolve().parents[1]

# What one connection of each channel cannot do without.
REQUIRED: dict[str, set[str]] = {
    "discord": {"secrets.public_key", "secrets.bot_token"},
    "evolution": {"secrets.apikey", "options.instance"},
    "google_chat": {"secrets.access_token", "secrets.audience", "secrets.signing_keys"},
    "instagram": {"secrets.access_token", "secrets.app_secret"},
    "messenger": {"secrets.page_access_token", "secrets.app_secret"},
    "slack": {"secrets.signing_secret", "secrets.bot_token"},
    "teams": {"secrets.app_id", "secrets.signing_keys", "secrets.bot_token"},
    "telegram": {"secrets.bot_token"},
    "twilio": {"secrets.account_sid", "secrets.auth_token", "options.from"},
    "webchat": set(),
    "whatsapp": {"secrets.access_token", "secrets.app_secret", "options.phone_number_id"},
}


class Variant(msgspec.Struct, frozen=True):
    """A connection's settings that work, and, for each one it cannot do without, the setting the error
    names when it is left out (itself, or the other alternative when it chose one)."""

    channel: str
    secrets: dict[str, str]
    options: dict[str, Any]
    required: dict[str, str]


def itself(*paths: str) -> dict[str, str]:
    return {path: path for path in paths}


def variants() -> dict[str, Variant]:
    """Every channel as the cross-channel test configures it (everything set that it sends and checks
    with), plus the alternatives the channels document."""
    found = {name: Variant(channel.connection.channel, dict(channel.connection.secrets),
                           dict(channel.connection.options), itself(*REQUIRED[channel.connection.channel]))
             for name, channel in test_cross_channel.channels("http://127.0.0.1:9").items()}
    found["webchat"] = Variant("webchat", {"session_key": "k" * 32}, {"allowed_origins": ["https://shop.example"]},
                               {})
    found["whatsapp-360dialog"] = Variant("whatsapp", {"api_key": "d360-key", "provider": "360dialog"}, {},
                                          {"secrets.api_key": "secrets.api_key",
                                           "secrets.provider": "secrets.access_token"})
    found["slack-socket-mode"] = Variant("slack", {"bot_token": "xoxb-1", "app_token": "xapp-1"}, {},
                                         {"secrets.bot_token": "secrets.bot_token",
                                          "secrets.app_token": "secrets.signing_secret"})
    found["twilio-api-key"] = Variant(
        "twilio", {"account_sid": "AC123", "api_key_sid": "SK1", "api_key_secret": "s"},
        {"messaging_service_sid": "MG1"},
        {**itself("secrets.account_sid", "secrets.api_key_sid", "secrets.api_key_secret"),
         "options.messaging_service_sid": "options.from"})
    found["google_chat-pubsub"] = Variant(
        "google_chat", {"access_token": "ya29", "pubsub_audience": "https://hooks.example.com/gc",
                        "pubsub_service_account": "push@p.iam.gserviceaccount.com", "pubsub_signing_keys": "{}"},
        {"pubsub": True},
        {**itself("secrets.access_token", "secrets.pubsub_audience", "secrets.pubsub_service_account",
                  "secrets.pubsub_signing_keys"), "options.pubsub": "secrets.audience"})
    return found


VARIANTS = variants()


def toml_value(value: Any) -> str:
    """A TOML value: JSON's strings, numbers and arrays are TOML's too; tables are written inline."""
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(key)} = {toml_value(item)}" for key, item in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    return json.dumps(value)


def write_config(tmp_path: Path, channel: str, secrets: dict[str, Any], options: dict[str, Any]) -> Path:
    """A config whose second connection (`$.connections[1]`) is the one under test. Should a hub start
    on it, it takes free ports."""
    path = tmp_path / "hub.toml"
    path.write_text(f"""
[hub]
http = "127.0.0.1:0"
nats_port = 0
[[tenants]]
id = "acme"
[[connections]]
id = "web"
tenant = "acme"
channel = "webchat"
[[connections]]
id = "under-test"
tenant = "acme"
channel = "{channel}"
secrets = {toml_value(secrets)}
options = {toml_value(options)}
""")
    return path


def load_error(tmp_path: Path, channel: str, secrets: dict[str, Any], options: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as caught:
        cfg.load(write_config(tmp_path, channel, secrets, options), env={})
    return str(caught.value)


# ------------------------------------------------------------------------------ the declarations


@pytest.mark.parametrize("channel", available())
def test_every_setting_is_declared_with_its_meaning(channel: str) -> None:
    codec = load(channel)
    assert issubclass(codec.option_settings, ConnectionOptions), "options extend the ones every connection takes"
    for struct in (codec.secret_settings, codec.option_settings):
        assert issubclass(struct, Settings) and struct.__struct_config__.forbid_unknown_fields
        undocumented = set(struct.__struct_fields__) - set(field_docs(struct))
        assert not undocumented, f"{struct.__name__} fields without a docstring: {undocumented}"
    for field in msgspec.structs.fields(codec.secret_settings):
        assert field.type is str, f"secret {field.name} must be text (the hub masks secrets by value)"


def test_field_docs_are_read_from_the_source_and_inherited() -> None:
    class Extended(ConnectionOptions, frozen=True, kw_only=True):
        depth: int = 1
        """How deep,
        in two lines."""
        shallow: bool = False

    assert field_docs(Extended) == {"public_url": field_docs(ConnectionOptions)["public_url"],
                                    "depth": "How deep, in two lines."}
    namespace: dict[str, Any] = {"Settings": Settings}
    exec("class Compiled(Settings, frozen=True):\n    name: str = ''\n    'no source to read this from'\n", namespace)
    assert field_docs(namespace["Compiled"]) == {}, "without source there are no docs, and no crash"


def test_the_settings_the_hub_reads_are_declared() -> None:
    """Every secret and option name the code reads by name is one some channel declares."""
    read = re.compile(r"""(?:secrets|options)(?:\.get\(|\[)\s*"(\w+)"|required_(?:secret|option)\([^,]+,\s*"(\w+)\"""")
    names = {first or second for path in (ROOT / "babelhub").rglob("*.py")
             for first, second in read.findall(path.read_text(encoding="utf-8"))}
    declaring = [load(channel) for channel in available()] + [
        point.load() for point in entry_points(group="babelhub.media")]  # telephony media providers too
    declared = {field.encode_name for plugin in declaring
                for struct in (plugin.secret_settings, plugin.option_settings)
                for field in msgspec.structs.fields(struct)}
    assert names and names <= declared, f"read but not declared: {names - declared}"


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_each_setting_is_required_exactly_when_declared_so(tmp_path: Path, name: str) -> None:
    """The working settings load; leaving out a required one fails naming its path, leaving out an
    optional one does not."""
    variant = VARIANTS[name]
    cfg.load(write_config(tmp_path, variant.channel, variant.secrets, variant.options), env={})
    present = {f"secrets.{key}" for key in variant.secrets} | {f"options.{key}" for key in variant.options}
    assert set(variant.required) <= present
    for path in sorted(present):
        kind, key = path.split(".")
        secrets = {k: v for k, v in variant.secrets.items() if (kind, k) != ("secrets", key)}
        options = {k: v for k, v in variant.options.items() if (kind, k) != ("options", key)}
        if path in variant.required:
            message = load_error(tmp_path, variant.channel, secrets, options)
            assert message.startswith(f"$.connections[1].{variant.required[path]}: missing")
        else:
            cfg.load(write_config(tmp_path, variant.channel, secrets, options), env={})


def test_the_configs_the_tests_and_examples_use_fit() -> None:
    for name in ("default.toml", "example.toml"):
        cfg.load(ROOT / "configs" / name, env={})
    connections = [telegram_config("nats://127.0.0.1:1", "http://127.0.0.1:9").connections[0]]
    connections += [channel.connection for channel in test_cross_channel.channels("http://127.0.0.1:9").values()]
    for case in test_hub_statuses.CASES:
        connections.append(cfg.Connection(id="c", tenant="t", channel=case.channel, secrets=case.secrets,
                                          options=case.options))
    for connection in connections:
        read_settings(load(connection.channel), connection.secrets, connection.options)


# ------------------------------------------------------------------------------ errors at start


def test_a_missing_secret_is_named_with_what_it_is(tmp_path: Path) -> None:
    message = load_error(tmp_path, "telegram", {"secret_token": "a-long-random-string"}, {})
    assert message.startswith("$.connections[1].secrets.bot_token: missing; telegram needs it: The bot's token")


@pytest.mark.parametrize(
    ("secrets", "options", "path"),
    [
        ({"bot_token": "123456:ABC-DEF", "bot_tokn": "x"}, {}, "secrets.bot_tokn"),
        ({"bot_token": "123456:ABC-DEF", "secret-token": "x"}, {}, "secrets.secret-token"),
        ({"bot_token": "123456:ABC-DEF"}, {"poll_timout": 30}, "options.poll_timout"),
    ],
)
def test_a_misspelt_setting_is_refused_by_name(tmp_path: Path, secrets: dict[str, str], options: dict[str, Any],
                                                path: str) -> None:
    message = load_error(tmp_path, "telegram", secrets, options)
    assert message.startswith(f"$.connections[1].{path}: telegram takes no such")
    assert "bot_token, secret_token" in message or "allowed_updates, poll_timeout" in message


@pytest.mark.parametrize(
    ("secrets", "options", "expected"),
    [
        ({"bot_token": 123456789012345}, {}, "Expected `str`, got `int` - at `$.connections[1].secrets.bot_token`"),
        ({"bot_token": ["123456:ABC-secret-value"]}, {}, "Expected `str`, got `array`"),
        ({"bot_token": "123456:ABC-secret-value"}, {"poll_timeout": "soon"},
         "$.connections[1].options.poll_timeout: Expected `int`, got `str`"),
        ({"bot_token": "123456:ABC-secret-value"}, {"poll_timeout": "30"},
         "$.connections[1].options.poll_timeout: Expected `int`, got `str`"),
        ({"bot_token": "123456:ABC-secret-value"}, {"allowed_updates": "message"},
         "$.connections[1].options.allowed_updates: Expected `array`, got `str`"),
    ],
)
def test_a_mistyped_setting_is_named_and_no_secret_echoed(tmp_path: Path, secrets: dict[str, Any],
                                                          options: dict[str, Any], expected: str) -> None:
    message = load_error(tmp_path, "telegram", secrets, options)
    assert expected in message
    assert "123456" not in message and "secret-value" not in message


def test_an_unknown_channel_is_refused_at_start(tmp_path: Path) -> None:
    message = load_error(tmp_path, "telegrm", {"bot_token": "123456:ABC-DEF"}, {})
    assert message.startswith("$.connections[1].channel: no codec for channel 'telegrm'; installed: discord")


def test_babelhub_run_exits_2_naming_the_missing_secret(tmp_path: Path) -> None:
    config = write_config(tmp_path, "slack", {"bot_token": "xoxb-0000-secret"}, {})
    done = subprocess.run([sys.executable, "-m", "babelhub", "run", "--config", str(config)], cwd=tmp_path,
                          capture_output=True, timeout=30, check=False)
    assert done.returncode == 2
    printed = done.stderr.decode()
    assert "$.connections[1].secrets.signing_secret: missing" in printed
    assert "xoxb-0000-secret" not in printed + done.stdout.decode()
