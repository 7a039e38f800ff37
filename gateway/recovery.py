"""Ending turns whose gateway died.

A turn's owner renews its lease in the session service while it runs. When a replica dies mid-answer
the lease runs out; the next replica to touch the session (a client resuming, or a new message taking
over the session) ends that turn in the log with a retryable error and stores its partial answer as
interrupted, so nobody waits forever and no text is lost.
"""

import logging

from duplex.chat.v1 import chat_pb2
from duplex.common.errors import DuplexError, Unavailable
from duplex.history.v1 import history_pb2
from gateway.clients import HistoryClient, SessionClient
from gateway.hub import UNLOGGED_LIMIT, SessionHub, error_event

log = logging.getLogger(__name__)

ABANDONED_MESSAGE = "the server writing this answer stopped; send the message again"


async def partial_answer(sessions: SessionClient, user_id: str, session_id: str, turn_id: str) -> str:
    """The text a turn had streamed, from the session's log."""
    parts = []
    async for logged in sessions.read_events(user_id, session_id, 0, follow=False):
        if logged.turn_id == turn_id:
            event = chat_pb2.ChatEvent.FromString(logged.payload)
            if event.WhichOneof("kind") == "delta":
                parts.append(event.delta.text)
            elif event.WhichOneof("kind") == "tool_result":
                parts.clear()  # the stored answer is the last round's text, as a live turn stores it
    return "".join(parts)


async def end_abandoned_turn(
    sessions: SessionClient, history: HistoryClient, hub: SessionHub, conversation_id: str, turn_id: str
) -> chat_pb2.ChatEvent | None:
    """Store the abandoned turn's partial answer as interrupted and log its terminal error event. The
    caller holds the session's turn (so it may append) and has synced `hub` to the log."""
    try:
        text = await partial_answer(sessions, hub.user_id, hub.session_id, turn_id)
        if text:
            await history.append_message(history_pb2.AppendMessageRequest(
                user_id=hub.user_id, conversation_id=conversation_id, role=history_pb2.ROLE_ASSISTANT,
                content=text, status=history_pb2.MESSAGE_STATUS_INTERRUPTED, client_message_id=f"turn:{turn_id}",
            ))
        # The dead replica may have shown clients up to UNLOGGED_LIMIT events the log never got. Empty
        # deltas take those seqs, so the error lands after anything any client saw and replays stay whole.
        for _ in range(UNLOGGED_LIMIT):
            hub.publish(chat_pb2.ChatEvent(turn_id=turn_id, delta=chat_pb2.TextDelta(text="")))
        event = hub.publish(error_event(Unavailable(ABANDONED_MESSAGE), turn_id))
        await hub.flush()
    except DuplexError as error:
        log.warning("session %s: could not end abandoned turn %s: %s", hub.session_id, turn_id, error.message)
        return None
    log.info("session %s: ended turn %s, abandoned by its gateway (%d chars kept)", hub.session_id, turn_id,
             len(text))
    return event
