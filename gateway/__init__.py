"""The edge: duplex.chat.v1.ChatService, which runs turns across the session, history and llm services."""
