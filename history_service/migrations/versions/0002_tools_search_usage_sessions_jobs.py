"""Tool messages, full-text search, daily usage, session records and the job queue.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# The text search configuration: 'simple' lowercases words without stemming or stop words, which behaves
# the same for every language and like SQLite's unicode61 tokenizer. history_service.search must agree.
TSVECTOR_EXPRESSION = "to_tsvector('simple'::regconfig, content)"

# An external-content FTS5 index over messages.content, keyed by messages.pk and kept in step by triggers,
# so the text is stored once. Deletes must hand FTS5 the old text to remove its tokens.
SQLITE_FTS_STATEMENTS = (
    "CREATE VIRTUAL TABLE messages_fts USING fts5("
    "content, content='messages', content_rowid='pk', tokenize='unicode61 remove_diacritics 2')",
    "CREATE TRIGGER messages_fts_after_insert AFTER INSERT ON messages BEGIN "
    "INSERT INTO messages_fts(rowid, content) VALUES (new.pk, new.content); END",
    "CREATE TRIGGER messages_fts_after_delete AFTER DELETE ON messages BEGIN "
    "INSERT INTO messages_fts(messages_fts, rowid, content) VALUES ('delete', old.pk, old.content); END",
    "CREATE TRIGGER messages_fts_after_update AFTER UPDATE OF content ON messages BEGIN "
    "INSERT INTO messages_fts(messages_fts, rowid, content) VALUES ('delete', old.pk, old.content); "
    "INSERT INTO messages_fts(rowid, content) VALUES (new.pk, new.content); END",
    # Index the messages stored before this revision.
    "INSERT INTO messages_fts(messages_fts) VALUES ('rebuild')",
)


def utc_datetime() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    add_tool_columns()
    if op.get_bind().dialect.name == "postgresql":
        add_postgresql_search()
    else:
        add_sqlite_search()
    create_usage_daily()
    create_session_records()
    create_jobs()


def add_tool_columns() -> None:
    op.add_column("messages", sa.Column("tool_calls_json", sa.Text(), server_default="", nullable=False))
    op.add_column("messages", sa.Column("tool_call_id", sa.String(255), server_default="", nullable=False))
    op.add_column("messages", sa.Column("tool_name", sa.String(255), server_default="", nullable=False))


def add_postgresql_search() -> None:
    op.add_column(
        "messages",
        sa.Column("search_vector", postgresql.TSVECTOR(), sa.Computed(TSVECTOR_EXPRESSION, persisted=True)),
    )
    op.create_index("ix_messages_search_vector", "messages", ["search_vector"], postgresql_using="gin")


def add_sqlite_search() -> None:
    for statement in SQLITE_FTS_STATEMENTS:
        op.execute(statement)


def create_usage_daily() -> None:
    op.create_table(
        "usage_daily",
        sa.Column("user_id", sa.String(255), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("model", sa.String(255), nullable=False),
        sa.Column("prompt_tokens", sa.BigInteger(), nullable=False),
        sa.Column("completion_tokens", sa.BigInteger(), nullable=False),
        sa.Column("messages", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("user_id", "day", "model", name="pk_usage_daily"),
    )


def create_session_records() -> None:
    op.create_table(
        "session_records",
        sa.Column("session_id", sa.String(255), nullable=False),
        sa.Column("user_id", sa.String(255), nullable=False),
        sa.Column("conversation_id", sa.String(36), nullable=False),
        sa.Column("started_at", utc_datetime(), nullable=False),
        sa.Column("ended_at", utc_datetime(), nullable=False),
        sa.Column("duration_ms", sa.BigInteger(), nullable=False),
        sa.Column("summary", sa.Text(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", utc_datetime(), nullable=False),
        sa.Column("updated_at", utc_datetime(), nullable=False),
        sa.PrimaryKeyConstraint("session_id", name="pk_session_records"),
        sa.ForeignKeyConstraint(
            ["conversation_id"],
            ["conversations.id"],
            name="fk_session_records_conversation_id_conversations",
            ondelete="CASCADE",
        ),
    )
    op.create_index("ix_session_records_conversation_id_ended_at", "session_records", ["conversation_id", "ended_at"])


def create_jobs() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("payload", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("run_after", utc_datetime(), nullable=False),
        sa.Column("locked_by", sa.String(255), nullable=True),
        sa.Column("locked_until", utc_datetime(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", utc_datetime(), nullable=False),
        sa.Column("updated_at", utc_datetime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_jobs"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_jobs_status_run_after", "jobs", ["status", "run_after"])


def downgrade() -> None:
    op.drop_table("jobs")
    op.drop_table("session_records")
    op.drop_table("usage_daily")
    if op.get_bind().dialect.name == "postgresql":
        op.drop_index("ix_messages_search_vector", table_name="messages")
        op.drop_column("messages", "search_vector")
    else:
        for trigger in ("messages_fts_after_insert", "messages_fts_after_delete", "messages_fts_after_update"):
            op.execute(f"DROP TRIGGER {trigger}")
        op.execute("DROP TABLE messages_fts")
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("tool_name")
        batch.drop_column("tool_call_id")
        batch.drop_column("tool_calls_json")
