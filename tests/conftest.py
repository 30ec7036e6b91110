from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.fakeapi import FakeApi


@pytest.fixture
async def fake_api() -> AsyncIterator[FakeApi]:
    """A fresh local fake channel API per test; set `.responder` / `.queue(...)` to script it."""
    api = FakeApi()
    await api.start()
    yield api
    await api.stop()
