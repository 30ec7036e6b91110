"""Evolution API codec (WhatsApp through a self-hosted Evolution API v2): webhooks decoded from payloads
rebuilt from the server's source, webhook authentication, exact outbound requests, API answers, and
sending through a local fake API."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import pytest

from babelhub import canonical
from babelhub.canonical import (
    Action,
    Activity,
    Button,
    Buttons,
    Contact,
    Conversation,
    Delete,
    Edit,
    Envelope,
    List,
    ListRow,
    ListSection,
    Location,
    Media,
    Mention,
    Message,
    Native,
    Part,
    Poll,
    Reaction,
    Status,
    Template,
    Text,
    Unsupported,
)
from babelhub.codecs import load
from babelhub.codecs.base import DecodeContext, EncodeContext, HttpRequest, HttpResponse, OutboundRequest
from babelhub.codecs.evolution import EvolutionCodec
from babelhub.errors import DecodeError, EncodeError, SignatureError
from babelhub.services.delivery import RetryPolicy
from tests import codeckit
from tests.codeckit import Fixtures, Ids, corpus_files, deliver_one, json_bodies, outbound_message, response, utc
from tests.fakeapi import FakeApi, Recorded, Reply

FIXTURES = Fixtures("evolution", suffix=".json")
CORPUS = codeckit.CORPUS / "evolution_api"

CODEC = EvolutionCodec()
TENANT, CONNECTION = "acme", "evo-loja"
CTX = DecodeContext(tenant=TENANT, connection=CONNECTION, seq=42)
RECEIVED_AT = 1_728_400_000.0
USER = "553198296801@s.whatsapp.net"
OWNER = "5531988887777@s.whatsapp.net"
GROUP = "120363042081234567@g.us"
INSTANCE = "loja-centro"
API_BASE = "https://evolution.example.com"
APIKEY = "6B1F0C3E9A2D4E7F8A1B2C3D4E5F6A7B"  # what the webhook fixtures carry in `apikey`
FAST = RetryPolicy(attempts=4, base_delay=0.01, max_delay=0.02)


raw = FIXTURES.bytes
load_json = FIXTURES.json


def decode(name: str) -> list[Envelope]:
    return CODEC.decode(HttpRequest(body=raw(name), received_at=RECEIVED_AT), CTX)


def message(name: str) -> Message:
    (envelope,) = decode(name)
    assert isinstance(envelope, Message)
    return envelope


def status(name: str) -> Status:
    (envelope,) = decode(name)
    assert isinstance(envelope, Status)
    return envelope


IDS = Ids(TENANT, CONNECTION)
mid, sid = IDS.message, IDS.sender
at = utc


# ------------------------------------------------------------------------------ inbound messages


def test_text_message_header_and_sender() -> None:
    msg = message("upsert_text")
    assert msg.parts == [Text(text="Oi! Vocês entregam no sábado?")]
    assert msg.id == mid("3A6E2B1F4C8D9E0A7B5C")
    assert msg.native == Native(id="3A6E2B1F4C8D9E0A7B5C", seq=42)
    assert (msg.direction, msg.reply_to) == ("inbound", "")
    assert msg.ts == at(1728397351)
    assert msg.conversation == Conversation(
        id=canonical.conversation_id(TENANT, CONNECTION, USER),
        channel="evolution",
        connection=CONNECTION,
        native_id=USER,
        type="direct",
    )
    assert msg.sender is not None
    assert (msg.sender.id, msg.sender.native_id, msg.sender.name, msg.sender.handle, msg.sender.role) == (
        sid(USER),
        USER,
        "Maria Souza",
        "+553198296801",
        "user",
    )
    assert msg.meta["evolution.source"] == "ios"
    assert msg.meta["evolution.status"] == "DELIVERY_ACK"
    assert "messageSecret" in msg.meta["evolution.message"]["messageContextInfo"]


def test_delivery_details_are_kept_but_not_the_apikey_or_our_own_url() -> None:
    msg = message("upsert_text")
    assert msg.meta["evolution.webhook"] == {
        "instance": INSTANCE,
        "sender": OWNER,
        "server_url": "https://evolution.example.com",
        "date_time": "2024-10-08T14:22:31.512Z",
    }
    assert APIKEY not in json.dumps(msg.meta)


def test_replay_yields_the_same_ids() -> None:
    for name in ("upsert_text", "update_read", "presence_group", "connection_update"):
        assert [e.id for e in decode(name)] == [e.id for e in decode(name)]


def test_reply_points_at_the_quoted_message() -> None:
    msg = message("upsert_text_reply")
    assert msg.parts == [Text(text="Pode ser às 10h então")]
    assert msg.reply_to == mid("BAE594145F4C59B4")
    assert msg.meta["evolution.contextInfo"]["quotedMessage"] == {"conversation": "Temos horários às 10h e às 15h."}


def test_servers_before_2_2_send_extended_text_with_its_own_context() -> None:
    msg = message("upsert_extended_text_legacy")
    assert msg.parts == [Text(text="Segue o link do pedido https://loja.example.com/p/123")]
    assert msg.reply_to == mid("BAE5F5A632EAE722")
    assert msg.meta["evolution.extendedTextMessage"]["matchedText"] == "https://loja.example.com/p/123"
    assert msg.meta["evolution.owner"] == INSTANCE


def test_group_message_comes_from_the_participant_and_keeps_mentions() -> None:
    msg = message("upsert_group_mention")
    assert msg.conversation.type == "group"
    assert msg.conversation.native_id == GROUP
    assert msg.sender is not None
    assert (msg.sender.native_id, msg.sender.name, msg.sender.handle) == (
        "5521998877665@s.whatsapp.net",
        "Carlos Lima",
        "+5521998877665",
    )
    (text,) = msg.parts
    assert isinstance(text, Text)
    assert text.mentions == [Mention(id=sid(OWNER), native_id=OWNER, offset=0, length=len("@5531988887777"))]


def test_privacy_id_author_gets_the_phone_number_of_its_alternative() -> None:
    msg = message("upsert_group_lid")
    assert msg.sender is not None
    assert (msg.sender.native_id, msg.sender.handle) == ("203611483176981@lid", "+5511976543210")
    assert msg.meta["evolution.key"] == {"participantAlt": "5511976543210@s.whatsapp.net", "addressingMode": "lid"}


def test_image_is_fetched_by_message_id_and_its_encrypted_url_stays_in_meta() -> None:
    msg = message("upsert_image")
    assert msg.parts == [
        Media(
            media="image",
            file_id="3A1B2C3D4E5F60718293",
            mime="image/jpeg",
            size=84211,
            caption="Esse modelo tem em azul?",
            width=960,
            height=1280,
        )
    ]
    kept = msg.meta["evolution.imageMessage"]
    assert kept["url"].startswith("https://mmg.whatsapp.net/")
    assert kept["mediaKey"] == "aFQK9Ocw5tE7Nf0iBA42Xcb4Dee6G1k/pLL0QmQwZ8s="


def test_s3_link_and_base64_bytes_become_the_media_url_and_data() -> None:
    (part,) = message("upsert_image_base64_s3").parts
    assert isinstance(part, Media)
    assert part.url.startswith("https://s3.example.com/evolution/")
    assert part.data.startswith(b"\x89PNG")
    assert (part.mime, part.size, part.file_id) == ("image/png", 68, "3A9F8E7D6C5B4A392817")


def test_voice_note_with_protobuf_long_numbers() -> None:
    msg = message("upsert_voice_note")
    (part,) = msg.parts
    assert isinstance(part, Media)
    assert (part.media, part.mime, part.size, part.duration_ms) == ("voice", "audio/ogg; codecs=opus", 19411, 7000)
    assert msg.meta["evolution.audioMessage"]["waveform"] == {"0": 0, "1": 3, "2": 9, "3": 27}


def test_audio_file_video_document_and_sticker() -> None:
    assert message("upsert_audio_file").parts == [
        Media(media="audio", file_id="3A44B1C2D3E4F5A6B7C8", mime="audio/mp4", size=670662, duration_ms=42000)
    ]
    assert message("upsert_video").parts == [
        Media(
            media="video",
            file_id="3A0F1E2D3C4B5A697887",
            mime="video/mp4",
            size=1843200,
            caption="Olha como ficou",
            duration_ms=12000,
            width=480,
            height=848,
        )
    ]
    document = message("upsert_document")
    assert document.parts == [
        Media(
            media="document",
            file_id="3A7C6B5A4D3E2F1A0B9C",
            mime="application/pdf",
            size=245760,
            filename="comprovante-outubro.pdf",
            caption="Segue o comprovante",
        )
    ]
    assert document.meta["evolution.documentMessage"]["pageCount"] == 2
    sticker = message("upsert_sticker")
    assert sticker.parts == [
        Media(media="sticker", file_id="3A5D4C3B2A1F0E9D8C7B", mime="image/webp", size=18342, width=512, height=512)
    ]
    assert sticker.meta["evolution.stickerMessage"]["isAnimated"] is False


def test_location() -> None:
    assert message("upsert_location").parts == [
        Location(
            lat=-19.93359,
            lon=-43.93851,
            name="Palácio da Liberdade",
            address="Praça da Liberdade, Belo Horizonte, MG 30140-050",
        )
    ]


def test_shared_contact_is_read_from_its_vcard_which_stays_in_meta() -> None:
    msg = message("upsert_contact")
    assert msg.parts == [
        Contact(
            name="Guilherme Gomes",
            phones=["+55 31 9829-6801"],
            emails=["guilherme@example.com"],
            org="AtendAI",
            urls=["https://atendai.example.com"],
        )
    ]
    assert msg.meta["evolution.contactMessage"]["vcard"].startswith("BEGIN:VCARD")
    assert message("upsert_contacts_array").parts == [
        Contact(name="Ana Prado", phones=["+55 11 97654-3210"]),
        Contact(name="Bruno Reis", phones=["+55 21 91234-5678"]),
    ]


def test_reaction_and_its_removal_point_at_the_message() -> None:
    assert message("upsert_reaction").parts == [Reaction(emoji="👍", target=mid("BAE594145F4C59B4"))]
    assert message("upsert_reaction_removed").parts == [
        Reaction(emoji="", target=mid("BAE594145F4C59B4"), removed=True)
    ]


@pytest.mark.parametrize(
    ("name", "action", "source"),
    [
        ("upsert_buttons_response", Action(id="entrega-sabado", title="Sábado"), "BAE5A1B2C3D4E5F6"),
        ("upsert_list_response", Action(id="tam-m", title="Tamanho M"), "BAE5B2C3D4E5F6A7"),
        ("upsert_interactive_response", Action(id="confirmar-pedido", title="Confirmar"), "3EB0C1D2E3F4A5B6C7D8"),
    ],
)
def test_taps_and_choices_are_actions_on_the_message_that_offered_them(name: str, action: Action, source: str) -> None:
    msg = message(name)
    assert msg.parts == [Action(id=action.id, title=action.title, source=mid(source))]
    assert msg.reply_to == mid(source)


@pytest.mark.parametrize("params_json", ["[" * 100_000 + "]" * 100_000, "{not json", '{"id": NaN}'])
def test_a_flow_answer_whose_params_cannot_be_read_is_unsupported_and_the_message_arrives(params_json: str) -> None:
    body = load_json("upsert_interactive_response")
    flow = body["data"]["message"]["interactiveResponseMessage"]["nativeFlowResponseMessage"]
    flow["paramsJson"] = params_json
    (envelope,) = CODEC.decode(HttpRequest(body=json.dumps(body).encode(), received_at=RECEIVED_AT), CTX)
    assert isinstance(envelope, Message) and envelope.sender is not None
    (part,) = envelope.parts
    assert isinstance(part, Unsupported) and "button id" in part.reason


def test_list_choice_keeps_the_row_description() -> None:
    assert message("upsert_list_response").meta["evolution.listResponseMessage"]["description"] == "Busto 92 cm"


def test_poll() -> None:
    msg = message("upsert_poll")
    assert msg.parts == [Poll(question="Qual horário é melhor?", options=["Manhã", "Tarde", "Noite"])]
    assert msg.conversation.type == "group"


def test_view_once_image_is_read_from_inside_its_wrapper() -> None:
    msg = message("upsert_ephemeral_view_once")
    (part,) = msg.parts
    assert isinstance(part, Media)
    assert (part.media, part.caption, part.size) == ("image", "Só uma vez", 51234)
    assert msg.meta["evolution.wrappers"] == ["viewOnceMessageV2"]
    assert msg.meta["evolution.imageMessage"]["viewOnce"] is True


def test_message_type_without_a_part_is_kept_verbatim() -> None:
    (part,) = message("upsert_unsupported_event").parts
    assert isinstance(part, Unsupported)
    assert "eventMessage" in part.reason
    assert part.native["eventMessage"]["name"] == "Inauguração da loja"


def test_own_message_typed_on_the_phone_is_outbound_history_from_an_agent() -> None:
    msg = message("upsert_from_me")
    assert msg.direction == "outbound"
    assert msg.meta["evolution.from_me"] is True
    assert msg.conversation.native_id == USER
    assert msg.sender is not None
    assert (msg.sender.id, msg.sender.native_id, msg.sender.role) == (sid(OWNER), OWNER, "agent")


def test_message_sent_through_the_api_gets_the_id_the_hub_derives_for_it() -> None:
    msg = message("send_message_event")
    assert msg.direction == "outbound"
    assert msg.id == mid("BAE594145F4C59B4")
    assert msg.parts == [Text(text="Temos horários às 10h e às 15h.")]
    assert msg.sender is not None and msg.sender.role == "bot"


def test_cloud_api_integration_button_tap_arrives_as_text_with_its_context() -> None:
    msg = message("upsert_cloud_api_button")
    assert msg.parts == [Text(text="Sábado")]
    assert msg.reply_to == mid("wamid.HBgMNTUzMTk4Mjk2ODAxFQIAERgSQjY5RjA0QjY0NzE2OEQ1QzUA")
    assert msg.sender is not None and msg.sender.handle == "+553198296801"


# --------------------------------------------------------------------------------- statuses


@pytest.mark.parametrize(
    ("name", "state", "native_id"),
    [
        ("update_server_ack", "sent", "BAE594145F4C59B4"),
        ("update_delivery_ack", "delivered", "BAE594145F4C59B4"),
        ("update_read", "read", "BAE594145F4C59B4"),
        ("update_played", "played", "BAE5EFED2AB0BB9F"),
        ("update_cloud_api_delivered", "delivered", "wamid.HBgMNTUzMTk4Mjk2ODAxFQIAERgSQjY5RjA0QjY0NzE2OEQ1QzUA"),
    ],
)
def test_status_of_our_message(name: str, state: str, native_id: str) -> None:
    update = status(name)
    assert (update.state, update.native_id, update.message_id) == (state, native_id, "")
    assert update.id == canonical.stable_id("status", TENANT, CONNECTION, native_id, state)
    assert update.native == Native(id=native_id, seq=42)
    assert update.direction == "inbound"
    assert update.ts == at(RECEIVED_AT)  # v2 updates carry no time of their own
    assert update.error is None


def test_error_status_is_a_failure_with_the_update_kept() -> None:
    update = status("update_error")
    assert update.state == "failed"
    assert update.error is not None and update.error.code == "evolution_error"
    assert update.error.native["status"] == "ERROR"


def test_version_1_status_has_the_key_spread_and_its_own_time() -> None:
    update = status("update_v1_read")
    assert (update.state, update.native_id) == ("read", "BAE594145F4C59B4")
    assert update.ts == at(1717691012.345)
    assert update.meta["evolution.owner"] == INSTANCE


def test_group_status_is_in_the_group_conversation() -> None:
    update = status("update_group_read")
    assert update.conversation.type == "group"
    assert update.conversation.native_id == GROUP


def group_read_by(participant: str) -> bytes:
    body = load_json("update_group_read")
    body["data"]["participant"] = participant
    return json.dumps(body).encode()


def test_group_receipts_of_different_members_are_different_deliveries() -> None:
    first, second = group_read_by("5521998877665@s.whatsapp.net"), group_read_by("5511976543210@s.whatsapp.net")
    assert CODEC.dedup_key(HttpRequest(body=first)) != CODEC.dedup_key(HttpRequest(body=second))
    assert CODEC.decode(HttpRequest(body=first), CTX)[0].id != CODEC.decode(HttpRequest(body=second), CTX)[0].id
    # The same member's receipt retried is the same delivery.
    assert CODEC.dedup_key(HttpRequest(body=first)) == CODEC.dedup_key(HttpRequest(body=raw("update_group_read")))
    assert CODEC.decode(HttpRequest(body=first), CTX) == CODEC.decode(HttpRequest(body=raw("update_group_read")), CTX)


def test_our_own_read_mark_on_a_received_message_is_an_outbound_read_activity() -> None:
    (envelope,) = decode("update_read_by_us")
    assert isinstance(envelope, Activity)
    assert (envelope.activity, envelope.direction) == ("read", "outbound")
    assert envelope.detail["message_id"] == mid("3A6E2B1F4C8D9E0A7B5C")


# ------------------------------------------------------------------------- deletes and edits


def test_delete_by_the_user_targets_the_message() -> None:
    msg = message("delete_by_user")
    assert msg.parts == [Delete(target=mid("A1F0C2D3E4B5968778695A4B3C2D1E0F"))]
    assert msg.direction == "inbound"


def test_delete_made_through_the_api_reads_the_key_inside_the_stored_message() -> None:
    msg = message("delete_via_api")
    assert msg.parts == [Delete(target=mid("BAE594145F4C59B4"))]
    assert msg.direction == "outbound"
    assert msg.meta["evolution.messageType"] == "conversation"


def test_edit_is_the_marker_then_the_new_text() -> None:
    msg = message("edited_text")
    assert msg.parts == [Edit(target=mid("3A6E2B1F4C8D9E0A7B5C")), Text(text="Oi! Vocês entregam no domingo?")]
    assert msg.ts == at(1728397600.123)


def test_revoke_forwarded_as_an_edit_event_is_a_delete() -> None:
    assert message("edited_revoke").parts == [Delete(target=mid("3A6E2B1F4C8D9E0A7B5C"))]


def test_edit_made_through_the_api_is_outbound() -> None:
    msg = message("send_message_update")
    assert msg.direction == "outbound"
    assert msg.parts == [Edit(target=mid("BAE594145F4C59B4")), Text(text="Temos horários às 10h, 13h e 15h.")]


# ------------------------------------------------------------------- presence, groups, instance


def test_typing_in_a_direct_chat() -> None:
    (typing,) = decode("presence_composing")
    assert isinstance(typing, Activity)
    assert (typing.activity, typing.detail) == ("typing", {"presence": "composing"})
    assert typing.conversation.native_id == USER
    assert typing.sender is not None and typing.sender.native_id == USER


def test_group_presence_gives_one_activity_per_member() -> None:
    recording, offline = decode("presence_group")
    assert isinstance(recording, Activity) and isinstance(offline, Activity)
    assert (recording.activity, recording.detail["presence"]) == ("typing", "recording")
    assert (offline.activity, offline.detail) == ("presence", {"presence": "unavailable", "last_seen": 1728399700})
    assert {recording.conversation.type, offline.conversation.type} == {"group"}


def test_members_added_to_a_group_joined() -> None:
    envelopes = decode("group_participants_add")
    assert [(e.activity, e.sender.native_id if e.sender else "") for e in envelopes if isinstance(e, Activity)] == [
        ("joined", "5511976543210@s.whatsapp.net"),
        ("joined", "5521912345678@s.whatsapp.net"),
    ]
    assert envelopes[0].meta["evolution.participantsData"][0]["name"] == "Ana Prado"


@pytest.mark.parametrize("name", ["connection_update", "qrcode_updated", "group_participants_promote"])
def test_other_events_are_kept_verbatim_in_the_instance_conversation(name: str) -> None:
    msg = message(name)
    (part,) = msg.parts
    assert isinstance(part, Unsupported)
    assert part.native == load_json(name)["data"]
    assert msg.conversation.native_id == INSTANCE
    assert msg.sender is not None and msg.sender.role == "system"
    assert msg.meta["evolution.event"] == load_json(name)["event"]


def test_qr_code_update_keeps_that_it_happened_but_not_the_code() -> None:
    # Whoever sees the QR code, its text or the pairing code can link a device to the WhatsApp account.
    sent = load_json("qrcode_updated_code")["data"]["qrcode"]
    msg = message("qrcode_updated_code")
    (part,) = msg.parts
    assert isinstance(part, Unsupported) and "qrcode.updated" in part.reason
    assert part.native == {
        "qrcode": {"instance": INSTANCE, "pairingCode": "[redacted]", "code": "[redacted]", "base64": "[redacted]"}
    }
    assert msg.meta["evolution.event"] == "qrcode.updated"
    published = canonical.encode(msg).decode()
    for secret in (sent["pairingCode"], sent["code"], sent["base64"], APIKEY):
        assert secret not in published


def test_a_qr_code_without_a_pairing_code_says_so() -> None:
    body = load_json("qrcode_updated_code")
    body["data"]["qrcode"]["pairingCode"] = None
    (msg,) = CODEC.decode(HttpRequest(body=json.dumps(body).encode()), CTX)
    assert isinstance(msg, Message) and isinstance(msg.parts[0], Unsupported)
    assert msg.parts[0].native["qrcode"]["pairingCode"] is None


def test_successive_qr_codes_are_different_events() -> None:
    body = load_json("qrcode_updated_code")
    body["data"]["qrcode"]["code"] = "2@another"
    (other,) = CODEC.decode(HttpRequest(body=json.dumps(body).encode()), CTX)
    assert other.id != message("qrcode_updated_code").id


def test_credentials_anywhere_in_a_webhook_are_never_kept() -> None:
    secrets = ["instance-token-1", "jwt-material-2", "access-3", "nested-key-4", "header-5"]
    connection = load_json("connection_update")
    connection |= {"jwt_key": secrets[1], "Authorization": f"Bearer {secrets[4]}"}
    connection["data"] |= {"apikey": secrets[0], "auth": {"access_token": secrets[2], "apiKey": secrets[3]}}
    upsert = load_json("upsert_text")
    upsert |= {"api-key": secrets[0], "jwt": secrets[1]}
    upsert["data"] |= {"token": secrets[0], "extra": [{"ApiKey": secrets[3]}]}
    for body in (connection, upsert):
        (envelope,) = CODEC.decode(HttpRequest(body=json.dumps(body).encode()), CTX)
        published = canonical.encode(envelope).decode()
        assert not [secret for secret in secrets if secret in published]
    (kept,) = CODEC.decode(HttpRequest(body=json.dumps(upsert).encode()), CTX)
    assert kept.meta["evolution.extra"] == [{}]  # what is not a credential stays


def test_event_names_in_upper_case_are_understood() -> None:
    body = load_json("upsert_text") | {"event": "MESSAGES_UPSERT"}
    (envelope,) = CODEC.decode(HttpRequest(body=json.dumps(body).encode()), CTX)
    assert isinstance(envelope, Message) and envelope.parts == [Text(text="Oi! Vocês entregam no sábado?")]


# ------------------------------------------------------------------------------ broken input


@pytest.mark.parametrize(
    ("body", "path", "reason"),
    [
        (b"not json", "$", "not valid JSON"),
        (b"[1, 2]", "$", "JSON object"),
        (b'{"instance": "loja-centro", "data": {}}', "$", "event"),
        (raw("malformed_no_key_id"), "$.data.key.id", "no id"),
        (raw("malformed_timestamp"), "$.data.messageTimestamp", "timestamp"),
        (raw("malformed_update"), "$.data.keyId", "names no message"),
        (b'{"event": "messages.upsert", "data": "oops"}', "$.data", "object"),
    ],
)
def test_undecodable_input_names_the_path(body: bytes, path: str, reason: str) -> None:
    with pytest.raises(DecodeError) as caught:
        CODEC.decode(HttpRequest(body=body), CTX)
    assert caught.value.path == path
    assert reason in caught.value.reason


def test_an_unreadable_location_is_an_unsupported_part_and_the_sender_still_arrives() -> None:
    (message,) = decode("malformed_location")
    assert isinstance(message, Message) and message.sender is not None and message.sender.name == "Maria Souza"
    (part,) = message.parts
    assert isinstance(part, Unsupported)
    assert "$.data.message.locationMessage.degreesLatitude" in part.reason and "float" in part.reason
    assert part.native == load_json("malformed_location")["data"]["message"]
    assert canonical.decode(canonical.encode(message)) == message


def changed(name: str, **data: Any) -> bytes:
    body = load_json(name)
    body["data"] |= data
    return json.dumps(body).encode()


def with_location(**fields: Any) -> bytes:
    body = load_json("upsert_location")
    body["data"]["message"]["locationMessage"] |= fields
    return json.dumps(body).encode()


@pytest.mark.parametrize(
    ("body", "path"),
    [
        (changed("upsert_text", messageTimestamp=10**17), "$.data.messageTimestamp"),
        (changed("upsert_text", messageTimestamp="1" + "0" * 400), "$.data.messageTimestamp"),
        (changed("update_v1_read", datetime=10**20), "$.data.datetime"),
        (changed("update_v1_read", datetime=10**400), "$.data.datetime"),
        (changed("edited_text", timestampMs="9" * 30), "$.data.timestampMs"),
    ],
)
def test_impossible_numbers_are_decode_errors_at_their_path(body: bytes, path: str) -> None:
    with pytest.raises(DecodeError) as caught:
        CODEC.decode(HttpRequest(body=body), CTX)
    assert caught.value.path == path


@pytest.mark.parametrize(
    ("body", "path"),
    [
        (with_location(degreesLatitude="nan"), "$.data.message.locationMessage.degreesLatitude"),
        (with_location(degreesLongitude="Infinity"), "$.data.message.locationMessage.degreesLongitude"),
    ],
)
def test_impossible_coordinates_are_an_unsupported_part_naming_the_path(body: bytes, path: str) -> None:
    (message,) = CODEC.decode(HttpRequest(body=body), CTX)
    assert isinstance(message, Message)
    (part,) = message.parts
    assert isinstance(part, Unsupported) and path in part.reason
    assert canonical.decode(canonical.encode(message)) == message


def test_a_body_nested_too_deeply_is_a_decode_error() -> None:
    body = b'{"event": "chats.update", "data": ' + b"[" * 600 + b"]" * 600 + b"}"
    with pytest.raises(DecodeError) as caught:
        CODEC.decode(HttpRequest(body=body), CTX)
    assert caught.value.path == "$"


@pytest.mark.parametrize("path", corpus_files(CORPUS) or [None], ids=lambda p: p.name if p else "absent")
def test_corpus_payload_decodes_or_raises_decode_error(path: Path | None) -> None:
    if path is None:
        pytest.skip("shared corpus not present beside the checkout")
    try:
        envelopes = CODEC.decode(HttpRequest(body=path.read_bytes()), CTX)
    except DecodeError:
        return
    assert envelopes, "a webhook must never decode to nothing"
    for envelope in envelopes:
        assert canonical.decode(canonical.encode(envelope)) == envelope


# ------------------------------------------------------------------------ webhook authentication


def with_apikey(name: str, apikey: str | None) -> bytes:
    return json.dumps(load_json(name) | {"apikey": apikey}).encode()


def test_without_configured_secrets_webhooks_are_accepted() -> None:
    CODEC.verify(HttpRequest(body=raw("upsert_text")), {})


def test_body_apikey_matching_the_connection_verifies() -> None:
    CODEC.verify(HttpRequest(body=raw("upsert_text")), {"apikey": APIKEY})


def test_apikey_header_verifies_when_the_body_has_none() -> None:
    request = HttpRequest(body=with_apikey("upsert_text", None), headers={"apikey": "header-secret"})
    CODEC.verify(request, {"apikey": "sending-key", "webhook_apikey": "header-secret"})


def test_wrong_apikey_is_refused() -> None:
    with pytest.raises(SignatureError, match="does not match"):
        CODEC.verify(HttpRequest(body=raw("upsert_text")), {"apikey": "another-instance-token"})


def test_missing_apikey_is_refused_when_one_is_configured() -> None:
    with pytest.raises(SignatureError, match="no apikey"):
        CODEC.verify(HttpRequest(body=with_apikey("upsert_text", None)), {"apikey": APIKEY})


def test_body_too_deep_to_read_carries_no_apikey() -> None:
    with pytest.raises(SignatureError, match="no apikey"):
        CODEC.verify(HttpRequest(body=b"[" * 100_000 + b"]" * 100_000), {"apikey": APIKEY})


JWT_KEY = "webhook-jwt-secret"


def webhook_jwt(key: str, iat: int, *, alg: str = "HS256", lifetime: int = 600) -> str:
    def segment(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    claims = {"iat": iat, "exp": iat + lifetime, "app": "evolution", "action": "webhook"}
    signing_input = f"{segment({'alg': alg, 'typ': 'JWT'})}.{segment(claims)}"
    signature = hmac.new(key.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{base64.urlsafe_b64encode(signature).rstrip(b'=').decode()}"


def jwt_request(token: str | None, received_at: float = RECEIVED_AT) -> HttpRequest:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return HttpRequest(body=raw("upsert_text"), headers=headers, received_at=received_at)


def test_good_webhook_jwt_verifies() -> None:
    CODEC.verify(jwt_request(webhook_jwt(JWT_KEY, int(RECEIVED_AT) - 5)), {"webhook_jwt_key": JWT_KEY})


def test_webhook_jwt_signed_with_another_key_is_refused() -> None:
    with pytest.raises(SignatureError, match="signature"):
        CODEC.verify(jwt_request(webhook_jwt("guess", int(RECEIVED_AT))), {"webhook_jwt_key": JWT_KEY})


def test_missing_webhook_jwt_is_refused() -> None:
    with pytest.raises(SignatureError, match="Bearer"):
        CODEC.verify(jwt_request(None), {"webhook_jwt_key": JWT_KEY, "apikey": APIKEY})


def test_stale_webhook_jwt_is_refused() -> None:
    an_hour_ago = int(RECEIVED_AT) - 3600
    with pytest.raises(SignatureError, match="expired"):
        CODEC.verify(jwt_request(webhook_jwt(JWT_KEY, an_hour_ago)), {"webhook_jwt_key": JWT_KEY})


def test_unsigned_webhook_jwt_is_refused() -> None:
    with pytest.raises(SignatureError, match="HS256"):
        CODEC.verify(jwt_request(webhook_jwt(JWT_KEY, int(RECEIVED_AT), alg="none")), {"webhook_jwt_key": JWT_KEY})


def test_dedup_key_names_the_event_the_message_and_the_state() -> None:
    def key(name: str) -> str:
        return CODEC.dedup_key(HttpRequest(body=raw(name)))

    assert key("upsert_text") == "messages.upsert:3A6E2B1F4C8D9E0A7B5C"
    assert key("send_message_event") == "send.message:BAE594145F4C59B4"
    assert key("update_delivery_ack") == "messages.update:BAE594145F4C59B4:DELIVERY_ACK"
    assert key("update_read") == "messages.update:BAE594145F4C59B4:READ"
    assert key("update_v1_read") == key("update_read")
    assert key("delete_via_api") == "messages.delete:BAE594145F4C59B4"
    assert key("edited_text") == "messages.edited:3A6E2B1F4C8D9E0A7B5C:1728397600123"
    assert key("connection_update") == ""  # no WhatsApp id: the hub hashes the body
    with pytest.raises(DecodeError):
        CODEC.dedup_key(HttpRequest(body=b"[]"))


# ------------------------------------------------------------------------------------ outbound


def outbound(*parts: Part, reply_to: str = "") -> Message:
    conversation = Conversation(id="c1", channel="evolution", connection=CONNECTION, native_id=USER)
    return outbound_message(TENANT, conversation, parts, id="01hzmsg", reply_to=reply_to)


def encode_ctx(**overrides: Any) -> EncodeContext:
    settings: dict[str, Any] = {
        "tenant": TENANT,
        "connection": CONNECTION,
        "to": USER,
        "api_base": API_BASE,
        "secrets": {"apikey": APIKEY},
        "options": {"instance": INSTANCE},
    }
    return EncodeContext(**(settings | overrides))


HEADERS = {"apikey": APIKEY, "Content-Type": "application/json"}


bodies = json_bodies


def paths(requests: list[OutboundRequest]) -> list[str]:
    return [request.url.removeprefix(API_BASE) for request in requests]


def test_text_request_is_exact() -> None:
    (request,) = CODEC.encode(outbound(Text(text="Temos horários às 10h e às 15h.")), encode_ctx())
    assert request.method == "POST"
    assert request.url == f"{API_BASE}/message/sendText/{INSTANCE}"
    assert request.headers == HEADERS
    assert json.loads(request.body) == load_json("send_text")
    assert (request.idempotency_key, request.message_id) == ("01hzmsg:0", "01hzmsg")


def test_reply_quotes_the_native_message() -> None:
    ctx = encode_ctx(native_ids={"canon-1": "3A6E2B1F4C8D9E0A7B5C"})
    requests = CODEC.encode(outbound(Text(text="Combinado, até sábado!"), reply_to="canon-1"), ctx)
    assert bodies(requests) == [load_json("send_text_quoted")]


def test_reply_to_an_unknown_message_is_an_encode_error() -> None:
    with pytest.raises(EncodeError, match="reply_to"):
        CODEC.encode(outbound(Text(text="hi"), reply_to="never-seen"), encode_ctx())


@pytest.mark.parametrize(
    ("part", "path", "fixture"),
    [
        (
            Media(
                media="image",
                url="https://loja.example.com/img/vestido-azul.png",
                mime="image/png",
                caption="Caption text",
                filename="vestido-azul.png",
            ),
            "/message/sendMedia",
            "send_media_image",
        ),
        (
            Media(
                media="document",
                url="https://loja.example.com/nf/4471.pdf",
                mime="application/pdf",
                caption="Segue a nota fiscal",
            ),
            "/message/sendMedia",
            "send_media_document",
        ),
        (
            Media(media="voice", url="https://loja.example.com/audio/boas-vindas.ogg", mime="audio/ogg"),
            "/message/sendWhatsAppAudio",
            "send_whatsapp_audio",
        ),
        (
            Media(media="sticker", url="https://loja.example.com/stickers/obrigado.webp"),
            "/message/sendSticker",
            "send_sticker",
        ),
        (
            Location(
                lat=-19.93359,
                lon=-43.93851,
                name="Palácio da Liberdade",
                address="Praça da Liberdade, Belo Horizonte, MG 30140-050",
            ),
            "/message/sendLocation",
            "send_location",
        ),
        (
            Contact(
                name="Guilherme Gomes",
                phones=["+55 31 9829-6801"],
                emails=["guilherme@example.com"],
                org="AtendAI",
                urls=["https://atendai.example.com"],
            ),
            "/message/sendContact",
            "send_contact",
        ),
        (
            Poll(question="Qual horário é melhor?", options=["Manhã", "Tarde", "Noite"]),
            "/message/sendPoll",
            "send_poll",
        ),
    ],
)
def test_single_part_requests_are_exact(part: Part, path: str, fixture: str) -> None:
    (request,) = CODEC.encode(outbound(part), encode_ctx())
    assert request.url == f"{API_BASE}{path}/{INSTANCE}"
    assert json.loads(request.body) == load_json(fixture)


def test_text_before_reply_buttons_becomes_their_title_and_description() -> None:
    buttons = Buttons(
        buttons=[Button(id="confirmar-pedido", title="Confirmar"), Button(id="remarcar-pedido", title="Remarcar")]
    )
    requests = CODEC.encode(outbound(Text(text="Pedido 4471\nConfirma a entrega no sábado?"), buttons), encode_ctx())
    assert paths(requests) == [f"/message/sendButtons/{INSTANCE}"]
    assert bodies(requests) == [load_json("send_buttons")]


def test_link_buttons_beside_reply_buttons_are_written_into_the_description() -> None:
    part = Buttons(
        text="Escolha",
        buttons=[
            Button(id="sim", title="Sim"),
            Button(id="site", title="Site", action="url", value="https://loja.example.com"),
        ],
    )
    (body,) = bodies(CODEC.encode(outbound(part), encode_ctx()))
    assert body["title"] == "Escolha"
    assert body["description"] == "Site: https://loja.example.com"
    assert body["buttons"] == [{"type": "reply", "displayText": "Sim", "id": "sim"}]


def test_link_and_call_buttons_alone_are_sent_as_buttons() -> None:
    part = Buttons(
        text="Fale com a gente",
        buttons=[
            Button(id="site", title="Site", action="url", value="https://loja.example.com"),
            Button(id="tel", title="Ligar", action="call", value="+5531988887777"),
        ],
    )
    (body,) = bodies(CODEC.encode(outbound(part), encode_ctx()))
    assert body["buttons"] == [
        {"type": "url", "displayText": "Site", "url": "https://loja.example.com"},
        {"type": "call", "displayText": "Ligar", "phoneNumber": "+5531988887777"},
    ]


def test_text_shown_with_choices_is_declared_to_degradation() -> None:
    # WhatsApp's 1024, less the 4 characters Baileys' sendButtons adds around the title ("*title*\n\n…\n").
    assert CODEC.capabilities.choice_text_limit == 1020


def rendered_button_text(body: Any) -> str:
    """What Baileys' sendButtons shows above the buttons (whatsapp.baileys.service.ts `buttonMessage`)."""
    description = body.get("description")
    return f"*{body['title']}*" + (f"\n\n{description}\n" if description else "")


