"""Opaque page tokens: urlsafe base64 of a small JSON array tagged with what it pages over.

Clients must treat tokens as opaque; the tag makes a token from one list useless for another, and anything
that does not decode to the expected shape is InvalidArgument rather than a crash.
"""

import base64
import binascii
import hashlib
import json
from datetime import datetime

from duplex.common.errors import InvalidArgument
from history_service.domain import ConversationCursor
from history_service.repository import canonical_id

CONVERSATIONS_TAG = "c"
MESSAGES_TAG = "m"
# Newest-first message pages have their own tag: a cursor means "older than" there, not "newer than".
NEWEST_MESSAGES_TAG = "mn"
SEARCH_TAG = "s"
# Cursors and offsets are SQL BIGINTs: a forged larger one would overflow the driver (an INTERNAL error).
MAX_POSITION = 2**63 - 1


def encode_conversation_token(cursor: ConversationCursor) -> str:
    return _encode([CONVERSATIONS_TAG, cursor.updated_at.isoformat(timespec="microseconds"), cursor.conversation_id])


def decode_conversation_token(token: str) -> ConversationCursor | None:
    """None for the first page (empty token)."""
    if not token:
        return None
    fields = _decode(token, CONVERSATIONS_TAG, field_count=2)
    updated_at_text, conversation_id = fields
    if not isinstance(updated_at_text, str) or not isinstance(conversation_id, str):
        raise _invalid()
    try:
        updated_at = datetime.fromisoformat(updated_at_text)
    except ValueError:
        raise _invalid() from None
    if updated_at.tzinfo is None or canonical_id(conversation_id) != conversation_id:
        raise _invalid()
    return ConversationCursor(updated_at, conversation_id)


def encode_message_token(after_pk: int, *, newest_first: bool = False) -> str:
    return _encode([_message_tag(newest_first), after_pk])


def decode_message_token(token: str, *, newest_first: bool = False) -> int | None:
    """None for the first page (empty token); a token issued for the other direction is invalid."""
    if not token:
        return None
    (after_pk,) = _decode(token, _message_tag(newest_first), field_count=1)
    if not _is_position(after_pk):
        raise _invalid()
    return after_pk


def _message_tag(newest_first: bool) -> str:
    return NEWEST_MESSAGES_TAG if newest_first else MESSAGES_TAG


def encode_search_token(offset: int, query: str) -> str:
    return _encode([SEARCH_TAG, offset, _fingerprint(query)])


def decode_search_token(token: str, query: str) -> int:
    """The offset to continue from (0 for the first page); a token from another query is invalid."""
    if not token:
        return 0
    offset, fingerprint = _decode(token, SEARCH_TAG, field_count=2)
    if not _is_position(offset) or fingerprint != _fingerprint(query):
        raise _invalid()
    return offset


def _is_position(value: object) -> bool:
    # bool is an int in Python; a real position is never one.
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_POSITION


def _fingerprint(query: str) -> str:
    # Short: it only has to tell queries apart, not keep them secret.
    return hashlib.sha256(query.encode()).hexdigest()[:12]


def _encode(payload: list) -> str:
    raw = json.dumps(payload, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode(token: str, tag: str, field_count: int) -> list:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        payload = json.loads(raw)
    except (binascii.Error, ValueError):
        raise _invalid() from None
    if not isinstance(payload, list) or len(payload) != field_count + 1 or payload[0] != tag:
        raise _invalid()
    return payload[1:]


def _invalid() -> InvalidArgument:
    return InvalidArgument("invalid page_token")
