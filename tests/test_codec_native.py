"""The helpers codecs share (babelhub/codecs/native.py and meta_graph.py): one rule for every channel
that uses them, so a channel's own exceptions stay visible in its codec."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from babelhub.canonical import MediaKind
from babelhub.codecs import meta_graph, native
from babelhub.codecs.base import EncodeContext, HttpRequest
from babelhub.errors import EncodeError, SignatureError


@pytest.mark.parametrize(
    ("mime", "filename", "kind"),
    [
        ("image/png", "", "image"),
        ("image/*", "", "image"),
        ("IMAGE/JPEG", "", "image"),
        ("video/mp4", "", "video"),
        ("audio/ogg", "", "audio"),  # a voice note is the codec's to mark
        ("application/pdf", "", "document"),
        ("text/vcard", "", "document"),
        ("", "", "document"),
        ("", "holiday.jpg", "image"),
        ("", "minutes.pdf", "document"),
        ("audio/mpeg", "cover.jpg", "audio"),  # the MIME type wins over the file name
    ],
)
def test_media_kind_follows_the_mime_types_major_part(mime: str, filename: str, kind: MediaKind) -> None:
    assert native.media_kind(mime, filename) == kind


def test_clip_cuts_with_an_ellipsis_only_when_needed() -> None:
    assert native.clip("Red shoes", 9) == "Red shoes"
    assert native.clip("Red shoes", 5) == "Red \u2026"


def test_native_id_names_what_pointed_at_an_unknown_message() -> None:
    ctx = EncodeContext(tenant="acme", connection="c", to="x", native_ids={"known": "n-1", "blank": ""})
    assert native.native_id(ctx, "known", "reply_to", "Slack") == "n-1"
    for canonical_id in ("never-sent", "blank"):
        with pytest.raises(EncodeError, match=f"Slack message id of reaction target '{canonical_id}'"):
            native.native_id(ctx, canonical_id, "reaction target", "Slack")


def test_a_missing_setting_is_named_with_its_kind() -> None:
    assert native.required_secret({"bot_token": "t"}, "bot_token", "Slack") == "t"
    with pytest.raises(EncodeError, match=r"Teams connection has no 'bot_token' secret \(a token\)"):
        native.required_secret({"bot_token": ""}, "bot_token", "Teams", "a token")
    with pytest.raises(EncodeError, match="WhatsApp connection has no 'phone_number_id' option"):
        native.required_option({}, "phone_number_id", "WhatsApp")


def _meta_signed(body: bytes, secret: str, upper: bool = False) -> HttpRequest:
    digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return HttpRequest(body=body, headers={"x-hub-signature-256": f"sha256={digest.upper() if upper else digest}"})


def test_meta_signatures_in_either_hex_case_verify() -> None:
    meta_graph.verify_signature(_meta_signed(b"{}", "app-secret"), "app-secret", "whatsapp")
    meta_graph.verify_signature(_meta_signed(b"{}", "app-secret", upper=True), "app-secret", "whatsapp")
    with pytest.raises(SignatureError, match="whatsapp: X-Hub-Signature-256 does not match"):
        meta_graph.verify_signature(_meta_signed(b"{}", "other"), "app-secret", "whatsapp")


@pytest.mark.parametrize("method", ["GET", "get"])
def test_meta_handshake_answers_every_hub_mode_request(method: str) -> None:
    def check(mode: str, token: str) -> int | None:
        query = {"hub.mode": mode, "hub.verify_token": token, "hub.challenge": "42"}
        answer = meta_graph.handshake(HttpRequest(method=method, query=query), "s3cret")
        return answer.status if answer else None

    assert check("subscribe", "s3cret") == 200
    assert check("subscribe", "guess") == 403
    assert check("unsubscribe", "s3cret") == 403
    assert meta_graph.handshake(HttpRequest(method="POST", query={"hub.mode": "subscribe"}), "s3cret") is None
