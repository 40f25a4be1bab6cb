"""vlm-connectors: what a VLM's connector does to image representations, and whether captions show it."""

__version__ = "0.1.0"
