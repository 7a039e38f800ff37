"""Quotas (messages, tokens, audio), personas and turn owners through the real server, on both backends."""

import asyncio
import time

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from duplex.common.errors import RETRY_AFTER_KEY
from duplex.session.v1 import session_pb2
from session_service.quota import DAY_SECONDS
from session_service.servicer import UNLIMITED_AUDIO_SECONDS, UNLIMITED_MESSAGES, UNLIMITED_TOKENS
from tests.session_service.rpc_helpers import (
    CALL_TIMEOUT,
    OWNER,
    STRANGER,
    end_turn,
    expect_status,
    get_session,
    open_session,
)


async def begin(stub, session_id: str, turn_id: str, user_id: str = OWNER, owner: str = "gw-1", uses_audio=False):
    request = session_pb2.BeginTurnRequest(
        user_id=user_id, session_id=session_id, turn_id=turn_id, owner=owner, uses_audio=uses_audio
    )
    return await stub.BeginTurn(request, timeout=CALL_TIMEOUT)


def retry_after_seconds(error: grpc.aio.AioRpcError, quota_id: str, limit: int) -> float:
    """The refusal's retry-after; its rich status (grpcio-status) says the same and names the quota."""
    values = [value for key, value in error.trailing_metadata() or () if key == RETRY_AFTER_KEY]
    assert values, f"no {RETRY_AFTER_KEY} on {error.code()}"
    status = rpc_status.from_call(error)
    assert status is not None, "no grpc-status-details-bin"
    retry, failure = error_details_pb2.RetryInfo(), error_details_pb2.QuotaFailure()
    assert [status.details[0].Unpack(retry), status.details[1].Unpack(failure)] == [True, True]
    assert retry.retry_delay.ToMilliseconds() == int(values[0])
    [violation] = failure.violations
    assert (violation.subject, violation.quota_id, violation.quota_value) == ("user", quota_id, limit)
    assert violation.description == error.details()
    return int(values[0]) / 1000


async def test_an_unanswered_turn_gives_its_message_back(start_service):
    # A duplicate message (already answered) or one history could not store: BeginTurn counted it, the
    # gateway then ends the turn unanswered, and the user has that message back.
    stub = (await start_service(quota_messages_per_minute=2)).stub
    session_id = (await open_session(stub)).session_id
    assert (await begin(stub, session_id, "t1")).quota.messages_remaining == 1
    unanswered = session_pb2.EndTurnRequest(session_id=session_id, turn_id="t1", unanswered=True)
    await stub.EndTurn(unanswered, timeout=CALL_TIMEOUT)
    await stub.EndTurn(unanswered, timeout=CALL_TIMEOUT)  # repeated: given back once
    assert (await begin(stub, session_id, "t2")).quota.messages_remaining == 1
    await end_turn(stub, session_id, "t2")  # answered: stays counted
    assert (await begin(stub, session_id, "t3")).quota.messages_remaining == 0
    await end_turn(stub, session_id, "t3")
    await expect_status(grpc.StatusCode.RESOURCE_EXHAUSTED, begin(stub, session_id, "t4"))


async def test_begin_turn_reports_what_is_left(start_service):
    stub = (await start_service(quota_messages_per_minute=3, quota_tokens_per_day=1000)).stub
    session_id = (await open_session(stub)).session_id

    reply = await begin(stub, session_id, "t1")
    assert (reply.quota.messages_remaining, reply.quota.tokens_remaining) == (2, 1000)
    # A retry of the running turn is the same message: nothing more is counted.
    reply = await begin(stub, session_id, "t1")
    assert (reply.quota.messages_remaining, reply.quota.tokens_remaining) == (2, 1000)

    await end_turn(stub, session_id, "t1", tokens=300)
    reply = await begin(stub, session_id, "t2")
    assert (reply.quota.messages_remaining, reply.quota.tokens_remaining) == (1, 700)


