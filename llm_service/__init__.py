"""The LLM service: `duplex.llm.v1.LlmService` in front of pluggable model providers."""
