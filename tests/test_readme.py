"""The README, example config and AsyncAPI document say what the code does."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from babelhub.codecs.support import capabilities_table, markdown_table, settings_table
from babelhub.services.broker import Subjects
from babelhub.services.config import Config, Connection, HubSettings, Processor, Tenant

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_the_channel_tables_are_the_generated_ones() -> None:
    for marker, table in (("channels", capabilities_table()), ("settings", settings_table())):
        block = re.search(rf"<!-- {marker}:start -->\n(.*?)\n<!-- {marker}:end -->", README, re.DOTALL)
        assert block is not None
        assert block.group(1) == table, "run `babelhub channels` and paste its tables into the README"
    printed = subprocess.run([sys.executable, "-m", "babelhub", "channels"], capture_output=True, check=True)
    assert printed.stdout.decode().strip() == markdown_table() == f"{capabilities_table()}\n\n{settings_table()}"


def test_every_config_key_is_documented() -> None:
    example = (ROOT / "configs" / "example.toml").read_text(encoding="utf-8")
    for name in HubSettings.__struct_fields__:
        assert f"`hub.{name}`" in README, f"hub.{name} missing from the README's configuration table"
        assert re.search(rf"^{name} = ", example, re.MULTILINE), f"{name} missing from configs/example.toml"
    for table in (Tenant, Connection, Processor):
        for name in table.__struct_fields__:
            assert f".{name}`" in README or f", .{name}" in README, f"{table.__name__}.{name} undocumented"
    assert set(Config.__struct_fields__) == {"hub", "tenants", "connections", "processors"}


def test_the_quickstart_is_the_two_commands() -> None:
    quickstart = README.split("## Quickstart", 1)[1].split("##", 1)[0]
    assert "```\nmake run\nmake test\n```" in quickstart


def test_the_asyncapi_document_names_the_real_subjects() -> None:
    document = (ROOT / "docs" / "asyncapi.yaml").read_text(encoding="utf-8")
    subjects = Subjects("<prefix>")
    for address in (subjects.inbound("<tenant>", "<conversation>"), subjects.outbound("<tenant>", "<conversation>"),
                    subjects.status("<tenant>", "<conversation>"), subjects.dead_letter("<tenant>", "<stage>")):
        assert f"address: '{address}'" in document
