"""The directory service (`babelhub.services.directory`) on a real connection against a local fake of Slack's
Web API: pages kept for their time and no longer, a bounded number of them, one channel call for
concurrent reads of the same page, and the channel's 429 holding back the whole connection."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest

from babelhub.codecs import load
from babelhub.services import config as cfg
from babelhub.services.connections import ConnectionService
from babelhub.services.delivery import RetryPolicy
from babelhub.services.directory import ChannelFailed, Directory
from babelhub.services.telemetry import Metrics
from tests.fakeapi import FakeApi, Recorded, Reply
from tests.hubkit import VirtualClock

USERS = json.loads((Path(__file__).parent / "fixtures" / "slack" / "directory_users_list.json").read_bytes())


@pytest.fixture
def slack(fake_api: FakeApi, http: aiohttp.ClientSession) -> ConnectionService:
    fake_api.responder = lambda _: Reply(body=USERS)
    settings = cfg.Connection(id="slack", tenant="acme", channel="slack", api_base=fake_api.base_url,
                              secrets={"bot_token": "xoxb-1", "signing_secret": "s"})
    return ConnectionService(settings, load("slack"), http, Metrics(), RetryPolicy())


def calls(api: FakeApi) -> list[Recorded]:
    return [request for request in api.requests if request.path.endswith("/users.list")]


async def test_a_page_is_kept_for_its_time_and_read_again_after(
        http: aiohttp.ClientSession, slack: ConnectionService, fake_api: FakeApi) -> None:
    clock = VirtualClock()
    directory = Directory(http, ttl=60, clock=clock)
    first = await directory.page(slack, "contacts", "", 10)
    clock.now += 59
    assert await directory.page(slack, "contacts", "", 10) == first and len(calls(fake_api)) == 1
    clock.now += 2
    await directory.page(slack, "contacts", "", 10)
    assert len(calls(fake_api)) == 2


async def test_the_cache_holds_a_bounded_number_of_pages(
        http: aiohttp.ClientSession, slack: ConnectionService, fake_api: FakeApi) -> None:
    directory = Directory(http, ttl=60, max_pages=2)
    for limit in (1, 2, 3):
        await directory.page(slack, "contacts", "", limit)
    await directory.page(slack, "contacts", "", 3)  # the most recent: still kept
    assert len(calls(fake_api)) == 3
    await directory.page(slack, "contacts", "", 1)  # the least recently read was forgotten
    assert len(calls(fake_api)) == 4


async def test_concurrent_reads_of_one_page_make_one_call(
        http: aiohttp.ClientSession, slack: ConnectionService, fake_api: FakeApi) -> None:
    directory = Directory(http, ttl=60)
    pages = await asyncio.gather(*(directory.page(slack, "contacts", "", 10) for _ in range(8)))
    assert len(calls(fake_api)) == 1 and all(page == pages[0] for page in pages)


async def test_a_caller_going_away_does_not_cancel_the_call_others_wait_for(
        http: aiohttp.ClientSession, slack: ConnectionService, fake_api: FakeApi) -> None:
    directory = Directory(http, ttl=60)
    leaving = asyncio.create_task(directory.page(slack, "contacts", "", 10))
    staying = asyncio.create_task(directory.page(slack, "contacts", "", 10))
    await asyncio.sleep(0)
    leaving.cancel()
    assert (await staying).items[0].id == "W012A3CDE"
    assert len(calls(fake_api)) == 1


async def test_the_channels_429_holds_back_the_connection_and_is_not_kept(
        http: aiohttp.ClientSession, slack: ConnectionService, fake_api: FakeApi) -> None:
    directory = Directory(http, ttl=60)
    fake_api.queue(Reply(status=429, body={"ok": False, "error": "ratelimited"}, headers={"Retry-After": "30"}))
    with pytest.raises(ChannelFailed) as failed:
        await directory.page(slack, "contacts", "", 10)
    assert failed.value.status == 429 and failed.value.retry_after == 30
    assert slack.pacer.reserve() > 25  # every call of the connection now waits for the channel
