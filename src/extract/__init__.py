"""Stages 1-3: vectors from the VLMs (E_pre, E_post), CLIP references, k-NN and geometry tables."""
