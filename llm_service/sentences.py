"""Text to speak as it streams in: cut into sentences, and the span of text each piece of audio speaks.

Synthesize speaks sentence by sentence so the first one is heard while the answer is still being
written. A sentence ends at `.`, `!` or `?` (closing quotes or brackets may follow) once whitespace
follows, at a newline, or at a CJK full stop; a run of text without one is cut at a comma or a space
once it passes MAX_SENTENCE_CHARS, so a list or a run-on answer does not wait for its end. Offsets are
Unicode code points of all the text received (Python's str indices).
"""

import bisect
import re
from dataclasses import dataclass

MAX_SENTENCE_CHARS = 200
SENTENCE_END = re.compile(r"[.!?\u2026]+[\"'\u201d\u2019)\]]*(?=\s)|\n|[\u3002\uff01\uff1f]")
CLAUSE_END = re.compile(r"[,;:]\s")
WHITESPACE = re.compile(r"\s")
WORD_END = re.compile(r"\S(?=\s|$)")


@dataclass(frozen=True, slots=True)
class Sentence:
    # The sentence without the whitespace around it, and where it is in all the text: [start, end).
    text: str
    start: int
    end: int


class SentenceSplitter:
    """Feed it the text as it arrives; it hands back each sentence once it is complete."""

    def __init__(self, max_chars: int = MAX_SENTENCE_CHARS):
        self._max_chars = max_chars
        self._pending = ""
        # Where _pending starts in all the text.
        self._offset = 0

    @property
    def received_chars(self) -> int:
        return self._offset + len(self._pending)

    def feed(self, text: str) -> list[Sentence]:
        self._pending += text
        sentences: list[Sentence] = []
        start = 0
        while (end := self._cut(start)) is not None:
            sentences.extend(self._sentence(start, end))
            start = end
        self._pending = self._pending[start:]
        self._offset += start
        return sentences

    def finish(self) -> list[Sentence]:
        """The rest, now that no more text will come."""
        sentences = self._sentence(0, len(self._pending))
        self._offset += len(self._pending)
        self._pending = ""
        return sentences

    def _cut(self, start: int) -> int | None:
        """Where the sentence starting at `start` ends, if it is complete."""
        match = SENTENCE_END.search(self._pending, start)
        if match is not None and match.end() - start <= self._max_chars:
            return match.end()
        if len(self._pending) - start > self._max_chars:
            return self._long_cut(start)
        return None

    def _long_cut(self, start: int) -> int:
        """A run too long to wait for its end: cut after its last clause, else its last word, in reach."""
        window = self._pending[start : start + self._max_chars + 1]
        clauses = [match.end() for match in CLAUSE_END.finditer(window) if match.end() > self._max_chars // 2]
        if clauses:
            return start + clauses[-1]
        spaces = [match.start() for match in WHITESPACE.finditer(window) if match.start() > 0]
        if spaces:
            return start + spaces[-1]
        return start + self._max_chars

    def _sentence(self, start: int, end: int) -> list[Sentence]:
        raw = self._pending[start:end]
        text = raw.strip()
        # Nothing to say (whitespace, a lone "..." or "---"): no sentence, though its text still counts.
        if not any(character.isalnum() for character in text):
            return []
        begin = self._offset + start + (len(raw) - len(raw.lstrip()))
        return [Sentence(text=text, start=begin, end=begin + len(text))]


class SpanEstimator:
    """The text spans of one sentence's audio chunks, in order and without gaps.

    A chunk's span ends where the sentence's text is estimated to be once that much of its audio has
    played (proportionally to time), at the nearest word end; the last chunk ends at the sentence's end.
    The first chunk starts where the previous sentence's last one ended, so the spans of a whole call
    cover its text from the start without a gap.
    """

    def __init__(self, sentence: Sentence, start: int):
        self._sentence = sentence
        self._position = start
        self._word_ends = [sentence.start + match.end() for match in WORD_END.finditer(sentence.text)]

    def next(self, fraction: float, last: bool) -> tuple[int, int]:
        start = self._position
        end = self._sentence.end if last else self._word_end_near(fraction, start)
        self._position = end
        return start, end

    def _word_end_near(self, fraction: float, at_least: int) -> int:
        sentence = self._sentence
        target = sentence.start + min(max(fraction, 0.0), 1.0) * len(sentence.text)
        index = bisect.bisect_left(self._word_ends, target)
        candidates = self._word_ends[max(index - 1, 0) : index + 1]
        nearest = min(candidates, key=lambda end: abs(end - target), default=sentence.end)
        return min(max(nearest, at_least), sentence.end)