def test_link_lines_that_would_overflow_the_text_go_before_the_buttons() -> None:
    text = "Pedido 4471\n" + "x" * 990  # fits on its own, not with the link written under it
    part = Buttons(
        text=text,
        buttons=[
            Button(id="sim", title="Sim"),
            Button(id="site", title="Site", action="url", value="https://loja.example.com/pedidos/4471"),
        ],
    )
    requests = CODEC.encode(outbound(part), encode_ctx())
    assert paths(requests) == [f"/message/sendText/{INSTANCE}", f"/message/sendButtons/{INSTANCE}"]
    links, buttons = bodies(requests)
    assert links["text"] == "Site: https://loja.example.com/pedidos/4471"
    assert (buttons["title"], buttons["description"]) == ("Pedido 4471", "x" * 990)
    assert len(rendered_button_text(buttons)) <= 1024


def test_text_at_the_limit_renders_within_whatsapps_body() -> None:
    part = Buttons(text="T" * 100 + "\n" + "d" * 919, buttons=[Button(id="ok", title="OK")])
    (body,) = bodies(CODEC.encode(outbound(part), encode_ctx()))
    assert len(rendered_button_text(body)) == 1024


def test_held_text_too_long_for_choices_is_sent_on_its_own() -> None:
    long_text = Text(text="w" * 1500)
    rows = [ListSection(title="Tamanhos", rows=[ListRow(id="p", title="P")])]
    requests = CODEC.encode(outbound(long_text, List(sections=rows)), encode_ctx())
    assert paths(requests) == [f"/message/sendText/{INSTANCE}", f"/message/sendList/{INSTANCE}"]
    text, listing = bodies(requests)
    assert text["text"] == "w" * 1500 and "description" not in listing
    with pytest.raises(EncodeError, match="need a text"):
        CODEC.encode(outbound(long_text, Buttons(buttons=[Button(id="ok", title="OK")])), encode_ctx())


