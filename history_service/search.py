"""Full-text search over a user's messages: PostgreSQL text search or SQLite FTS5, same results shape.

Queries follow web-search habits: words must all appear, "quoted words" must appear together, `or` between
words accepts either side, and -word excludes. PostgreSQL reads the raw text with websearch_to_tsquery, which
never fails on syntax. FTS5 has a query language of its own that fails on stray quotes or operators, so for
SQLite the text is parsed here into words and rebuilt as a query made only of quoted strings and operators
this code writes itself: nothing the user typed is ever interpreted as FTS5 syntax.
"""

import re
from dataclasses import dataclass

from sqlalchemy import ColumnElement, Select, column, func, literal_column, select, table, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from history_service.domain import Role, SearchHit, SearchPage
from history_service.models import ConversationRow, MessageRow
from history_service.repository import dialect_name, to_message

# People search what was said, not system prompts or tool output.
SEARCHED_ROLES = (Role.USER, Role.ASSISTANT)
# Matched words in a snippet are wrapped in this (Markdown bold), on both backends.
SNIPPET_MARK = "**"
SNIPPET_ELLIPSIS = "…"
SNIPPET_TOKENS = 16
# Bounds the work one query can ask for.
MAX_TERMS = 32

# Must agree with the generated column in migration 0002.
POSTGRES_TEXT_SEARCH_CONFIG = "'simple'::regconfig"
HEADLINE_OPTIONS = (
    f'StartSel="{SNIPPET_MARK}", StopSel="{SNIPPET_MARK}", MaxWords=24, MinWords=8, '
    f'MaxFragments=2, FragmentDelimiter=" {SNIPPET_ELLIPSIS} "'
)

# An optionally negated "quoted phrase" (the closing quote may be missing) or a bare run of non-space.
_TOKEN = re.compile(r'(?P<negated>-?)(?:"(?P<phrase>[^"]*)"?|(?P<word>[^\s"]+))')
_WORD = re.compile(r"\w+")


@dataclass(frozen=True, slots=True)
class Term:
    words: tuple[str, ...]
    negated: bool = False


@dataclass(frozen=True, slots=True)
class SearchQuery:
    """Alternatives (OR) of terms that must all match (AND), minus the negated ones."""

    text: str
    alternatives: tuple[tuple[Term, ...], ...]


def parse_search_query(text: str) -> SearchQuery | None:
    """The query's structure, or None when it has no word to look for."""
    alternatives: list[list[Term]] = [[]]
    term_count = 0
    for token in _TOKEN.finditer(text):
        if token["word"] is not None and token["word"].lower() == "or" and not token["negated"]:
            alternatives.append([])
            continue
        words = tuple(_WORD.findall(token["phrase"] if token["phrase"] is not None else token["word"]))
        if words and term_count < MAX_TERMS:
            alternatives[-1].append(Term(words, negated=bool(token["negated"])))
            term_count += 1
    # Exclusions alone match nearly everything; FTS5 cannot even express them.
    kept = tuple(tuple(terms) for terms in alternatives if any(not term.negated for term in terms))
    return SearchQuery(text, kept) if kept else None


def to_fts5(query: SearchQuery) -> str:
    """An FTS5 MATCH expression: every word double-quoted, so only this function writes operators."""
    return " OR ".join(f"({_fts5_alternative(terms)})" for terms in query.alternatives)


def _fts5_alternative(terms: tuple[Term, ...]) -> str:
    included = " AND ".join(_fts5_phrase(term) for term in terms if not term.negated)
    excluded = "".join(f" NOT {_fts5_phrase(term)}" for term in terms if term.negated)
    return included + excluded


def _fts5_phrase(term: Term) -> str:
    # \w+ words hold no double quote, the only character special inside an FTS5 string.
    return '"' + " ".join(term.words) + '"'


class MessageSearch:
    def __init__(self, sessionmaker: async_sessionmaker[AsyncSession]):
        self._sessionmaker = sessionmaker

    async def search(self, user_id: str, query: SearchQuery, limit: int, offset: int = 0) -> SearchPage:
        """Best matches first; only messages in the user's own conversations."""
        async with self._sessionmaker() as session:
            build = _postgresql_search if dialect_name(session) == "postgresql" else _sqlite_search
            rows = (await session.execute(build(user_id, query, limit + 1, offset))).all()
        hits = [SearchHit(to_message(message), title, snippet) for message, title, snippet in rows[:limit]]
        return SearchPage(hits, offset + limit if len(rows) > limit else None)


def _owned_and_searched(user_id: str) -> tuple[ColumnElement[bool], ...]:
    return ConversationRow.user_id == user_id, MessageRow.role.in_(SEARCHED_ROLES)


def _sqlite_search(user_id: str, query: SearchQuery, limit: int, offset: int) -> Select:
    fts = table("messages_fts", column("rowid"))
    fts_table = literal_column("messages_fts")
    # bm25 is lower for better matches.
    rank = func.bm25(fts_table)
    snippet = func.snippet(fts_table, 0, SNIPPET_MARK, SNIPPET_MARK, SNIPPET_ELLIPSIS, SNIPPET_TOKENS)
    return (
        select(MessageRow, ConversationRow.title, snippet)
        .select_from(fts)
        .join(MessageRow, MessageRow.pk == fts.c.rowid)
        .join(ConversationRow, ConversationRow.id == MessageRow.conversation_id)
        .where(text("messages_fts MATCH :fts_query").bindparams(fts_query=to_fts5(query)))
        .where(*_owned_and_searched(user_id))
        .order_by(rank, MessageRow.pk.desc())
        .limit(limit)
        .offset(offset)
    )


def _postgresql_search(user_id: str, query: SearchQuery, limit: int, offset: int) -> Select:
    config = literal_column(POSTGRES_TEXT_SEARCH_CONFIG)
    tsquery = func.websearch_to_tsquery(config, query.text)
    vector = literal_column("messages.search_vector")
    rank = func.ts_rank(vector, tsquery)
    # Rank and page first, so ts_headline (which re-parses the whole text) runs for one page of rows only.
    page = (
        select(MessageRow.pk, rank.label("rank"))
        .join(ConversationRow, ConversationRow.id == MessageRow.conversation_id)
        .where(vector.op("@@")(tsquery), *_owned_and_searched(user_id))
        .order_by(rank.desc(), MessageRow.pk.desc())
        .limit(limit)
        .offset(offset)
        .subquery()
    )
    headline = func.ts_headline(config, MessageRow.content, tsquery, HEADLINE_OPTIONS)
    return (
        select(MessageRow, ConversationRow.title, headline)
        .join(page, page.c.pk == MessageRow.pk)
        .join(ConversationRow, ConversationRow.id == MessageRow.conversation_id)
        .order_by(page.c.rank.desc(), MessageRow.pk.desc())
    )
