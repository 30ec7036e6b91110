"""A small virtual-actor runtime: active actors take their mail turn by turn, each in an asyncio task of
its own while it has mail.

Rules it keeps (docs/architecture.md, "Actors"):
* `tell(key, message)` never fails for a missing actor: the first message activates it.
* One message completes before the next starts, so an actor's state needs no locks.
* The data lane is bounded. `tell` waits when the mailbox is full; `offer` never waits: it says False
  instead, so a caller that serves many keys (a shared JetStream consumer) can hand the message back to
  the server for later and go on with other keys. A control lane (`stop`) is looked at before every turn.
* An activation (`on_activate`, loading state) that keeps failing is given up after `max_restarts`
  tries: the mail waiting for it goes to its `on_failed` callbacks (the caller parks it in the dead-letter
  stream), and the next message for that key tries a fresh activation. A stop request ends the retries
  at once, so shutting down never waits on an actor that cannot load.
* A turn that raises restarts the actor from its last checkpoint, with exponential backoff and jitter;
  after `max_restarts` in `restart_window` seconds the message is handed to its `on_failed` callback
  (the caller parks it in the dead-letter stream) and the actor goes on with the next.
* Group commit: after a run of turns (mailbox empty, or `checkpoint_every` turns) the actor checkpoints
  its state, and only then are the messages' `on_applied` callbacks (JetStream acks) run. A crash before
  the checkpoint means redelivery, never a lost message.
* A checkpoint that keeps failing ends the activation without acknowledging its mail: every message it
  holds (applied but unsaved, or still in the mailbox) is handed to its `on_released` callback, so the
  caller stops holding it and JetStream redelivers it; the next message activates the actor afresh
  from its stored state.
* `stop` passivates every actor and waits a grace period; a turn still running then is cancelled and
  the mail it holds unsaved is released, so stopping never hangs on one actor.
* Idle actors passivate: stop taking mail, drain, checkpoint, stop. Mail for a passivating key waits for
  the old activation to finish before the new one loads its state, so two activations never overlap.
* An active actor whose mailbox is empty (and checkpointed) has no task: it is parked, and the next
  mail or a stop request starts a task again, without activating it anew. One sweep per system, not a
  timer per actor, passivates those parked for `idle_seconds`. A hub holds tens of thousands of idle
  conversations, and a task waiting on a timeout costs more than the rest of an idle actor
  (bench/memory_bench.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import random
from abc import ABC, abstractmethod
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import msgspec

__all__ = ["Actor", "ActorSystem", "Mail"]

log = logging.getLogger("babelhub.actors")

_MAX_SWEEP_INTERVAL = 30.0
"""Seconds between two looks for idle actors at most: an actor passivates at most this much (or a
quarter of `idle_seconds`, if less) after it has been idle `idle_seconds`."""

M = TypeVar("M")
Callback = Callable[[], Awaitable[None]]
FailureCallback = Callable[[BaseException], Awaitable[None]]


class Actor(ABC, Generic[M]):
    """Subclass and implement `receive`; override the lifecycle hooks that need work."""

    def __init__(self, key: str) -> None:
        self.key = key

    async def on_activate(self) -> None:
        """Load state (a snapshot). Called on first activation and after every restart."""

    @abstractmethod
    async def receive(self, message: M) -> None:
        """Apply one message. Raising restarts the actor from its last checkpoint."""

    async def checkpoint(self) -> None:
        """Persist state; called before the acks of the turns since the previous checkpoint. A failure
        is retried; an exception with a true `fatal` attribute (another owner wrote first) is not."""

    async def on_passivate(self) -> None:
        """Last call before the activation ends (after the final checkpoint)."""


class Mail(msgspec.Struct, Generic[M]):
    message: M
    on_applied: Callback | None = None
    on_failed: FailureCallback | None = None
    on_released: Callback | None = None
    """Called when the activation holding the message ends without applying it for good (its state
    could not be saved, or the system stopped while it was loading): nothing was recorded, so the
    message must be delivered again."""


class _Stop(msgspec.Struct, frozen=True):
    """Control message: drain, checkpoint, stop."""


class _Abandoned(Exception):
    """An activation whose state could not be checkpointed stops without acknowledging its mail."""


class _ActivationFailed(Exception):
    """`on_activate` kept failing: the activation ends and its waiting mail is given up."""


class _Interrupted(Exception):
    """A stop request arrived while the actor was still loading: end without touching the mail."""


class _Mailbox(Generic[M]):
    """The data lane: a bounded FIFO, with `asyncio.Queue`'s methods that the runtime uses. It holds no
    deque while it is empty (an empty deque takes 760 bytes, and most actors are idle)."""

    __slots__ = ("_items", "_senders", "maxsize")

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._items: deque[Mail[M]] | None = None
        self._senders: list[asyncio.Future[None]] | None = None
        """Senders waiting for room, first come first served."""

    def qsize(self) -> int:
        return len(self._items) if self._items is not None else 0

    def empty(self) -> bool:
        return self._items is None

    def full(self) -> bool:
        return self.qsize() >= self.maxsize

    def put_nowait(self, mail: Mail[M]) -> None:
        if self._items is None:
            self._items = deque()
        self._items.append(mail)

    def get_nowait(self) -> Mail[M]:
        if self._items is None:
            raise asyncio.QueueEmpty
        mail = self._items.popleft()
        if not self._items:
            self._items = None
        self._wake_next_sender()
        return mail

    async def put(self, mail: Mail[M]) -> None:
        """Queue `mail`, waiting while the mailbox is full."""
        while self.full():
            room = asyncio.get_running_loop().create_future()
            if self._senders is None:
                self._senders = []
            self._senders.append(room)
            try:
                await room
            except asyncio.CancelledError:
                self._forget_sender(room)
                if room.done() and not room.cancelled() and not self.full():
                    self._wake_next_sender()  # the room it was given goes to the next sender
                raise
            self._forget_sender(room)
        self.put_nowait(mail)

    def _wake_next_sender(self) -> None:
        for room in self._senders or ():
            if not room.done():
                room.set_result(None)
                return

    def _forget_sender(self, room: asyncio.Future[None]) -> None:
        if self._senders is not None and room in self._senders:
            self._senders.remove(room)
            if not self._senders:
                self._senders = None


class _Cell(Generic[M]):
    """One activation: its actor, mailbox and (while it has mail) task. Slotted, and every part it needs
    only now and then is made when needed: a hub holds many idle ones."""

    __slots__ = ("actor", "control", "current", "ended", "mailbox", "parked_at", "pending", "restarts", "task",
                 "wakeup")

    def __init__(self, actor: Actor[M], mailbox_size: int) -> None:
        self.actor = actor
        self.mailbox: _Mailbox[M] = _Mailbox(mailbox_size)
        self.control: list[_Stop] = []
        self.task: asyncio.Task[None] | None = None
        """Serves the mailbox; None while the actor is parked (idle, no mail)."""
        self.parked_at: float | None = None
        """Loop time at which the actor was parked; None while it has a task."""
        self.wakeup: asyncio.Event | None = None
        """Set by new mail or a stop request; exists while activation waits out a backoff."""
        self.restarts: list[float] = []
        """When its recent restarts happened, oldest first."""
        self.pending: list[Mail[M]] = []
        """Applied since the last checkpoint, acknowledged by the next one."""
        self.current: Mail[M] | None = None
        """The message of the turn under way."""
        self.ended = False
        """The activation is over: mail that still reaches this mailbox must be settled by the sender."""


class ActorSystem(Generic[M]):
    def __init__(
        self,
        name: str,
        factory: Callable[[str], Actor[M]],
        *,
        mailbox_size: int = 256,
        idle_seconds: float = 900.0,
        max_active: int = 10_000,
        checkpoint_every: int = 64,
        max_restarts: int = 3,
        restart_window: float = 60.0,
        backoff_base: float = 0.05,
        backoff_max: float = 5.0,
    ) -> None:
        self.name = name
        self._factory = factory
        self._mailbox_size = mailbox_size
        self._idle_seconds = idle_seconds
        self._max_active = max_active
        self._checkpoint_every = checkpoint_every
        self._max_restarts = max_restarts
        self._restart_window = restart_window
        self._backoff_base = backoff_base
        self._backoff_max = backoff_max
        self._cells: OrderedDict[str, _Cell[M]] = OrderedDict()
        """Least recently used first: moved to the end by new mail and by parking."""
        self._sweeper: asyncio.Task[None] | None = None
        self._ending: dict[str, asyncio.Task[None]] = {}
        self._closed = False
        self.restarts_total = 0
        self.failures_total = 0

    # ------------------------------------------------------------------------------------- public

    @property
    def active(self) -> int:
        return len(self._cells)

    def mailbox_depth(self) -> int:
        return sum(cell.mailbox.qsize() for cell in self._cells.values())

    def has_room(self, key: str, count: int = 1) -> bool:
        """Whether `count` more messages for `key` would be taken by `offer` right now."""
        cell = self._cells.get(key)
        free = self._mailbox_size if cell is None else self._mailbox_size - cell.mailbox.qsize()
        return free >= count

    def offer(
        self,
        key: str,
        message: M,
        on_applied: Callback | None = None,
        on_failed: FailureCallback | None = None,
        on_released: Callback | None = None,
    ) -> bool:
        """Queue `message` for actor `key` if its mailbox has room, activating it if needed; never waits.
        False means nothing was queued: the caller keeps the message and offers it again later."""
        if self._closed:
            raise RuntimeError(f"actor system {self.name} is stopped")
        if not self.has_room(key):
            return False
        cell = self._cell(key)
        cell.mailbox.put_nowait(Mail(message, on_applied, on_failed, on_released))
        self._wake(key, cell)
        return True

    async def tell(
        self,
        key: str,
        message: M,
        on_applied: Callback | None = None,
        on_failed: FailureCallback | None = None,
        on_released: Callback | None = None,
    ) -> None:
        """Queue `message` for actor `key`, activating it if needed; waits while its mailbox is full."""
        if self._closed:
            raise RuntimeError(f"actor system {self.name} is stopped")
        cell = self._cell(key)
        mail = Mail(message, on_applied, on_failed, on_released)
        await cell.mailbox.put(mail)
        if cell.ended:  # the activation gave up while this sender waited for room
            await self._settle_leftovers(cell, None)
        elif self._cells.get(key) is cell:
            self._wake(key, cell)

    async def stop(self, grace: float = 10.0) -> None:
        """Passivate every actor (drain, checkpoint) and wait for them, at most `grace` seconds: a turn
        still running then (a channel that does not answer) is cancelled, and its unsaved mail is
        released for redelivery, so stopping never hangs on one conversation."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        await self.stop_where(lambda key: True, grace)

    async def stop_where(self, chosen: Callable[[str], bool], grace: float) -> None:
        """Passivate the actors whose key is `chosen`, as `stop` does all of them (a `grace` of 0 cancels
        them at once: their unsaved mail is released). Others go on; new mail activates afresh."""
        for key in [key for key in self._cells if chosen(key)]:
            self._passivate(key)
        tasks = [task for key, task in self._ending.items() if chosen(key)]
        if not tasks:
            return
        await asyncio.sleep(0)  # each task enters its body, so that even one cancelled now releases its mail
        _, late = await asyncio.wait(tasks, timeout=grace) if grace > 0 else (set(), set(tasks))
        for task in late:
            if grace > 0:
                log.warning("actor %s:%s did not finish within %.0fs of stop: cancelled", self.name,
                            task.get_name(), grace)
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # ---------------------------------------------------------------------------------- lifecycle

    def _cell(self, key: str) -> _Cell[M]:
        cell = self._cells.get(key)
        if cell is None:
            return self._activate(key)
        self._cells.move_to_end(key)
        return cell

    def _activate(self, key: str) -> _Cell[M]:
        cell: _Cell[M] = _Cell(self._factory(key), self._mailbox_size)
        self._cells[key] = cell
        self._serve_in_task(key, cell, activate=True)
        while len(self._cells) > self._max_active:
            self._passivate(next(iter(self._cells)))
        return cell

    def _serve_in_task(self, key: str, cell: _Cell[M], *, activate: bool) -> None:
        previous = self._ending.get(key) if activate else None
        cell.task = asyncio.create_task(self._run(key, cell, previous, activate), name=f"{self.name}:{key}")

    def _wake(self, key: str, cell: _Cell[M]) -> None:
        """New mail or a stop request for an active actor: a parked one gets a task again."""
        if cell.task is not None:  # serving: it looks at its mailbox and control lane before parking
            if cell.wakeup is not None:
                cell.wakeup.set()
            return
        cell.parked_at = None
        self._serve_in_task(key, cell, activate=False)

    def _park(self, key: str, cell: _Cell[M]) -> None:
        """The actor has no mail and its turns are saved: end its task; the sweep passivates it once it
        has been parked for `idle_seconds`."""
        cell.task = None
        cell.parked_at = asyncio.get_running_loop().time()
        if self._cells.get(key) is cell:
            self._cells.move_to_end(key)
        if self._sweeper is None and math.isfinite(self._idle_seconds) and not self._closed:
            self._sweeper = asyncio.create_task(self._sweep_idle(), name=f"{self.name} idle sweep")

    async def _sweep_idle(self) -> None:
        """Passivate the actors parked for `idle_seconds`, from time to time. Cells are in the order of
        their last mail or parking, so a sweep stops at the first actor parked too recently: every
        parked one after it was parked later still. Actors that are serving mail are passed over."""
        loop = asyncio.get_running_loop()
        interval = min(max(self._idle_seconds / 4, 0.01), _MAX_SWEEP_INTERVAL)  # never a busy loop
        while True:
            await asyncio.sleep(interval)
            cutoff = loop.time() - self._idle_seconds
            idle: list[str] = []
            for key, cell in self._cells.items():
                if cell.parked_at is None:
                    continue
                if cell.parked_at > cutoff:
                    break
                idle.append(key)
            for key in idle:
                self._passivate(key)

    def _passivate(self, key: str) -> None:
        cell = self._cells.pop(key, None)
        if cell is None:
            return
        cell.control.append(_Stop())
        self._wake(key, cell)
        assert cell.task is not None
        self._ending[key] = cell.task
        cell.task.add_done_callback(functools.partial(self._forget, key))

    def _forget(self, key: str, task: asyncio.Task[None]) -> None:
        if self._ending.get(key) is task:
            del self._ending[key]
        if not task.cancelled() and task.exception() is not None:
            log.error("actor %s:%s ended with an error", self.name, key, exc_info=task.exception())

    async def _run(self, key: str, cell: _Cell[M], previous: asyncio.Task[None] | None, activate: bool) -> None:
        try:
            await self._serve(key, cell, previous, activate)
        except _Abandoned:
            # Its state could not be saved: stop this activation without acknowledging anything, so
            # JetStream redelivers that mail, and the next message activates afresh from the store.
            await self._end(key, cell, None)
        except _Interrupted:
            await self._end(key, cell, None)
        except _ActivationFailed as exc:
            await self._end(key, cell, exc)
        except asyncio.CancelledError:
            await self._end(key, cell, None)  # nothing it holds was saved: hand it all back
            raise

    async def _end(self, key: str, cell: _Cell[M], failure: BaseException | None) -> None:
        """Retire an activation that could not go on, and settle every message it still holds: given up
        (`on_failed`) when `failure` is set, otherwise released for redelivery."""
        cell.ended = True
        if self._cells.get(key) is cell:
            del self._cells[key]
        released, cell.pending = cell.pending, []
        for mail in released:
            await _call(self, cell, mail.on_released)
        if cell.current is not None:  # its turn restarted the actor, which then could not load
            await self._settle(cell, cell.current, failure)
            cell.current = None
        await self._settle_leftovers(cell, failure)

    async def _settle_leftovers(self, cell: _Cell[M], failure: BaseException | None) -> None:
        while not cell.mailbox.empty():
            await self._settle(cell, cell.mailbox.get_nowait(), failure)

    async def _settle(self, cell: _Cell[M], mail: Mail[M], failure: BaseException | None) -> None:
        if failure is None:
            await _call(self, cell, mail.on_released)
            return
        self.failures_total += 1
        if mail.on_failed is not None:
            await _call(self, cell, functools.partial(mail.on_failed, failure))

    async def _serve(self, key: str, cell: _Cell[M], previous: asyncio.Task[None] | None, activate: bool) -> None:
        """Take the actor's mail until it has none (then park it) or it is asked to stop."""
        if previous is not None:
            # The previous activation of this key is still checkpointing: load state only after it.
            with contextlib.suppress(Exception):
                await asyncio.shield(previous)
        if activate:
            await self._start(cell)
        pending = cell.pending
        while True:
            if cell.control:
                await self._drain(cell, pending)
                await cell.actor.on_passivate()
                return
            if cell.mailbox.empty():
                await self._commit(cell, pending)
                if not cell.mailbox.empty() or cell.control:
                    continue  # mail came in while the checkpoint was written
                self._park(key, cell)
                return
            mail = cell.mailbox.get_nowait()
            if await self._turn(cell, mail):
                pending.append(mail)
            if len(pending) >= self._checkpoint_every:
                await self._commit(cell, pending)

    async def _start(self, cell: _Cell[M]) -> None:
        """Run `on_activate`, retried with backoff; give up after `max_restarts` tries, or at once when
        a stop is requested (a key whose state cannot be loaded must not hold up shutdown)."""
        for attempt in range(1, self._max_restarts + 1):
            try:
                await cell.actor.on_activate()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("actor %s:%s failed to activate (attempt %d of %d): %r", self.name, cell.actor.key,
                            attempt, self._max_restarts, exc)
                if attempt == self._max_restarts:
                    raise _ActivationFailed(f"actor {cell.actor.key!r} could not be activated after {attempt} "
                                            f"tries: {exc!r}") from exc
            if cell.control:
                raise _Interrupted
            cell.wakeup = asyncio.Event()
            with contextlib.suppress(TimeoutError):  # a stop request cuts the backoff short
                await asyncio.wait_for(cell.wakeup.wait(), self._backoff(attempt))
            cell.wakeup = None
            if cell.control:
                raise _Interrupted

    async def _drain(self, cell: _Cell[M], pending: list[Mail[M]]) -> None:
        while not cell.mailbox.empty():
            mail = cell.mailbox.get_nowait()
            if await self._turn(cell, mail):
                pending.append(mail)
        await self._commit(cell, pending)

    async def _commit(self, cell: _Cell[M], pending: list[Mail[M]]) -> None:
        if not pending:
            return
        await self._checkpoint(cell)
        for mail in pending:
            # An ack that does not arrive means a redelivery, which is absorbed.
            await _call(self, cell, mail.on_applied)
        pending.clear()

    async def _checkpoint(self, cell: _Cell[M]) -> None:
        """Save state, retrying passing failures; give the activation up if it cannot be saved."""
        for attempt in range(1, self._max_restarts + 1):
            try:
                await cell.actor.checkpoint()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                fatal = getattr(exc, "fatal", False)
                log.warning("actor %s:%s checkpoint failed (attempt %d): %r", self.name, cell.actor.key,
                            attempt, exc)
                if fatal or attempt == self._max_restarts:
                    raise _Abandoned from exc
                await asyncio.sleep(self._backoff(attempt))

    # --------------------------------------------------------------------------------- supervision

    async def _turn(self, cell: _Cell[M], mail: Mail[M]) -> bool:
        """Apply one message, restarting the actor on failure; False when the message was given up."""
        loop = asyncio.get_running_loop()
        cell.current = mail
        while True:
            try:
                await cell.actor.receive(mail.message)
                cell.current = None
                return True
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if getattr(exc, "fatal", False):  # not this activation's to apply: hand it all back
                    log.warning("actor %s:%s stops: %r", self.name, cell.actor.key, exc)
                    raise _Abandoned from exc
                now = loop.time()
                while cell.restarts and now - cell.restarts[0] > self._restart_window:
                    del cell.restarts[0]
                if len(cell.restarts) >= self._max_restarts:
                    self.failures_total += 1
                    log.error("actor %s:%s gave up on a message", self.name, cell.actor.key, exc_info=exc)
                    cell.current = None
                    if mail.on_failed is not None:
                        await _call(self, cell, functools.partial(mail.on_failed, exc))
                    return False
                cell.restarts.append(now)
                self.restarts_total += 1
                log.warning("actor %s:%s restarting after %r", self.name, cell.actor.key, exc)
                await asyncio.sleep(self._backoff(len(cell.restarts)))
                cell.actor = self._factory(cell.actor.key)
                await self._start(cell)

    def _backoff(self, attempt: int) -> float:
        ceiling: float = min(self._backoff_max, self._backoff_base * 2**attempt)
        return random.uniform(0.5, 1.0) * ceiling


async def _call(system: ActorSystem[M], cell: _Cell[M], callback: Callback | None) -> None:
    """Run a message's settle callback; its failure (a lost connection) is logged, never raised into
    the actor: JetStream's redelivery is the fallback."""
    if callback is None:
        return
    try:
        await callback()
    except asyncio.CancelledError:
        raise
    except Exception:
        log.warning("actor %s:%s could not settle a message", system.name, cell.actor.key, exc_info=True)
