"""The agent side of mediated replies: a middleware that sends replies through the service."""

from __future__ import annotations

import dataclasses

from agent_os.amb.envelope import Envelope
from agent_os.amb.middleware import Middleware, PublishNext
from agent_os.services.control_plane_service._subjects import INBOX, REPLIES, reply_subject


class ReplyViaService(Middleware):
    """Agent-side middleware for mediated mode: a reply to an inbox goes through the service.

    Put it after IATP in the agent client's middleware (so the rerouted topic is what gets
    signed): ``AMB(..., middleware=[iatp.middleware(), ReplyViaService()])``. Replies by
    ``client.reply``, the bus's error replies and signal acknowledgements all pass through it.
    """

    def __init__(self, reply_prefix: str = REPLIES, inbox_prefix: str = INBOX) -> None:
        self.reply_prefix = reply_prefix
        self.inbox = inbox_prefix + "."

    async def on_publish(self, envelope: Envelope, call_next: PublishNext) -> None:
        if envelope.correlation_id and not envelope.reply_to and envelope.topic.startswith(self.inbox):
            envelope = dataclasses.replace(envelope, topic=reply_subject(envelope.topic, self.reply_prefix))
        await call_next(envelope)
