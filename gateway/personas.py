"""Named system prompts a session can pick, and routing by the first message for the `auto` persona."""

import re

from duplex.common.errors import InvalidArgument

PERSONAS = {
    "assistant": "You are Duplex, a helpful assistant. Answer clearly and concisely.",
    "english-tutor": (
        "You are a friendly English conversation tutor. Keep the conversation going with a question, and when "
        "the learner makes a mistake, gently show the corrected sentence before you reply."
    ),
    "analytical": (
        "You are a careful analyst. Break problems into steps, state assumptions, show your reasoning and "
        "quantify when you can."
    ),
    "casual": "You are a relaxed, friendly companion. Keep replies short, warm and informal.",
}
AUTO = "auto"
_ROUTES = (
    ("english-tutor", re.compile(r"\b(practi[cs]e|learn(ing)?|improve) (my )?english\b|\bgrammar\b|\btutor\b", re.I)),
    ("analytical", re.compile(r"\d|\b(analy[sz]e|compare|calculate|estimate|why|how many|trade-?offs?)\b", re.I)),
    ("casual", re.compile(r"^\s*(hi|hey|hello|yo|sup|good (morning|evening))\b", re.I)),
)


def validate_persona(name: str) -> None:
    if name and name != AUTO and name not in PERSONAS:
        raise InvalidArgument(f"unknown persona {name!r}; choose one of {', '.join([*PERSONAS, AUTO])}")


def route(first_message: str) -> str:
    """The persona `auto` picks for a conversation, from its first user message."""
    for persona, pattern in _ROUTES:
        if pattern.search(first_message):
            return persona
    return "assistant"


def system_prompt(persona: str, explicit_prompt: str, default_prompt: str, first_message: str) -> str:
    """An explicit system prompt wins, then the persona's, then the default."""
    if explicit_prompt:
        return explicit_prompt
    if persona == AUTO:
        persona = route(first_message)
    return PERSONAS.get(persona, default_prompt)
