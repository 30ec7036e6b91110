"""The `echo` processor transport: a built-in demo app that answers over NATS exactly like yours would.

It reads the inbound envelopes routed to it (`ProcessorTransport.follow_inbound`) and publishes replies
on `<prefix>.<tenant>.out.<conversation>`: the text it got, the media it got, buttons when asked for
"menu", and what was chosen when a button (or its number) comes back.
"""

from __future__ import annotations

from nats.aio.msg import Msg

from babelhub import canonical as c
from babelhub.errors import PayloadTooLarge
from babelhub.plugins import ProcessorTransport
from babelhub.services.deadletters import DeadLetter
from babelhub.services.telemetry import span

__all__ = ["EchoTransport", "reply_to"]


class EchoTransport(ProcessorTransport):
    name = "echo"

    async def start(self) -> None:
        await self.follow_inbound(self._on_inbound)

    async def _on_inbound(self, msg: Msg, inbound: c.Envelope) -> None:
        with span("processor.echo", dict(msg.headers or {})):
            reply = reply_to(inbound)
            if reply is not None:
                await self._publish(reply)
        await msg.ack()

    async def _publish(self, reply: c.Message) -> None:
        ctx = self.services.ctx
        subject, payload = ctx.subjects.outbound(reply.tenant, reply.conversation.id), c.encode(reply)
        try:
            await ctx.publisher.publish(subject, payload, dedup=(reply.id,))
        except PayloadTooLarge as exc:
            await ctx.dead_letters.park(DeadLetter(stage="processor", error=str(exc), tenant=reply.tenant,
                                                   subject=subject, body=payload))


MENU = c.Buttons(
    text="What would you like to do?",
    buttons=[
        c.Button(id="menu:hours", title="Opening hours"),
        c.Button(id="menu:order", title="Track my order"),
        c.Button(id="menu:human", title="Talk to a person"),
    ],
)


def reply_to(inbound: c.Envelope) -> c.Message | None:
    """The echo processor's answer to one inbound envelope (None: nothing to say)."""
    if not isinstance(inbound, c.Message) or inbound.direction != "inbound":
        return None
    if inbound.sender is not None and inbound.sender.role != "user":
        return None
    parts = _answer(inbound.parts)
    if not parts:
        return None
    return c.Message(
        id=c.stable_id("echo", inbound.id),
        tenant=inbound.tenant,
        conversation=inbound.conversation,
        ts=c.now(),
        direction="outbound",
        reply_to=inbound.id,
        parts=parts,
    )


def _answer(parts: list[c.Part]) -> list[c.Part]:
    action = next((part for part in parts if isinstance(part, c.Action)), None)
    if action is not None:
        return [c.Text(text=f"You chose: {action.title or action.id}")]
    answer: list[c.Part] = []
    for part in parts:
        match part:
            case c.Text(text=text) if text.strip().lower() == "menu":
                answer.append(MENU)
            case c.Text(text=text):
                answer.append(c.Text(text=f"echo: {text}"))
            case c.Media():
                answer.append(part)
            case c.Location() | c.Contact():
                answer.append(part)
            case _:
                answer.append(c.Text(text=f"echo: got a {part.__struct_config__.tag} part"))
    return answer