def test_own_text_too_long_for_choices() -> None:
    rows = [ListSection(title="Tamanhos", rows=[ListRow(id="p", title="P")])]
    requests = CODEC.encode(outbound(List(text="v" * 1021, sections=rows)), encode_ctx())
    assert [body.get("text") or body.get("description") for body in bodies(requests)] == ["v" * 1021, None]
    with pytest.raises(EncodeError, match="1020"):
        CODEC.encode(outbound(Buttons(text="v" * 1021, buttons=[Button(id="ok", title="OK")])), encode_ctx())


def test_list_request_is_exact() -> None:
    part = List(
        text="Escolha o seu tamanho",
        button="Ver tamanhos",
        header="Tamanhos",
        footer="Loja Centro",
        sections=[
            ListSection(
                title="Adulto",
                rows=[
                    ListRow(id="tam-p", title="Tamanho P", description="Busto 84 cm"),
                    ListRow(id="tam-m", title="Tamanho M", description="Busto 92 cm"),
                ],
            ),
            ListSection(title="Infantil", rows=[ListRow(id="tam-8", title="Tamanho 8")]),
        ],
    )
    requests = CODEC.encode(outbound(part), encode_ctx())
    assert paths(requests) == [f"/message/sendList/{INSTANCE}"]
    assert bodies(requests) == [load_json("send_list")]


