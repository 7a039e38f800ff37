"""Alembic migrations of the history database; run them with history_service.migrate (`duplex migrate`)."""
