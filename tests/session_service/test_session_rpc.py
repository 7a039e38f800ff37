"""SessionService's rules, exercised through the real server and a real grpc.aio channel."""

import asyncio

import grpc
import pytest

from duplex.session.v1 import session_pb2
from session_service.store import MAX_REMEMBERED_TURNS
from tests.session_service.rpc_helpers import (
    CALL_TIMEOUT,
    OWNER,
    STRANGER,
    append,
    begin_turn,
    end_turn,
    expect_status,
    get_session,
    log_event,
    open_session,
    read_batches,
    read_request,
    read_seqs,
    update_session,
)

# -- OpenSession / GetSession / CloseSession


async def test_open_creates_a_new_session(stub):
    reply = await stub.OpenSession(
        session_pb2.OpenSessionRequest(user_id=OWNER, conversation_id="c1", model="m1", system_prompt="be brief"),
        timeout=CALL_TIMEOUT,
    )
    session = reply.session
    assert reply.resumed is False
    assert len(session.session_id) == 32 and int(session.session_id, 16) >= 0
    assert (session.user_id, session.conversation_id, session.model, session.system_prompt) == (
        OWNER,
        "c1",
        "m1",
        "be brief",
    )
    assert session.last_seq == 0 and session.active_turn_id == ""
    assert session.created_at.seconds > 0
    ttl = session.expires_at.ToNanoseconds() - session.created_at.ToNanoseconds()
    assert ttl == pytest.approx(60e9, abs=1e9)


async def test_each_open_without_session_id_creates_a_distinct_session(stub):
    first, second = await open_session(stub), await open_session(stub)
    assert first.session_id != second.session_id


async def test_open_requires_user_id(stub):
    error = await expect_status(grpc.StatusCode.INVALID_ARGUMENT, stub.OpenSession(session_pb2.OpenSessionRequest()))
    assert "user_id" in error.details()


async def test_reopen_resumes_and_applies_non_empty_settings(stub):
    created = await open_session(stub, conversation_id="c1", model="m1", system_prompt="p1")
    await begin_turn(stub, created.session_id)
    await append(stub, created.session_id, [1, 2])

    reply = await stub.OpenSession(
        session_pb2.OpenSessionRequest(user_id=OWNER, session_id=created.session_id, model="m2"),
        timeout=CALL_TIMEOUT,
    )
    session = reply.session
    assert reply.resumed is True
    assert session.session_id == created.session_id
    assert (session.model, session.system_prompt, session.conversation_id) == ("m2", "p1", "c1")
    assert session.last_seq == 2 and session.active_turn_id == "t1"
    assert session.created_at == created.created_at
    assert session.expires_at.ToNanoseconds() >= created.expires_at.ToNanoseconds()


def stranger_calls(stub, session_id: str) -> list:
    """Every user-scoped call, by a user who does not own session_id. Returned unstarted (grpc.aio starts a
    call as soon as it is created), so each one's answer is checked on its own."""
    return [
        lambda: stub.OpenSession(session_pb2.OpenSessionRequest(user_id=STRANGER, session_id=session_id)),
        lambda: stub.GetSession(session_pb2.GetSessionRequest(user_id=STRANGER, session_id=session_id)),
        lambda: begin_turn(stub, session_id, "x", user_id=STRANGER),
        lambda: stub.CloseSession(session_pb2.CloseSessionRequest(user_id=STRANGER, session_id=session_id)),
        lambda: read_batches(stub, read_request(session_id, user_id=STRANGER)),
        lambda: update_session(stub, session_id, b"voice", user_id=STRANGER),
    ]


async def test_sessions_of_other_users_and_unknown_sessions_are_not_found(stub):
    mine = (await open_session(stub)).session_id
    for session_id in (mine, "0" * 32):
        # The stranger gets exactly what an unknown id gets: existence never leaks.
        for call in stranger_calls(stub, session_id):
            await expect_status(grpc.StatusCode.NOT_FOUND, call())
    await expect_status(grpc.StatusCode.NOT_FOUND, append(stub, "0" * 32, [1]))

    # Nothing the stranger tried touched the owner's session.
    session = await get_session(stub, mine)
    assert session.active_turn_id == "" and session.user_id == OWNER and session.voice_options == b""


async def test_get_session_reports_log_and_turn_state(stub):
    session_id = (await open_session(stub)).session_id
    await begin_turn(stub, session_id, "t1")
    await append(stub, session_id, [1, 2, 3])
    session = await get_session(stub, session_id)
    assert (session.last_seq, session.active_turn_id) == (3, "t1")

    await end_turn(stub, session_id, "t1")
    session = await get_session(stub, session_id)
    assert (session.last_seq, session.active_turn_id) == (3, "")


