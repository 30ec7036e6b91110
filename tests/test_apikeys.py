"""API keys (`babelhub.services.apikeys`) on a real nats-server: stored keys are kept as digests, checked
in full, refused once revoked; config keys name their tenant; the operator key belongs to no tenant."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from nats.aio.client import Client as NATS
from nats.js.api import KeyValueConfig

from babelhub.services.apikeys import SCOPES, ApiKeys, Refused
from tests.hubkit import unique_prefix

OPERATOR_KEY = "operator-key-of-this-test-0123456789"


@pytest.fixture
async def keys(nats_client: NATS) -> AsyncIterator[ApiKeys]:
    js = nats_client.jetstream()
    bucket = f"{unique_prefix()}_keys"
    kv = await js.create_key_value(KeyValueConfig(bucket=bucket, history=1))
    yield ApiKeys(kv, [("a", "ka1"), ("a", "ka2"), ("b", "kb")], OPERATOR_KEY)
    await js.delete_key_value(bucket)


async def test_config_keys_name_their_tenant_with_every_scope(keys: ApiKeys) -> None:
    callers = [await keys.authenticate(key) for key in ("ka1", "ka2", "kb")]
    assert [caller.tenant for caller in callers] == ["a", "a", "b"]
    assert all(caller.scopes == frozenset(SCOPES) for caller in callers)
    for wrong in ("", "ka", "ka1 ", "KB"):
        with pytest.raises(Refused):
            await keys.authenticate(wrong)


async def test_the_operator_key_belongs_to_no_tenant(keys: ApiKeys) -> None:
    operator = await keys.authenticate(OPERATOR_KEY)
    assert operator.operator and operator.tenant == ""
    assert not any(operator.may(scope) for scope in SCOPES)


async def test_a_stored_key_is_kept_as_a_digest_and_checked_in_full(keys: ApiKeys, nats_client: NATS) -> None:
    record, key = await keys.create("a", ["read"], "reporting")
    assert key.startswith(f"bh_{record.id}_") and record.digest == ""
    caller = await keys.authenticate(key)
    assert (caller.tenant, caller.scopes, caller.key_id) == ("a", frozenset({"read"}), record.id)
    assert caller.may("read") and not caller.may("send") and not caller.may("admin")
    secret = key.removeprefix(f"bh_{record.id}_")  # the secret may hold "_" itself (URL-safe base64)
    assert len(secret) == 43
    stored = (await keys._kv.get(record.id)).value
    assert secret.encode() not in stored and key.encode() not in stored
    tampered = key[:-1] + ("A" if key[-1] != "A" else "B")
    for wrong in (tampered, f"bh_{'0' * 16}_{secret}", key + "x", key[:-1]):
        with pytest.raises(Refused):
            await keys.authenticate(wrong)


async def test_admin_implies_send_and_read(keys: ApiKeys) -> None:
    _, key = await keys.create("a", ["admin"])
    caller = await keys.authenticate(key)
    assert all(caller.may(scope) for scope in SCOPES)


async def test_a_revoked_key_is_refused_and_stays_listed(keys: ApiKeys) -> None:
    kept, kept_key = await keys.create("a", ["send", "read"])
    gone, gone_key = await keys.create("a", ["read"])
    await keys.create("b", ["read"])
    revoked = await keys.revoke("a", gone.id)
    assert revoked is not None and revoked.revoked_at
    with pytest.raises(Refused, match="revoked"):
        await keys.authenticate(gone_key)
    assert (await keys.authenticate(kept_key)).tenant == "a"
    listed = await keys.list("a")
    assert {key.id for key in listed} == {kept.id, gone.id}
    assert all(key.digest == "" for key in listed)


async def test_another_tenants_key_cannot_be_revoked(keys: ApiKeys) -> None:
    theirs, key = await keys.create("b", ["read"])
    assert await keys.revoke("a", theirs.id) is None
    assert (await keys.authenticate(key)).tenant == "b"
