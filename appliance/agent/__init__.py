"""The agent: a LangGraph graph over the appliance's own models, with threads (SQLite) and memory (Chroma)."""