async def test_close_session_removes_it_and_its_log(stub):
    session_id = (await open_session(stub)).session_id
    await append(stub, session_id, [1])
    await stub.CloseSession(session_pb2.CloseSessionRequest(user_id=OWNER, session_id=session_id))

    await expect_status(grpc.StatusCode.NOT_FOUND, get_session(stub, session_id))
    await expect_status(grpc.StatusCode.NOT_FOUND, read_batches(stub, read_request(session_id)))
    await expect_status(grpc.StatusCode.NOT_FOUND, append(stub, session_id, [2]))
    await expect_status(grpc.StatusCode.NOT_FOUND, open_session(stub, session_id=session_id))


# -- turns


async def test_begin_turn_conflicts_while_another_turn_runs(stub):
    session_id = (await open_session(stub)).session_id
    await append(stub, session_id, [1, 2], turn_id="t0")
    assert await begin_turn(stub, session_id, "t1") == 2
    # The same turn again is a retry, not a conflict.
    assert await begin_turn(stub, session_id, "t1") == 2

    error = await expect_status(grpc.StatusCode.FAILED_PRECONDITION, begin_turn(stub, session_id, "t2"))
    assert "a turn is already running" in error.details()

    # Ending some other turn changes nothing, and is no error.
    await end_turn(stub, session_id, "t2")
    await expect_status(grpc.StatusCode.FAILED_PRECONDITION, begin_turn(stub, session_id, "t2"))

    await end_turn(stub, session_id, "t1")
    await end_turn(stub, session_id, "t1")  # idempotent
    assert await begin_turn(stub, session_id, "t2") == 2


async def test_a_long_lived_session_remembers_only_its_newest_turns(start_service):
    stub = (await start_service(quota_messages_per_minute=0, quota_tokens_per_day=1_000_000)).stub
    session_id = (await open_session(stub)).session_id
    ended = [f"t{i}" for i in range(MAX_REMEMBERED_TURNS + 4)]
    for turn_id in ended:
        await begin_turn(stub, session_id, turn_id)
        await end_turn(stub, session_id, turn_id, tokens=1)
    begun = await stub.BeginTurn(session_pb2.BeginTurnRequest(user_id=OWNER, session_id=session_id, turn_id="now"))
    assert begun.quota.tokens_remaining == 1_000_000 - len(ended)
    # Remembered: the running turn and the newest ended ones (t5 on); forgotten: t0..t4.

    await end_turn(stub, session_id, ended[-1], tokens=50)  # a repeated EndTurn of a recent turn counts nothing
    await end_turn(stub, session_id, ended[0], tokens=50)  # a forgotten turn counts nothing either
    await end_turn(stub, session_id, "now", tokens=10)  # the running turn counts, once
    await end_turn(stub, session_id, "now", tokens=10)
    for recent in (ended[-1], ended[5]):
        error = await expect_status(grpc.StatusCode.FAILED_PRECONDITION, begin_turn(stub, session_id, recent))
        assert "already ended" in error.details()
    await expect_status(grpc.StatusCode.FAILED_PRECONDITION, begin_turn(stub, session_id, "now"))

    # The price of the bound: a turn ended that long ago could begin again (turn ids are never reused).
    again = await stub.BeginTurn(session_pb2.BeginTurnRequest(user_id=OWNER, session_id=session_id, turn_id="t4"))
    assert again.quota.tokens_remaining == 1_000_000 - len(ended) - 10


async def test_end_turn_of_a_missing_session_is_not_an_error(stub):
    await end_turn(stub, "0" * 32, "t1")


async def test_begin_turn_requires_turn_id(stub):
    session_id = (await open_session(stub)).session_id
    await expect_status(grpc.StatusCode.INVALID_ARGUMENT, begin_turn(stub, session_id, ""))


async def test_a_turn_whose_lease_expired_is_taken_over(start_service):
    # Long enough that a loaded machine still checks t2 well within its lease.
    stub = (await start_service(turn_lease_seconds=0.6)).stub
    session_id = (await open_session(stub)).session_id
    await begin_turn(stub, session_id, "t1")
    await expect_status(grpc.StatusCode.FAILED_PRECONDITION, begin_turn(stub, session_id, "t2"))

    await asyncio.sleep(0.7)
    assert (await get_session(stub, session_id)).active_turn_id == ""
    taken = await stub.BeginTurn(session_pb2.BeginTurnRequest(user_id=OWNER, session_id=session_id, turn_id="t2"))
    assert taken.taken_over_turn_id == "t1"  # so the caller can end t1 in the log
    assert (await get_session(stub, session_id)).active_turn_id == "t2"
    await end_turn(stub, session_id, "t2")
    again = await stub.BeginTurn(session_pb2.BeginTurnRequest(user_id=OWNER, session_id=session_id, turn_id="t3"))
    assert again.taken_over_turn_id == ""  # t2 ended properly