def test_reaction_names_whether_the_message_was_ours() -> None:
    theirs, ours = mid("3A6E2B1F4C8D9E0A7B5C"), "01hzmine"
    ctx = encode_ctx(native_ids={theirs: "3A6E2B1F4C8D9E0A7B5C", ours: "BAE594145F4C59B4"})
    (request,) = CODEC.encode(outbound(Reaction(emoji="🚀", target=theirs)), ctx)
    assert request.url == f"{API_BASE}/message/sendReaction/{INSTANCE}"
    assert json.loads(request.body) == load_json("send_reaction")
    (on_ours,) = bodies(CODEC.encode(outbound(Reaction(emoji="🚀", target=ours, removed=True)), ctx))
    assert on_ours == {"key": {"remoteJid": USER, "fromMe": True, "id": "BAE594145F4C59B4"}, "reaction": ""}
    with pytest.raises(EncodeError, match="reaction target"):
        CODEC.encode(outbound(Reaction(emoji="🚀", target="unknown")), encode_ctx())


def test_parts_become_calls_in_order_with_the_quote_on_the_first_that_takes_one() -> None:
    parts = (
        Contact(name="Ana Prado", phones=["+55 11 97654-3210"]),
        Contact(name="Bruno Reis", phones=["+55 21 91234-5678"]),
        Media(media="audio", url="https://loja.example.com/a.mp3", caption="ouça"),
        Text(text="Mais alguma coisa?"),
    )
    ctx = encode_ctx(native_ids={"canon-1": "3A6E2B1F4C8D9E0A7B5C"})
    requests = CODEC.encode(outbound(*parts, reply_to="canon-1"), ctx)
    assert paths(requests) == [
        f"/message/sendContact/{INSTANCE}",
        f"/message/sendMedia/{INSTANCE}",
        f"/message/sendText/{INSTANCE}",
        f"/message/sendText/{INSTANCE}",
    ]
    sent = bodies(requests)
    assert [entry["fullName"] for entry in sent[0]["contact"]] == ["Ana Prado", "Bruno Reis"]
    assert ["quoted" in body for body in sent] == [False, True, False, False]  # sendContact ignores quotes
    assert "caption" not in sent[1] and sent[2]["text"] == "ouça"  # audio takes no caption
    assert [r.idempotency_key for r in requests] == ["01hzmsg:0", "01hzmsg:1", "01hzmsg:2", "01hzmsg:3"]


