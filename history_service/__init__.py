"""duplex.history.v1.HistoryService: conversations and their messages, stored with SQLAlchemy async."""
