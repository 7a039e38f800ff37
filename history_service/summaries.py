"""The summarize_session job: llm_service writes a short summary of a finished session's conversation."""

import logging
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from duplex.common.errors import NotFound
from duplex.llm.v1 import llm_pb2, llm_pb2_grpc
from history_service.domain import Message, Role, SessionRecordStatus
from history_service.repository import HistoryRepository
from history_service.sessions import SessionRecords

log = logging.getLogger(__name__)

# llm_service's local demo model recognises a system prompt starting with "Summarize".
SUMMARY_INSTRUCTION = "Summarize this conversation in two sentences."
# The most recent part of a long conversation, so the prompt fits any model's context.
TRANSCRIPT_BUDGET_CHARS = 24_000
LLM_ROLES = {Role.USER: llm_pb2.ROLE_USER, Role.ASSISTANT: llm_pb2.ROLE_ASSISTANT}


def recent_transcript(messages: list[Message], budget_chars: int = TRANSCRIPT_BUDGET_CHARS) -> list[llm_pb2.Message]:
    """The user and assistant messages with text, the newest that fit in the budget, oldest first."""
    kept: list[llm_pb2.Message] = []
    remaining = budget_chars
    for message in reversed(messages):
        if remaining <= 0:
            break
        if message.role not in LLM_ROLES or not message.content.strip():
            continue
        content = message.content[:remaining]
        kept.append(llm_pb2.Message(role=LLM_ROLES[message.role], content=content))
        remaining -= len(content)
    return kept[::-1]


class SessionSummarizer:
    """The handler of summarize_session jobs (payload: {"session_id": ...}); idempotent."""

    def __init__(
        self,
        records: SessionRecords,
        repository: HistoryRepository,
        llm: llm_pb2_grpc.LlmServiceStub,
        *,
        model: str = "",
        timeout: float | None = None,
    ):
        self._records = records
        self._repository = repository
        self._llm = llm
        self._model = model
        self._timeout = timeout

    async def run(self, payload: dict[str, Any]) -> None:
        record = await self._records.get(payload["session_id"])
        if record is None or record.status is not SessionRecordStatus.PENDING:
            return  # its conversation was deleted, or an earlier run already finished it
        try:
            _, messages = await self._repository.conversation_with_messages(record.user_id, record.conversation_id)
        except NotFound:
            return
        transcript = recent_transcript(messages)
        summary = await self._summarize(transcript) if transcript else ""
        await self._records.write_summary(record.session_id, summary)
        log.info("session %s summarized (%d characters)", record.session_id, len(summary))

    async def give_up(self, session: AsyncSession, payload: dict[str, Any]) -> None:
        await self._records.mark_failed(session, payload["session_id"])

    async def _summarize(self, transcript: list[llm_pb2.Message]) -> str:
        instruction = llm_pb2.Message(role=llm_pb2.ROLE_SYSTEM, content=SUMMARY_INSTRUCTION)
        request = llm_pb2.GenerateRequest(model=self._model, messages=[instruction, *transcript])
        call = self._llm.Generate(request, timeout=self._timeout)
        chunks = [response.chunk.text async for response in call if response.HasField("chunk")]
        return "".join(chunks).strip()