def test_file_bytes_are_sent_as_base64() -> None:
    part = Media(media="document", data=b"%PDF-1.7", mime="application/pdf", filename="nf.pdf")
    (body,) = bodies(CODEC.encode(outbound(part), encode_ctx()))
    assert (body["media"], body["fileName"]) == (base64.b64encode(b"%PDF-1.7").decode(), "nf.pdf")


def test_connection_options_delay_link_preview_and_mentions() -> None:
    ctx = encode_ctx(options={"instance": INSTANCE, "delay": 1200, "link_preview": False})
    text = Text(text="@5521998877665 veja", mentions=[Mention(native_id="5521998877665@s.whatsapp.net", length=14)])
    (body,) = bodies(CODEC.encode(outbound(text), ctx))
    assert body == {
        "number": USER,
        "text": "@5521998877665 veja",
        "linkPreview": False,
        "mentioned": ["5521998877665"],
        "delay": 1200,
    }


def test_instance_names_are_escaped_in_the_path() -> None:
    (request,) = CODEC.encode(outbound(Text(text="oi")), encode_ctx(options={"instance": "loja centro/1"}))
    assert request.url == f"{API_BASE}/message/sendText/loja%20centro%2F1"


@pytest.mark.parametrize(
    ("parts", "complaint"),
    [
        ((Buttons(buttons=[Button(id="a", title="A")]),), "need a text"),
        ((Media(media="image", file_id="3A1B2C3D4E5F60718293"),), "url or the file's bytes"),
        ((Media(media="animation", url="https://example.com/a.gif"),), "animation"),
        ((Contact(name="Sem Telefone"),), "phone number"),
        ((Template(name="hello_world", language="pt_BR"),), "Template"),
        ((Buttons(text="x", buttons=[Button(id="p", title="P", action="postback", value="p")]),), "postback"),
    ],
)
def test_what_evolution_cannot_send_is_an_encode_error(parts: tuple[Part, ...], complaint: str) -> None:
    with pytest.raises(EncodeError, match=complaint):
        CODEC.encode(outbound(*parts), encode_ctx())


