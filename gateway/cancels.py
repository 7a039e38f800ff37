"""Stopping a running turn from any replica.

A turn runs on one gateway replica, its owner. A stop, an interrupt or a session close may reach any
replica: grpc-web's CancelTurn is a request of its own, and a client may have reconnected elsewhere. The
replica running the turn stops it at once; any other asks the session service, which records the request
on the turn and sends it to the owner's WatchCancels stream. Every replica keeps that stream open
(CancelWatch); each time it is in place again the replica renews its running turns' leases, and those
answers report any request made while it was not.
"""

import asyncio
import contextlib
import logging

from duplex.common.errors import DuplexError
from duplex.session.v1 import session_pb2
from gateway.clients import SessionClient
from gateway.hub import HubRegistry

log = logging.getLogger(__name__)

RETRY_FIRST_SECONDS = 0.5
RETRY_MAX_SECONDS = 5.0


async def stop_turn(
    sessions: SessionClient, hubs: HubRegistry, user_id: str, session_id: str, turn_id: str = "",
    interrupt: bool = False, played_ms: int = 0,
) -> bool:
    """Stop the session's running turn (turn_id, or whichever runs when empty) wherever it runs; for a
    barge-in, keep what was heard by played_ms. True when a turn still answering was asked to stop."""
    hub = hubs.get(session_id)
    turn = hub.turn if hub is not None else None
    if turn is not None and turn_id in ("", turn.id):
        return turn.stop(interrupt, played_ms)
    asked = await sessions.request_cancel(user_id, session_id, turn_id, interrupt=interrupt, played_ms=played_ms)
    return bool(asked)


def apply_cancel_request(hubs: HubRegistry, request: session_pb2.CancelRequested) -> None:
    """A stop asked on another replica, for a turn this replica may run."""
    hub = hubs.get(request.session_id)
    turn = hub.turn if hub is not None else None
    if turn is not None and turn.id == request.turn_id:
        turn.stop(request.interrupt, request.played_ms)


class CancelWatch:
    """Keeps this replica's WatchCancels stream open and stops the turns it names."""

    def __init__(self, sessions: SessionClient, hubs: HubRegistry, owner: str):
        self._sessions = sessions
        self._hubs = hubs
        self._owner = owner
        self._retry_in = RETRY_FIRST_SECONDS
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._watch_until_closed(), name="cancel-watch")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _watch_until_closed(self) -> None:
        while True:
            try:
                await self._watch()
                reason = "the session service ended the stream"
            except DuplexError as error:
                reason = error.message
            log.warning("not watching for cancels from other replicas (%s); retrying in %.1f s", reason,
                        self._retry_in)
            await asyncio.sleep(self._retry_in)
            self._retry_in = min(self._retry_in * 2, RETRY_MAX_SECONDS)

    async def _watch(self) -> None:
        async with contextlib.aclosing(self._sessions.watch_cancels(self._owner)) as requests:
            async for request in requests:
                if request is None:  # in place: requests made before it come with the leases' renewals
                    self._retry_in = RETRY_FIRST_SECONDS
                    await self._hubs.renew_leases()
                else:
                    apply_cancel_request(self._hubs, request)
