"""What the records keeper remembers of its last writes (`Revisions`): a read saved, never a write lost.

Two `ConversationIndex` / `Contacts` objects on one real bucket stand for two hub processes sharing the
keeper's consumer: each one's remembered revision goes stale when the other writes, and its next write
must notice (a revision conflict), read again, and count what the other wrote."""

from __future__ import annotations

from datetime import UTC, datetime

from nats.aio.client import Client as NATS

from babelhub import canonical as c
from babelhub.services.contacts import Contacts
from babelhub.services.conversationindex import ConversationIndex
from babelhub.services.kvscan import open_bucket
from babelhub.services.publisher import Publisher
from babelhub.services.revisions import Revisions
from tests.hubkit import unique_prefix

TENANT = "acme"
AT = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


SENDER = c.sender_id(TENANT, "tg", "7")


def inbound(conversation: str) -> c.Message:
    return c.Message(id=c.new_id(), tenant=TENANT, ts=AT, direction="inbound",
                     conversation=c.Conversation(id=conversation, connection="tg", channel="telegram"),
                     sender=c.Sender(id=SENDER, native_id="7", name="Ada"),
                     parts=[c.Text(text=f"hello in {conversation}")])


def test_the_least_recently_used_key_goes_first() -> None:
    seen: Revisions[str] = Revisions(size=2)
    seen.seen("a", "A", 1)
    seen.seen("b", "B", 2)
    assert seen.get("a") == ("A", 1)  # "a" is now the most recently used
    seen.seen("c", "C", 3)
    assert (seen.get("a"), seen.get("b"), seen.get("c")) == (("A", 1), None, ("C", 3))
    seen.forget("a")
    assert seen.get("a") is None


async def test_two_processes_noting_one_conversation_count_every_message_once(nats_client: NATS) -> None:
    js = nats_client.jetstream()
    kv = await open_bucket(js, f"{unique_prefix()}_conversation_index", 1)
    first, second = (ConversationIndex(kv, Publisher(nats_client, js)) for _ in range(2))
    await first.note(inbound("c1"), 1, AT)
    await second.note(inbound("c1"), 2, AT)  # first's remembered record is stale from here on
    await first.note(inbound("c1"), 3, AT)
    await first.note(inbound("c1"), 2, AT)  # a redelivery: counted already
    record = await first.get(TENANT, "c1")
    assert record is not None and (record.message_count, record.last_seq) == (3, 3)

    await second.remove(TENANT, "c1")  # the conversation erased by the other process
    await first.note(inbound("c1"), 4, AT)
    record = await second.get(TENANT, "c1")
    assert record is not None and (record.message_count, record.last_seq) == (1, 4)


async def test_two_processes_hearing_one_person_keep_every_conversation(nats_client: NATS) -> None:
    js = nats_client.jetstream()
    kv = await open_bucket(js, f"{unique_prefix()}_contacts", 1)
    first, second = (Contacts(kv, Publisher(nats_client, js)) for _ in range(2))
    await first.heard(inbound("c1"))
    await second.heard(inbound("c2"))
    await first.heard(inbound("c3"))
    contact = await second.get(TENANT, SENDER)
    assert contact is not None and contact.conversations == ["c1", "c2", "c3"]

    await second.forget(TENANT, contact)  # erased by the other process
    await first.heard(inbound("c4"))
    contact = await second.get(TENANT, SENDER)
    assert contact is not None and contact.conversations == ["c4"]