async def test_unlimited_quotas_report_the_largest_values(start_service):
    unlimited = {"quota_messages_per_minute": 0, "quota_tokens_per_day": 0, "quota_audio_seconds_per_day": 0}
    stub = (await start_service(**unlimited)).stub
    session_id = (await open_session(stub)).session_id
    for turn in range(40):  # more than the default 30 per minute
        await end_turn(stub, session_id, f"t{turn - 1}", tokens=10**9, audio_ms=10**9)
        reply = await begin(stub, session_id, f"t{turn}", uses_audio=True)
    quota = reply.quota
    assert (quota.messages_remaining, quota.tokens_remaining, quota.audio_seconds_remaining) == (
        UNLIMITED_MESSAGES,
        UNLIMITED_TOKENS,
        UNLIMITED_AUDIO_SECONDS,
    )


async def test_message_quota_refuses_with_retry_after_and_changes_nothing(start_service):
    stub = (await start_service(quota_messages_per_minute=2)).stub
    first, second = (await open_session(stub)).session_id, (await open_session(stub)).session_id
    await begin(stub, first, "t1")
    await end_turn(stub, first, "t1")
    await begin(stub, second, "t2")
    await end_turn(stub, second, "t2")

    # The quota is the user's, across sessions.
    error = await expect_status(grpc.StatusCode.RESOURCE_EXHAUSTED, begin(stub, first, "t3"))
    assert "message quota" in error.details()
    assert 55 < retry_after_seconds(error, "MessagesPerMinutePerUser", 2) <= 60
    assert (await get_session(stub, first)).active_turn_id == ""
    # A refusal consumed nothing: the next attempt is refused just the same.
    await expect_status(grpc.StatusCode.RESOURCE_EXHAUSTED, begin(stub, second, "t3"))

    # Another user is not affected.
    strangers = (await open_session(stub, user_id=STRANGER)).session_id
    reply = await begin(stub, strangers, "s1", user_id=STRANGER)
    assert reply.quota.messages_remaining == 1


async def test_token_quota_refuses_until_utc_midnight(start_service):
    stub = (await start_service(quota_tokens_per_day=100)).stub
    session_id = (await open_session(stub)).session_id
    await begin(stub, session_id, "t1")
    await end_turn(stub, session_id, "t1", tokens=60)
    reply = await begin(stub, session_id, "t2")
    assert reply.quota.tokens_remaining == 40
    # The turn in flight may overshoot: its size is only known when it ends.
    await end_turn(stub, session_id, "t2", tokens=60)

    error = await expect_status(grpc.StatusCode.RESOURCE_EXHAUSTED, begin(stub, session_id, "t3"))
    assert "token quota" in error.details()
    until_midnight = DAY_SECONDS - time.time() % DAY_SECONDS
    assert retry_after_seconds(error, "TokensPerDayPerUser", 100) == pytest.approx(until_midnight, abs=5)
    assert (await get_session(stub, session_id)).active_turn_id == ""


async def test_end_turn_counts_tokens_once_per_turn(start_service):
    stub = (await start_service(quota_tokens_per_day=100)).stub
    session_id = (await open_session(stub)).session_id
    await begin(stub, session_id, "t1")
    await end_turn(stub, session_id, "t1", tokens=30)
    await end_turn(stub, session_id, "t1", tokens=30)  # a retried EndTurn
    await end_turn(stub, session_id, "never-begun", tokens=30)
    reply = await begin(stub, session_id, "t2")
    assert reply.quota.tokens_remaining == 70


async def test_tokens_of_a_turn_taken_over_still_count(start_service):
    stub = (await start_service(quota_tokens_per_day=100, turn_lease_seconds=0.6)).stub
    session_id = (await open_session(stub)).session_id
    await begin(stub, session_id, "t1", owner="gw-dead")
    await asyncio.sleep(0.7)
    await begin(stub, session_id, "t2")

    # The slow owner of t1 reports at last: its tokens count, and t2 keeps running.
    await end_turn(stub, session_id, "t1", tokens=25)
    session = await get_session(stub, session_id)
    assert (session.active_turn_id, session.active_turn_owner) == ("t2", "gw-1")
    await end_turn(stub, session_id, "t2", tokens=25)
    reply = await begin(stub, session_id, "t3")
    assert reply.quota.tokens_remaining == 50