async def test_appending_renews_the_turn_lease(start_service):
    stub = (await start_service(turn_lease_seconds=0.6)).stub
    session_id = (await open_session(stub)).session_id
    await begin_turn(stub, session_id, "t1")
    for seq in (1, 2, 3):
        await asyncio.sleep(0.25)
        await append(stub, session_id, [seq])
    # 0.75 s after BeginTurn, but only moments after the last append.
    await expect_status(grpc.StatusCode.FAILED_PRECONDITION, begin_turn(stub, session_id, "t2"))


# -- AppendEvents


async def test_append_requires_contiguous_seqs(stub):
    session_id = (await open_session(stub)).session_id

    error = await expect_status(grpc.StatusCode.ABORTED, append(stub, session_id, [2]))
    assert "expected seq 1" in error.details() and "got 2" in error.details()
    error = await expect_status(grpc.StatusCode.ABORTED, append(stub, session_id, [1, 3]))
    assert "expected seq 2" in error.details() and "got 3" in error.details()
    await expect_status(grpc.StatusCode.ABORTED, append(stub, session_id, []))
    # A rejected batch is rejected whole.
    assert (await get_session(stub, session_id)).last_seq == 0

    assert await append(stub, session_id, [1, 2]) == 2
    error = await expect_status(grpc.StatusCode.ABORTED, append(stub, session_id, [4]))
    assert "expected seq 3" in error.details()
    assert await append(stub, session_id, [3]) == 3


async def test_an_append_sent_again_after_it_landed_is_taken_once(stub):
    # An append whose answer was lost (a timeout, a cancelled call) is sent again: the events the log
    # already holds are skipped, never stored twice, and never refused as a gap.
    session_id = (await open_session(stub)).session_id
    assert await append(stub, session_id, [1, 2]) == 2
    assert await append(stub, session_id, [1, 2]) == 2
    assert await append(stub, session_id, [2, 3, 4]) == 4
    events = [event for batch in await read_batches(stub, read_request(session_id)) for event in batch]
    assert [(event.seq, event.payload) for event in events] == [(seq, log_event(seq).payload) for seq in range(1, 5)]

    # A different event under a seq the log holds is not a retry: refused like a gap, nothing changes.
    other = session_pb2.LogEvent(seq=4, turn_id="t1", payload=b"something else")
    refused = stub.AppendEvents(session_pb2.AppendEventsRequest(session_id=session_id, events=[other]))
    error = await expect_status(grpc.StatusCode.ABORTED, refused)
    assert "expected seq 5" in error.details()
    other_turn = stub.AppendEvents(session_pb2.AppendEventsRequest(session_id=session_id, events=[log_event(4, "t2")]))
    await expect_status(grpc.StatusCode.ABORTED, other_turn)
    assert (await get_session(stub, session_id)).last_seq == 4


# -- ReadEvents


async def test_read_without_follow_delivers_the_log_and_ends(stub):
    session_id = (await open_session(stub)).session_id
    await begin_turn(stub, session_id, "t1")
    await stub.AppendEvents(
        session_pb2.AppendEventsRequest(
            session_id=session_id, events=[log_event(1), log_event(2), log_event(3, terminal=True)]
        )
    )
    # Ends although a turn is running: without follow it only delivers what is there.
    events = [event for batch in await read_batches(stub, read_request(session_id, 1)) for event in batch]
    assert events == [log_event(2), log_event(3, terminal=True)]
    assert await read_seqs(stub, read_request(session_id, 3)) == []


async def test_read_delivers_batches_of_at_most_500_events(stub):
    session_id = (await open_session(stub)).session_id
    await append(stub, session_id, range(1, 1201))
    batches = await read_batches(stub, read_request(session_id))
    assert [len(batch) for batch in batches] == [500, 500, 200]
    assert [event.seq for batch in batches for event in batch] == list(range(1, 1201))


async def test_trimmed_events_are_out_of_range(start_service):
    stub = (await start_service(session_log_max_events=5)).stub
    session_id = (await open_session(stub)).session_id
    await append(stub, session_id, range(1, 6))
    await append(stub, session_id, range(6, 9))  # drops 1..3

    error = await expect_status(grpc.StatusCode.OUT_OF_RANGE, read_batches(stub, read_request(session_id, 0)))
    assert "seq 4" in error.details()
    await expect_status(grpc.StatusCode.OUT_OF_RANGE, read_batches(stub, read_request(session_id, 2)))
    assert await read_seqs(stub, read_request(session_id, 3)) == [4, 5, 6, 7, 8]
    assert (await get_session(stub, session_id)).last_seq == 8


