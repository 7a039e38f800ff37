"""session_service: live sessions, their running turn and the event log clients resume from."""