# -- the daily audio quota


async def test_audio_seconds_left_are_reported_rounded_up(start_service):
    stub = (await start_service(quota_audio_seconds_per_day=10)).stub
    session_id = (await open_session(stub)).session_id
    assert (await begin(stub, session_id, "t1")).quota.audio_seconds_remaining == 10
    await end_turn(stub, session_id, "t1", audio_ms=1500)
    # 8.5 s left reads 9: it reads 0 only once audio turns are refused.
    assert (await begin(stub, session_id, "t2", uses_audio=True)).quota.audio_seconds_remaining == 9
    await end_turn(stub, session_id, "t2", audio_ms=8499)
    assert (await begin(stub, session_id, "t3", uses_audio=True)).quota.audio_seconds_remaining == 1


async def test_end_turn_counts_audio_once_per_turn(start_service):
    stub = (await start_service(quota_audio_seconds_per_day=100)).stub
    session_id = (await open_session(stub)).session_id
    await begin(stub, session_id, "t1", uses_audio=True)
    await end_turn(stub, session_id, "t1", tokens=5, audio_ms=30_000)
    await end_turn(stub, session_id, "t1", audio_ms=30_000)  # a retried EndTurn
    await end_turn(stub, session_id, "never-begun", audio_ms=30_000)
    reply = await begin(stub, session_id, "t2")
    assert (reply.quota.audio_seconds_remaining, reply.quota.tokens_remaining) == (70, 1_000_000 - 5)


async def test_audio_quota_refuses_audio_turns_until_utc_midnight_but_never_text_turns(start_service):
    stub = (await start_service(quota_audio_seconds_per_day=60, quota_messages_per_minute=10)).stub
    session_id = (await open_session(stub)).session_id
    await begin(stub, session_id, "t1", uses_audio=True)
    # The turn in flight may overshoot: its length is only known when it ends.
    await end_turn(stub, session_id, "t1", audio_ms=75_000)

    error = await expect_status(grpc.StatusCode.RESOURCE_EXHAUSTED, begin(stub, session_id, "t2", uses_audio=True))
    assert "audio quota" in error.details()
    until_midnight = DAY_SECONDS - time.time() % DAY_SECONDS
    assert retry_after_seconds(error, "AudioSecondsPerDayPerUser", 60) == pytest.approx(until_midnight, abs=5)
    assert (await get_session(stub, session_id)).active_turn_id == ""

    # The refusal counted no message; a text turn goes on, and says no audio is left.
    reply = await begin(stub, session_id, "t2")
    assert (reply.quota.messages_remaining, reply.quota.audio_seconds_remaining) == (8, 0)
    assert (await get_session(stub, session_id)).active_turn_id == "t2"


async def test_the_audio_quota_is_the_users_across_sessions(start_service):
    stub = (await start_service(quota_audio_seconds_per_day=60)).stub
    first, second = (await open_session(stub)).session_id, (await open_session(stub)).session_id
    await begin(stub, first, "t1", uses_audio=True)
    await end_turn(stub, first, "t1", audio_ms=60_000)
    await expect_status(grpc.StatusCode.RESOURCE_EXHAUSTED, begin(stub, second, "t2", uses_audio=True))

    strangers = (await open_session(stub, user_id=STRANGER)).session_id
    reply = await begin(stub, strangers, "s1", user_id=STRANGER, uses_audio=True)
    assert reply.quota.audio_seconds_remaining == 60


