"""Secrets sealed at rest (`babelhub.services.secretbox`): AES-256-GCM bound to the connection and the
secret's name, tagged with the sealing key's id, opened with the previous key during a rotation."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest

from babelhub.redaction import SecretMask
from babelhub.services.secretbox import (
    SealedWrongly,
    SecretBox,
    key_id,
    master_keys,
    new_key,
    read_key,
    write_key_file,
)

VALUE = "123456:the-bot-token-that-must-stay-hidden"


def box() -> tuple[SecretBox, bytes]:
    key = read_key(new_key(), "test")
    return SecretBox([key]), key


def test_a_sealed_value_opens_where_it_was_sealed_and_hides_its_value() -> None:
    sealer, key = box()
    sealed = sealer.seal(VALUE, "tg", "bot_token")
    assert VALUE not in sealed and VALUE.encode() not in base64.urlsafe_b64decode(sealed.split(".")[2])
    assert sealed.startswith(f"v1.{key_id(key)}.")
    assert sealer.open(sealed, "tg", "bot_token") == VALUE
    assert sealer.seal(VALUE, "tg", "bot_token") != sealed  # a fresh nonce each time


def test_a_tampered_value_does_not_open() -> None:
    sealer, _ = box()
    sealed = sealer.seal(VALUE, "tg", "bot_token")
    version, sealed_by, body = sealed.split(".")
    data = bytearray(base64.urlsafe_b64decode(body))
    for index in (0, 12, len(data) - 1):  # the nonce, the ciphertext, the tag
        changed = bytearray(data)
        changed[index] ^= 1
        with pytest.raises(SealedWrongly, match="does not open"):
            sealer.open(f"{version}.{sealed_by}.{base64.urlsafe_b64encode(bytes(changed)).decode()}", "tg",
                        "bot_token")
    with pytest.raises(SealedWrongly):
        sealer.open("not sealed at all", "tg", "bot_token")


def test_a_value_moved_to_another_connection_or_secret_does_not_open() -> None:
    sealer, _ = box()
    sealed = sealer.seal(VALUE, "tg", "bot_token")
    with pytest.raises(SealedWrongly) as moved:
        sealer.open(sealed, "tg2", "bot_token")
    assert VALUE not in str(moved.value)
    with pytest.raises(SealedWrongly):
        sealer.open(sealed, "tg", "secret_token")


def test_rotation_opens_the_previous_keys_values_and_seals_under_the_new_one() -> None:
    old, old_key = box()
    new_key_bytes = read_key(new_key(), "test")
    sealed_before = old.seal(VALUE, "tg", "bot_token")
    during = SecretBox([new_key_bytes, old_key])
    assert during.open(sealed_before, "tg", "bot_token") == VALUE
    assert during.sealed_by(during.seal(VALUE, "tg", "bot_token")) == key_id(new_key_bytes)
    with pytest.raises(SealedWrongly, match="does not hold"):
        SecretBox([new_key_bytes]).open(sealed_before, "tg", "bot_token")


def test_key_files_are_private_and_bad_keys_are_named_by_setting(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    made = write_key_file(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    text, keys = master_keys("", str(path))
    assert [key_id(key) for key in keys] == [made] and text == path.read_text().strip()
    with pytest.raises(FileExistsError):
        write_key_file(path)  # never overwrites a key
    with pytest.raises(ValueError, match=r"hub\.master_key: a master key is 32 bytes") as short:
        master_keys(base64.urlsafe_b64encode(b"short-key-text").decode(), "")
    assert "short-key-text" not in str(short.value)
    with pytest.raises(ValueError, match=r"hub\.master_key_file: cannot read"):
        master_keys("", str(tmp_path / "missing.key"))
    with pytest.raises(ValueError, match="not both"):
        master_keys(new_key(), str(path))
    assert master_keys("", "") == ("", []) and not SecretBox([])


def test_the_mask_learns_secrets_while_it_is_in_use() -> None:
    mask = SecretMask(["configured-secret-1"])
    assert mask.text("configured-secret-1 and " + VALUE) == "*** and " + VALUE
    mask.learn([VALUE])
    assert mask.text("configured-secret-1 and " + VALUE) == "*** and ***"
    assert mask.data(VALUE.encode()) == b"***"
