"""The generated stubs match the protos, and the public contract keeps the names clients depend on."""

import subprocess
import sys
from pathlib import Path

from duplex.chat.v1 import chat_pb2

ROOT = Path(__file__).resolve().parent.parent


def test_committed_stubs_match_a_fresh_generation():
    result = subprocess.run(
        [sys.executable, "scripts/genproto.py", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_chat_service_has_the_fixed_public_methods():
    service = chat_pb2.DESCRIPTOR.services_by_name["ChatService"]
    methods = {m.name: (m.client_streaming, m.server_streaming) for m in service.methods}
    assert methods == {
        "Chat": (True, True),
        "SendMessage": (False, True),
        "CancelTurn": (False, False),
        "ResumeStream": (False, True),
        "CloseSession": (False, False),
        "SendAudio": (False, False),
        "UpdateSession": (False, False),
    }
    kinds = {f.name for f in chat_pb2.ChatEvent.DESCRIPTOR.oneofs_by_name["kind"].fields}
    assert {"session_opened", "message_accepted", "turn_started", "delta", "tool_call", "tool_result",
            "turn_completed", "turn_cancelled", "error", "pong", "speech_started", "speech_stopped", "transcript",
            "audio", "session_updated"} <= kinds
    requests = {f.name for f in chat_pb2.ChatRequest.DESCRIPTOR.oneofs_by_name["kind"].fields}
    assert requests == {"open", "message", "cancel", "ping", "audio", "commit", "interrupt", "update_session"}
