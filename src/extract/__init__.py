"""Stages 1-3: VLM vectors (E_pre, E_post), reference embeddings and the connector's geometry."""
