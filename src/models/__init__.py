"""The VLMs behind one adapter contract (families, loading, capture) and the reconstructor architectures."""
