"""The audit trail (`babelhub.services.audit`) on a real nats-server: events kept per tenant, read back
in order page by page, never another tenant's; an action that does not read <thing>.<verb> is refused."""

from __future__ import annotations

import pytest
from nats.aio.client import Client as NATS

from babelhub.services.apikeys import Caller
from babelhub.services.audit import HUB_TENANT, Audit
from babelhub.services.broker import Subjects, provision
from babelhub.services.publisher import Publisher
from tests.hubkit import unique_prefix

ADMIN = Caller(tenant="a", scopes=frozenset({"admin"}), key_id="0123456789abcdef")
OPERATOR = Caller(tenant="", scopes=frozenset({"operator"}), key_id="operator")


@pytest.fixture
async def audit(nats_client: NATS) -> Audit:
    js = nats_client.jetstream()
    subjects = Subjects(prefix=unique_prefix())
    await provision(js, subjects, dedup_window=60.0)
    return Audit(Publisher(nats_client, js), js, subjects)


async def test_events_are_kept_per_tenant_and_read_in_pages(audit: Audit) -> None:
    for number in range(5):
        await audit.record(ADMIN, "a", "template.create", f"t{number}", {"name": f"t{number}"})
    await audit.record(ADMIN, "b", "key.create", "other")
    await audit.record(OPERATOR, "", "tenant.create", "c")
    first, cursor = await audit.read("a", limit=3)
    rest, end = await audit.read("a", after=cursor, limit=3)
    assert [event.target for event in first + rest] == [f"t{n}" for n in range(5)]
    assert all(event.actor == ADMIN.key_id and event.tenant == "a" for event in first + rest)
    assert cursor and end == 0
    (hub_event,), _ = await audit.read(HUB_TENANT)
    assert (hub_event.action, hub_event.actor, hub_event.target) == ("tenant.create", "operator", "c")


async def test_an_action_must_name_a_thing_and_a_verb(audit: Audit) -> None:
    for wrong in ("create", "tenant.", "a.b.>", "Tenant.Create", "key.*"):
        with pytest.raises(ValueError):
            await audit.record(ADMIN, "a", wrong, "x")