@pytest.mark.parametrize(
    ("overrides", "missing"),
    [
        ({"api_base": ""}, "api_base"),
        ({"options": {}}, "instance"),
        ({"secrets": {}}, "apikey"),
    ],
)
def test_missing_connection_settings_are_named(overrides: dict[str, Any], missing: str) -> None:
    with pytest.raises(EncodeError, match=missing):
        CODEC.encode(outbound(Text(text="hi")), encode_ctx(**overrides))


# ------------------------------------------------------------------- typing and read marks


def activity(kind: str, **fields: Any) -> Activity:
    conversation = Conversation(id="c1", channel="evolution", native_id=USER)
    return Activity(id="act1", tenant=TENANT, conversation=conversation, ts=canonical.now(), activity=kind, **fields)  # type: ignore[arg-type]


def test_typing_sends_presence() -> None:
    (request,) = CODEC.encode_activity(activity("typing"), encode_ctx())
    assert request.url == f"{API_BASE}/chat/sendPresence/{INSTANCE}"
    assert request.headers == HEADERS
    assert json.loads(request.body) == load_json("send_presence")


def test_read_marks_the_message_by_its_canonical_id() -> None:
    ctx = encode_ctx(native_ids={"canon-9": "3A6E2B1F4C8D9E0A7B5C"})
    (request,) = CODEC.encode_activity(activity("read", detail={"message_id": "canon-9"}), ctx)
    assert request.url == f"{API_BASE}/chat/markMessageAsRead/{INSTANCE}"
    assert json.loads(request.body) == load_json("send_mark_read")
    with pytest.raises(EncodeError, match="native_id"):
        CODEC.encode_activity(activity("read"), encode_ctx())