async def test_a_retried_audio_turn_is_not_refused_by_audio_used_meanwhile(start_service):
    stub = (await start_service(quota_audio_seconds_per_day=60)).stub
    voice, other = (await open_session(stub)).session_id, (await open_session(stub)).session_id
    await begin(stub, voice, "t1", uses_audio=True)
    await begin(stub, other, "t2", uses_audio=True)
    await end_turn(stub, other, "t2", audio_ms=60_000)
    # t1 already runs: beginning it again renews it and counts nothing, so no quota can refuse it.
    reply = await begin(stub, voice, "t1", uses_audio=True)
    assert reply.quota.audio_seconds_remaining == 0
    assert (await get_session(stub, voice)).active_turn_id == "t1"


async def test_the_token_quota_refuses_audio_turns_too(start_service):
    stub = (await start_service(quota_tokens_per_day=10, quota_audio_seconds_per_day=60)).stub
    session_id = (await open_session(stub)).session_id
    await begin(stub, session_id, "t1")
    await end_turn(stub, session_id, "t1", tokens=10)
    error = await expect_status(grpc.StatusCode.RESOURCE_EXHAUSTED, begin(stub, session_id, "t2", uses_audio=True))
    assert "token quota" in error.details()


async def largest_counts_in_two_turns(stub, user_id: str) -> str:
    """Two turns of one user end with the largest counts the wire carries, the second one adding to the
    first's (both begun before either ends). Returns a third session of the user."""
    sessions = [(await open_session(stub, user_id=user_id)).session_id for _ in range(3)]
    for turn, session_id in enumerate(sessions[:2]):
        await begin(stub, session_id, f"t{turn}", user_id=user_id)
    for turn, session_id in enumerate(sessions[:2]):
        await end_turn(stub, session_id, f"t{turn}", tokens=2**64 - 1, audio_ms=2**64 - 1)
    return sessions[2]


async def test_the_largest_counts_exhaust_the_daily_quotas_and_never_wrap(start_service):
    # More than any store's numbers can add up to: it must exhaust a quota, never wrap around and lift it.
    stub = (await start_service(quota_tokens_per_day=100)).stub
    session_id = await largest_counts_in_two_turns(stub, OWNER)
    error = await expect_status(grpc.StatusCode.RESOURCE_EXHAUSTED, begin(stub, session_id, "t"))
    assert "token quota" in error.details()

    stub = (await start_service(quota_tokens_per_day=0, quota_audio_seconds_per_day=60)).stub
    session_id = await largest_counts_in_two_turns(stub, STRANGER)
    error = await expect_status(
        grpc.StatusCode.RESOURCE_EXHAUSTED, begin(stub, session_id, "t", user_id=STRANGER, uses_audio=True)
    )
    assert "audio quota" in error.details()
    assert (await begin(stub, session_id, "t", user_id=STRANGER)).quota.audio_seconds_remaining == 0


async def test_an_ended_turn_cannot_begin_again(stub):
    session_id = (await open_session(stub)).session_id
    await begin(stub, session_id, "t1")
    await end_turn(stub, session_id, "t1")
    error = await expect_status(grpc.StatusCode.FAILED_PRECONDITION, begin(stub, session_id, "t1"))
    assert "already ended" in error.details()
    assert (await get_session(stub, session_id)).active_turn_id == ""


async def test_persona_and_turn_owner_are_reported(stub):
    session = await open_session(stub, persona="pirate", conversation_id="c1")
    assert session.persona == "pirate"
    await begin(stub, session.session_id, "t1", owner="gateway-7")
    session = await get_session(stub, session.session_id)
    assert (session.active_turn_id, session.active_turn_owner) == ("t1", "gateway-7")

    reply = await stub.OpenSession(
        session_pb2.OpenSessionRequest(user_id=OWNER, session_id=session.session_id, persona="poet"),
        timeout=CALL_TIMEOUT,
    )
    assert reply.session.persona == "poet" and reply.session.conversation_id == "c1"

    await end_turn(stub, session.session_id, "t1")
    session = await get_session(stub, session.session_id)
    assert (session.active_turn_id, session.active_turn_owner) == ("", "")
