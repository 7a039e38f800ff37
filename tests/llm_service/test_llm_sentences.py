"""Cutting streamed text into sentences, and the spans of text a sentence's audio chunks speak."""

import pytest

from llm_service.sentences import Sentence, SentenceSplitter, SpanEstimator


def split(*pieces: str, max_chars: int = 200) -> tuple[list[list[str]], list[str]]:
    """The sentences complete after each piece, and those the end of the text completes."""
    splitter = SentenceSplitter(max_chars)
    fed = [[sentence.text for sentence in splitter.feed(piece)] for piece in pieces]
    return fed, [sentence.text for sentence in splitter.finish()]


def test_a_sentence_is_complete_once_whitespace_follows_its_stop():
    fed, rest = split("Hello there.", " How are", " you? I am", " fine!")

    assert fed == [[], ["Hello there."], ["How are you?"], []]
    assert rest == ["I am fine!"]


def test_newlines_end_sentences_and_decimals_do_not():
    fed, rest = split("Pi is 3.14 or so\nA list:\n- one\n- two")

    assert fed == [["Pi is 3.14 or so", "A list:", "- one"]]
    assert rest == ["- two"]


def test_closing_quotes_and_brackets_stay_with_their_sentence():
    fed, rest = split('He said "stop." It worked (mostly.) Then he left. ')

    assert fed == [['He said "stop."', "It worked (mostly.)", "Then he left."]]
    assert rest == []


def test_a_long_run_is_cut_at_a_clause_or_a_space():
    clause = "one two three four five six seven eight, "
    fed, rest = split(clause * 3, max_chars=60)

    assert fed == [["one two three four five six seven eight,"] * 2]
    assert rest == ["one two three four five six seven eight,"]
    fed, rest = split("word " * 30, max_chars=40)
    assert all(len(sentence) <= 40 for sentence in fed[0] + rest)
    assert " ".join(fed[0] + rest).split() == ["word"] * 30


def test_a_run_without_any_space_is_cut_hard():
    fed, rest = split("x" * 90, max_chars=40)

    assert fed == [["x" * 40, "x" * 40]]
    assert rest == ["x" * 10]


def test_offsets_are_code_points_of_all_the_text():
    splitter = SentenceSplitter()
    text = "  Ça va? Très bien 🙂. ... Merci."

    sentences = splitter.feed(text) + splitter.finish()

    assert [(s.text, text[s.start : s.end]) for s in sentences] == [
        ("Ça va?", "Ça va?"),
        ("Très bien 🙂.", "Très bien 🙂."),
        ("Merci.", "Merci."),
    ]
    assert splitter.received_chars == len(text)


@pytest.mark.parametrize("text", ["", "   ", "...", " --- \n"])
def test_text_with_nothing_to_say_makes_no_sentence(text: str):
    fed, rest = split(text)

    assert fed == [[]] and rest == []


def test_spans_run_in_order_at_word_ends_and_the_last_ends_the_sentence():
    sentence = Sentence("The quick brown fox jumps.", start=10, end=36)
    spans = SpanEstimator(sentence, start=8)

    chunks = [spans.next(0.25, False), spans.next(0.5, False), spans.next(0.5, False), spans.next(1.0, True)]

    assert chunks == [(8, 19), (19, 25), (25, 25), (25, 36)]
    text = "0123456789" + sentence.text
    assert [text[end - 1] for _, end in chunks[:2]] == ["k", "n"]
