"""Long-term memory: sentence-transformers embeddings (loaded in the background) and a Chroma store."""