def test_other_activities_send_nothing() -> None:
    assert CODEC.encode_activity(activity("presence"), encode_ctx()) == []


# ------------------------------------------------------------------------------- API answers


def answer(status_code: int, name: str, headers: dict[str, str] | None = None) -> HttpResponse:
    return response(status_code, raw(name), headers)


SENT = OutboundRequest(method="POST", url=f"{API_BASE}/message/sendText/{INSTANCE}")


def test_success_answer_gives_the_message_key_id() -> None:
    assert CODEC.parse_response(SENT, answer(201, "response_send_text")).native_ids == ["BAE594145F4C59B4"]
    media = CODEC.parse_response(SENT, answer(201, "response_send_media"))
    assert media.ok and media.native_ids == ["BAE5F5A632EAE722"]
    receipt = CODEC.parse_response(SENT, answer(201, "response_mark_read"))
    assert receipt.ok and receipt.native_ids == []


@pytest.mark.parametrize(
    ("status_code", "name", "code", "retryable", "words"),
    [
        (400, "error_400_not_on_whatsapp", "evolution_bad_request", False, "5531900000000 is not on WhatsApp"),
        (400, "error_400_validation", "evolution_bad_request", False, 'requires property "text"'),
        (400, "error_400_connection_closed", "evolution_bad_request", True, "Connection Closed"),
        (401, "error_401_unauthorized", "evolution_unauthorized", False, "Unauthorized"),
        (403, "error_403_forbidden", "evolution_forbidden", False, "Missing global api key"),
        (404, "error_404_instance", "evolution_not_found", False, 'The "loja-centro" instance does not exist'),
        (500, "error_500_internal", "evolution_internal_server_error", True, "Internal Server Error"),
    ],
)
def test_error_answers_are_mapped(status_code: int, name: str, code: str, retryable: bool, words: str) -> None:
    result = CODEC.parse_response(SENT, answer(status_code, name))
    assert not result.ok and result.error is not None
    assert (result.error.code, result.retryable, result.error.retryable) == (code, retryable, retryable)
    assert words in result.error.message
    assert result.error.native == load_json(name)


