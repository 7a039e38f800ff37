"""The tools a model may call during a turn. Each runs as the turn's user and sees only that user's data."""

import ast
import asyncio
import json
import logging
import math
import operator
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from duplex.common.errors import DuplexError
from duplex.llm.v1 import llm_pb2
from gateway.clients import HistoryClient

log = logging.getLogger(__name__)


class ToolError(Exception):
    """A failure the model should see (bad arguments, nothing found), not an internal error."""


@dataclass(frozen=True)
class ToolContext:
    user_id: str
    history: HistoryClient


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict
    run: Callable[[ToolContext, dict], Awaitable[dict]]

    def definition(self) -> llm_pb2.ToolDefinition:
        return llm_pb2.ToolDefinition(
            name=self.name, description=self.description, parameters_json_schema=json.dumps(self.parameters)
        )


class ToolRegistry:
    def __init__(self, tools: list[Tool], timeout_seconds: float):
        self._tools = {tool.name: tool for tool in tools}
        self._timeout = timeout_seconds

    def definitions(self) -> list[llm_pb2.ToolDefinition]:
        return [tool.definition() for tool in self._tools.values()]

    async def run(self, name: str, arguments_json: str, context: ToolContext) -> tuple[str, bool]:
        """Run one call; returns (result JSON, is_error). Failures are results the model can read."""
        tool = self._tools.get(name)
        if tool is None:
            return _error(f"unknown tool {name!r}"), True
        try:
            arguments = json.loads(arguments_json or "{}")
            if not isinstance(arguments, dict):
                raise ToolError("arguments must be a JSON object")
            result = await asyncio.wait_for(tool.run(context, arguments), self._timeout)
        except (ToolError, json.JSONDecodeError) as error:
            return _error(str(error)), True
        except TimeoutError:
            return _error(f"{name} took longer than {self._timeout:.0f}s"), True
        except DuplexError as error:
            return _error(error.message), True
        except Exception:
            log.exception("tool %s failed", name)
            return _error(f"{name} failed"), True
        return json.dumps(result, ensure_ascii=False), False


def _error(message: str) -> str:
    return json.dumps({"error": message})


# --- current_time -------------------------------------------------------------------------------------


async def current_time(context: ToolContext, arguments: dict) -> dict:
    zone_name = arguments.get("timezone") or "UTC"
    try:
        zone = ZoneInfo(str(zone_name))
    except (ZoneInfoNotFoundError, ValueError) as error:
        raise ToolError(f"unknown time zone {zone_name!r}") from error
    now = datetime.now(UTC).astimezone(zone)
    return {"iso": now.isoformat(timespec="seconds"), "timezone": str(zone_name), "weekday": now.strftime("%A")}


# --- calculator: a real arithmetic parser over Python's AST, never eval -------------------------------

MAX_EXPRESSION_CHARS = 200
MAX_EXPONENT = 1000
_BINARY = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCTIONS = {
    "sqrt": math.sqrt, "sin": math.sin, "cos": math.cos, "tan": math.tan, "log": math.log,
    "log10": math.log10, "exp": math.exp, "abs": abs, "round": round, "min": min, "max": max,
}
_CONSTANTS = {"pi": math.pi, "e": math.e}


def evaluate(expression: str) -> float | int:
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ToolError(f"expression is longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.replace("^", "**"), mode="eval")
    except SyntaxError as error:
        raise ToolError(f"not an arithmetic expression: {expression!r}") from error
    try:
        return _evaluate(tree.body)
    except ZeroDivisionError as error:
        raise ToolError("division by zero") from error
    except (OverflowError, ValueError) as error:
        raise ToolError(f"cannot compute {expression!r}: {error}") from error


def _evaluate(node: ast.AST) -> float | int:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.Name) and node.id in _CONSTANTS:
        return _CONSTANTS[node.id]
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise ToolError(f"exponents above {MAX_EXPONENT} are not supported")
        return _BINARY[type(node.op)](left, right)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS:
        if node.keywords:
            raise ToolError("functions take positional arguments only")
        return _FUNCTIONS[node.func.id](*(_evaluate(arg) for arg in node.args))
    raise ToolError(f"unsupported element in expression: {ast.unparse(node)!r}")


async def calculator(context: ToolContext, arguments: dict) -> dict:
    expression = str(arguments.get("expression", "")).strip()
    if not expression:
        raise ToolError("expression is required")
    result = evaluate(expression)
    if isinstance(result, float) and result.is_integer() and abs(result) < 1e15:
        result = int(result)
    return {"expression": expression, "result": result}


# --- search_history: the user's own messages only -----------------------------------------------------

MAX_SEARCH_RESULTS = 10


async def search_history(context: ToolContext, arguments: dict) -> dict:
    query = str(arguments.get("query", "")).strip()
    if not query:
        raise ToolError("query is required")
    limit = max(1, min(int(arguments.get("limit", 5) or 5), MAX_SEARCH_RESULTS))
    hits = (await context.history.search_messages(context.user_id, query, limit)).hits
    return {
        "query": query,
        "results": [
            {"conversation": hit.conversation_title, "role": _role_name(hit.message.role), "snippet": hit.snippet,
             "at": hit.message.created_at.ToJsonString()}
            for hit in hits
        ],
    }


def _role_name(role: int) -> str:
    return {1: "system", 2: "user", 3: "assistant", 4: "tool"}.get(role, "unknown")


def builtin_tools() -> list[Tool]:
    return [
        Tool("current_time", "The current date and time, optionally in an IANA time zone.",
             {"type": "object", "properties": {"timezone": {"type": "string", "description": "e.g. Europe/Paris"}}},
             current_time),
        Tool("calculator", "Evaluate an arithmetic expression (+ - * / // % ^, parentheses, sqrt, log, sin, pi…).",
             {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]},
             calculator),
        Tool("search_history", "Search the user's own earlier conversations for messages matching a query.",
             {"type": "object", "properties": {"query": {"type": "string"},
                                               "limit": {"type": "integer", "minimum": 1, "maximum": 10}},
              "required": ["query"]},
             search_history),
    ]
