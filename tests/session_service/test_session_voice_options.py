"""Voice options (Session.voice_options, UpdateSession) through the real server, on both backends."""

import asyncio

import grpc

from duplex.session.v1 import session_pb2
from session_service.servicer import MAX_VOICE_OPTIONS_BYTES
from tests.session_service.rpc_helpers import (
    CALL_TIMEOUT,
    OWNER,
    begin_turn,
    end_turn,
    expect_status,
    get_session,
    open_session,
    update_session,
)

# Not UTF-8 on purpose: the options are a serialized message and must travel as opaque bytes.
VOICE = b"\x0a\x05alloy\x15\x00\x00\xc0\x3f\xff"
OTHER_VOICE = b"\x0a\x04echo\x00\xfe"


async def test_a_new_session_keeps_the_voice_options_it_was_opened_with(stub):
    opened = await open_session(stub, voice_options=VOICE)
    assert opened.voice_options == VOICE
    assert (await get_session(stub, opened.session_id)).voice_options == VOICE
    assert (await open_session(stub)).voice_options == b""  # a session that never set them


async def test_a_re_attach_ignores_voice_options(stub):
    # Only UpdateSession changes them, so a reconnecting client cannot reset them by accident.
    session_id = (await open_session(stub, voice_options=VOICE)).session_id
    reply = await stub.OpenSession(
        session_pb2.OpenSessionRequest(user_id=OWNER, session_id=session_id, voice_options=OTHER_VOICE),
        timeout=CALL_TIMEOUT,
    )
    assert reply.resumed and reply.session.voice_options == VOICE
    assert (await get_session(stub, session_id)).voice_options == VOICE


async def test_update_replaces_the_voice_options_and_empty_clears_them(stub):
    session_id = (await open_session(stub, voice_options=VOICE, model="m1", conversation_id="c1")).session_id

    updated = await update_session(stub, session_id, OTHER_VOICE)
    assert updated.voice_options == OTHER_VOICE
    # Nothing else about the session changes.
    assert (updated.session_id, updated.user_id, updated.model, updated.conversation_id) == (
        session_id,
        OWNER,
        "m1",
        "c1",
    )
    assert (await get_session(stub, session_id)).voice_options == OTHER_VOICE

    assert (await update_session(stub, session_id, b"")).voice_options == b""
    assert (await get_session(stub, session_id)).voice_options == b""


async def test_update_during_a_turn_leaves_the_turn_and_log_alone(stub):
    session_id = (await open_session(stub)).session_id
    await begin_turn(stub, session_id, "t1")
    updated = await update_session(stub, session_id, VOICE)
    assert (updated.active_turn_id, updated.last_seq, updated.voice_options) == ("t1", 0, VOICE)
    await end_turn(stub, session_id, "t1")
    assert (await get_session(stub, session_id)).voice_options == VOICE


async def test_update_of_an_unknown_session_is_not_found(stub):
    # Another user's session is covered with every other call in test_session_rpc.py.
    for session_id in ("0" * 32, "not-a-session-id"):
        await expect_status(grpc.StatusCode.NOT_FOUND, update_session(stub, session_id, VOICE))


async def test_update_requires_user_and_session(stub):
    session_id = (await open_session(stub)).session_id
    error = await expect_status(grpc.StatusCode.INVALID_ARGUMENT, update_session(stub, session_id, VOICE, user_id=""))
    assert "user_id" in error.details()
    error = await expect_status(grpc.StatusCode.INVALID_ARGUMENT, update_session(stub, "", VOICE))
    assert "session_id" in error.details()


async def test_voice_options_are_bounded_and_a_refusal_changes_nothing(stub):
    largest = b"\xff" * MAX_VOICE_OPTIONS_BYTES
    session_id = (await open_session(stub, voice_options=largest)).session_id
    assert (await get_session(stub, session_id)).voice_options == largest

    too_large = largest + b"\x00"
    error = await expect_status(grpc.StatusCode.INVALID_ARGUMENT, update_session(stub, session_id, too_large))
    assert str(MAX_VOICE_OPTIONS_BYTES) in error.details()
    assert (await get_session(stub, session_id)).voice_options == largest
    await expect_status(grpc.StatusCode.INVALID_ARGUMENT, open_session(stub, voice_options=too_large))


async def test_update_keeps_the_session_alive(start_service):
    stub = (await start_service(session_ttl_seconds=0.8)).stub
    session = await open_session(stub)
    for _ in range(3):
        await asyncio.sleep(0.3)
        updated = await update_session(stub, session.session_id, VOICE)
    # 0.9 s after the open, but moments after the last update: alive, its expiry moved on.
    assert updated.expires_at.ToNanoseconds() > session.expires_at.ToNanoseconds()
    assert (await get_session(stub, session.session_id)).voice_options == VOICE
