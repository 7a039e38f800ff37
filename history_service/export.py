"""A conversation rendered for people (Markdown transcript) or programs (JSON document)."""

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from history_service.domain import Conversation, Message, MessageStatus, Role

ROLE_HEADINGS = {Role.SYSTEM: "System", Role.USER: "User", Role.ASSISTANT: "Assistant", Role.TOOL: "Tool"}
MAX_SLUG_CHARS = 48


@dataclass(frozen=True, slots=True)
class Export:
    content: str
    content_type: str
    filename: str


def export_json(conversation: Conversation, messages: list[Message]) -> Export:
    document = {
        "conversation": {
            "id": conversation.id,
            "title": conversation.title,
            "created_at": iso(conversation.created_at),
            "updated_at": iso(conversation.updated_at),
            "message_count": len(messages),
        },
        "messages": [message_document(message) for message in messages],
    }
    content = json.dumps(document, ensure_ascii=False, indent=2) + "\n"
    return Export(content, "application/json", filename(conversation, "json"))


def message_document(message: Message) -> dict[str, Any]:
    return {
        "id": message.id,
        "role": message.role.value,
        "content": message.content,
        "status": message.status.value,
        "created_at": iso(message.created_at),
        "model": message.model,
        "prompt_tokens": message.prompt_tokens,
        "completion_tokens": message.completion_tokens,
        "client_message_id": message.client_message_id,
        "parent_message_id": message.parent_message_id,
        "tool_calls": tool_calls(message),
        "tool_call_id": message.tool_call_id or None,
        "tool_name": message.tool_name or None,
    }


def export_markdown(conversation: Conversation, messages: list[Message]) -> Export:
    header = [
        f"# {conversation.title}",
        "",
        f"Conversation `{conversation.id}`, created {readable(conversation.created_at)}, {len(messages)} messages.",
    ]
    sections = [markdown_message(message) for message in messages]
    content = "\n\n---\n\n".join(["\n".join(header), *sections]) + "\n"
    return Export(content, "text/markdown", filename(conversation, "md"))


def markdown_message(message: Message) -> str:
    lines = [f"### {heading(message)} · {readable(message.created_at)}", ""]
    if message.role is Role.TOOL:
        lines.append(fenced(message.content, "json"))
    elif message.content:
        lines.append(message.content)
    for call in tool_calls(message):
        arguments = call.get("arguments", "")
        arguments_text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
        lines += ["", f"> Called tool `{call.get('name', '?')}` with `{arguments_text}`"]
    return "\n".join(lines)


def heading(message: Message) -> str:
    text = ROLE_HEADINGS[message.role]
    if message.role is Role.ASSISTANT and message.model:
        text += f" ({message.model})"
    if message.role is Role.TOOL and message.tool_name:
        text += f" `{message.tool_name}`"
    if message.status is not MessageStatus.COMPLETE:
        text += f" [{message.status.value}]"
    return text


def tool_calls(message: Message) -> list[dict[str, Any]]:
    """The stored tool calls; validated as a JSON array of objects when they were appended."""
    if not message.tool_calls_json:
        return []
    return [call for call in json.loads(message.tool_calls_json) if isinstance(call, dict)]


def fenced(text: str, language: str) -> str:
    # A fence longer than any backtick run inside, so the content cannot close it early.
    longest_run = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest_run + 1)
    return f"{fence}{language}\n{text}\n{fence}"


def filename(conversation: Conversation, extension: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", conversation.title.lower()).strip("-")[:MAX_SLUG_CHARS].strip("-")
    return f"{slug or 'conversation'}-{conversation.id[:8]}.{extension}"


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def readable(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