def test_rate_limit_from_a_proxy_is_retried_after_retry_after() -> None:
    result = CODEC.parse_response(
        SENT, HttpResponse(status=429, body=b"Too Many Requests", headers={"retry-after": "7"})
    )
    assert result.retryable and result.retry_after == 7.0
    assert result.error is not None and result.error.code == "http_429"


def test_answer_that_is_not_an_evolution_error_falls_back_to_the_http_status() -> None:
    result = CODEC.parse_response(SENT, HttpResponse(status=502, body=b"<html>Bad Gateway</html>"))
    assert result.retryable and result.error is not None and result.error.code == "http_502"


# ------------------------------------------------------------------ sending to a local fake API


def fake_ctx(api: FakeApi) -> EncodeContext:
    return encode_ctx(api_base=api.base_url)


async def send(api: FakeApi) -> Any:
    (request,) = CODEC.encode(outbound(Text(text="Temos horários às 10h e às 15h.")), fake_ctx(api))
    return await deliver_one(CODEC, request, FAST)


def evolution_created(_: Recorded) -> Reply:
    return Reply(status=201, body=load_json("response_send_text"))


async def test_send_through_the_api_returns_the_message_id(fake_api: FakeApi) -> None:
    fake_api.responder = evolution_created
    result = await send(fake_api)
    assert result.ok and result.native_ids == ["BAE594145F4C59B4"]
    (recorded,) = fake_api.requests
    assert (recorded.method, recorded.path) == ("POST", f"/message/sendText/{INSTANCE}")
    assert recorded.headers["apikey"] == APIKEY
    assert recorded.json() == load_json("send_text")


@pytest.mark.parametrize(
    ("status_code", "name"),
    [
        (400, "error_400_not_on_whatsapp"),
        (401, "error_401_unauthorized"),
        (403, "error_403_forbidden"),
        (404, "error_404_instance"),
    ],
)
async def test_refusals_are_not_retried(fake_api: FakeApi, status_code: int, name: str) -> None:
    fake_api.responder = evolution_created
    fake_api.queue(Reply(status=status_code, body=load_json(name)))
    result = await send(fake_api)
    assert not result.ok and not result.retryable
    assert len(fake_api.requests) == 1


async def test_rate_limit_is_retried_after_retry_after(fake_api: FakeApi) -> None:
    fake_api.responder = evolution_created
    fake_api.queue(Reply(status=429, body=b"Too Many Requests", headers={"Retry-After": "0"}))
    result = await send(fake_api)
    assert result.ok and result.native_ids == ["BAE594145F4C59B4"]
    assert len(fake_api.requests) == 2


async def test_server_errors_and_dropped_connections_are_retried_then_succeed(fake_api: FakeApi) -> None:
    fake_api.responder = evolution_created
    fake_api.queue(
        Reply(status=500, body=load_json("error_500_internal")),
        Reply(status=400, body=load_json("error_400_connection_closed")),
    )
    result = await send(fake_api)
    assert result.ok
    assert len(fake_api.requests) == 3


# -------------------------------------------------------------------------------- registration


def test_registered_under_its_channel_name() -> None:
    codec = load("evolution")
    assert isinstance(codec, EvolutionCodec)
    caps = codec.capabilities
    assert (caps.text_limit, caps.markup, caps.max_buttons, caps.max_list_rows) == (4096, "whatsapp", 3, 10)
    assert caps.reply and caps.reaction and not caps.edit and not caps.delete
    assert codec.default_api_base == ""
