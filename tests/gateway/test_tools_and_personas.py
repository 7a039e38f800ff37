"""The built-in tools, the conversation context given to the model, and personas."""

import json

import pytest

from duplex.common.errors import InvalidArgument
from duplex.llm.v1 import llm_pb2
from gateway import personas
from gateway.context import _well_formed
from gateway.tools import ToolContext, ToolError, ToolRegistry, builtin_tools, evaluate


@pytest.mark.parametrize(
    ("expression", "expected"),
    [("1+2*3", 7), ("12*(3+4)", 84), ("2^10", 1024), ("-3 + +4", 1), ("7 // 2", 3), ("7 % 4", 3),
     ("sqrt(16) + abs(-2)", 6.0), ("max(1, 5, 3)", 5), ("round(pi, 2)", 3.14), ("1.5e3 / 3", 500.0)],
)
def test_calculator_evaluates_arithmetic(expression, expected):
    assert evaluate(expression) == pytest.approx(expected)


@pytest.mark.parametrize(
    "expression",
    ["__import__('os').system('true')", "open('/etc/passwd')", "x + 1", "1 +", "2 ** 100000", "1/0",
     "(lambda: 1)()", "[1, 2]", "'a' * 3", "sqrt(-1)", "1" * 300],
)
def test_calculator_refuses_anything_but_arithmetic(expression):
    with pytest.raises(ToolError):
        evaluate(expression)


async def test_registry_turns_failures_into_results_the_model_can_read():
    registry = ToolRegistry(builtin_tools(), timeout_seconds=2)
    context = ToolContext(user_id="u", history=None)
    result, is_error = await registry.run("calculator", '{"expression": "6*7"}', context)
    assert (json.loads(result), is_error) == ({"expression": "6*7", "result": 42}, False)
    for name, arguments in [("calculator", "not json"), ("calculator", "[1]"), ("calculator", "{}"),
                            ("no_such_tool", "{}"), ("current_time", '{"timezone": "Mars/Olympus"}')]:
        result, is_error = await registry.run(name, arguments, context)
        assert is_error and "error" in json.loads(result)
    result, is_error = await registry.run("current_time", '{"timezone": "Europe/Paris"}', context)
    assert not is_error and json.loads(result)["iso"].endswith(("+01:00", "+02:00"))
    names = [d.name for d in registry.definitions()]
    assert names == ["current_time", "calculator", "search_history"]
    assert all(json.loads(d.parameters_json_schema)["type"] == "object" for d in registry.definitions())


def _assistant_calls(*ids):
    calls = [llm_pb2.ToolCall(id=i, name="calculator", arguments_json="{}") for i in ids]
    return llm_pb2.Message(role=llm_pb2.ROLE_ASSISTANT, content="", tool_calls=calls)


def _tool(call_id):
    return llm_pb2.Message(role=llm_pb2.ROLE_TOOL, content="{}", tool_call_id=call_id, name="calculator")


def _user(text):
    return llm_pb2.Message(role=llm_pb2.ROLE_USER, content=text)


def test_context_keeps_whole_tool_rounds_and_drops_broken_ones():
    whole = [_user("a"), _assistant_calls("1", "2"), _tool("1"), _tool("2"), _user("b")]
    assert _well_formed(whole) == whole
    cut_by_window = [_tool("2"), _user("b")]
    assert _well_formed(cut_by_window) == [_user("b")]
    cancelled_during_tools = [_user("a"), _assistant_calls("1", "2"), _tool("1"), _user("b")]
    assert _well_formed(cancelled_during_tools) == [_user("a"), _user("b")]


def test_personas_pick_the_system_prompt():
    default = "default prompt"
    assert personas.system_prompt("", "", default, "hi") == default
    assert personas.system_prompt("casual", "", default, "x") == personas.PERSONAS["casual"]
    assert personas.system_prompt("casual", "explicit wins", default, "x") == "explicit wins"
    assert personas.route("I want to practice my English") == "english-tutor"
    assert personas.route("Compare 3 databases for me") == "analytical"
    assert personas.route("hey there") == "casual"
    assert personas.route("Write a poem about autumn") == "assistant"
    assert personas.system_prompt("auto", "", default, "hello!") == personas.PERSONAS["casual"]
    personas.validate_persona("auto")
    with pytest.raises(InvalidArgument):
        personas.validate_persona("pirate")