async def test_follower_receives_later_events_once_and_ends_after_end_turn(stub, followers):
    session_id = (await open_session(stub)).session_id
    await begin_turn(stub, session_id, "t1")
    await append(stub, session_id, [1, 2])

    follower = followers(stub, read_request(session_id, 1, follow=True))
    await follower.wait_for_seq(2)
    await follower.assert_still_open()
    await append(stub, session_id, [3])
    await follower.wait_for_seq(3)
    await append(stub, session_id, [4, 5])
    await follower.wait_for_seq(5)
    await follower.assert_still_open()

    await end_turn(stub, session_id, "t1")
    assert await follower.wait_until_ended() == [2, 3, 4, 5]


async def test_follower_misses_and_repeats_nothing_under_concurrent_appends(stub, followers):
    session_id = (await open_session(stub)).session_id
    await begin_turn(stub, session_id, "t1")
    tails = [followers(stub, read_request(session_id, 0, follow=True)) for _ in range(3)]
    for seq in range(1, 201):
        await append(stub, session_id, [seq])
    await end_turn(stub, session_id, "t1")
    for follower in tails:
        assert await follower.wait_until_ended() == list(range(1, 201))


async def test_follow_without_a_running_turn_ends_after_catching_up(stub):
    session_id = (await open_session(stub)).session_id
    await append(stub, session_id, [1, 2])
    assert await read_seqs(stub, read_request(session_id, 0, follow=True)) == [1, 2]


async def test_follower_ahead_of_the_log_gets_only_what_follows_its_cursor(stub, followers):
    # A client may have seen events live that the gateway has not appended yet.
    session_id = (await open_session(stub)).session_id
    await begin_turn(stub, session_id, "t1")
    await append(stub, session_id, [1])
    follower = followers(stub, read_request(session_id, 3, follow=True))
    await follower.assert_still_open()
    await append(stub, session_id, [2, 3, 4])
    await end_turn(stub, session_id, "t1")
    assert await follower.wait_until_ended() == [4]


async def test_close_session_ends_followers(stub, followers):
    session_id = (await open_session(stub)).session_id
    await begin_turn(stub, session_id, "t1")
    await append(stub, session_id, [1])
    follower = followers(stub, read_request(session_id, 0, follow=True))
    await follower.wait_for_seq(1)
    await follower.assert_still_open()

    await stub.CloseSession(session_pb2.CloseSessionRequest(user_id=OWNER, session_id=session_id))
    assert await follower.wait_until_ended() == [1]


async def test_follower_of_a_turn_whose_lease_expires_ends(start_service, followers):
    stub = (await start_service(turn_lease_seconds=0.3)).stub
    session_id = (await open_session(stub)).session_id
    await begin_turn(stub, session_id, "t1")
    follower = followers(stub, read_request(session_id, 0, follow=True))
    await follower.assert_still_open()
    assert await follower.wait_until_ended(timeout=2.0) == []


# -- expiry


async def test_session_expires_after_ttl_of_inactivity(start_service):
    stub = (await start_service(session_ttl_seconds=0.3)).stub
    session_id = (await open_session(stub)).session_id
    await asyncio.sleep(0.5)
    await expect_status(grpc.StatusCode.NOT_FOUND, get_session(stub, session_id))
    await expect_status(grpc.StatusCode.NOT_FOUND, open_session(stub, session_id=session_id))


async def test_using_a_session_keeps_it_alive(start_service):
    stub = (await start_service(session_ttl_seconds=0.8)).stub
    session_id = (await open_session(stub)).session_id
    for seq in (1, 2, 3):
        await asyncio.sleep(0.3)
        await open_session(stub, session_id=session_id)
        await append(stub, session_id, [seq])
    assert (await get_session(stub, session_id)).last_seq == 3


async def test_expiry_ends_followers_without_anyone_touching_the_session(start_service, followers):
    stub = (await start_service(session_ttl_seconds=0.3, turn_lease_seconds=30)).stub
    session_id = (await open_session(stub)).session_id
    await begin_turn(stub, session_id, "t1")
    follower = followers(stub, read_request(session_id, 0, follow=True))
    await follower.assert_still_open()
    # Only the sweeper can end it: the lease is far away and no call touches the session.
    assert await follower.wait_until_ended(timeout=2.0) == []
