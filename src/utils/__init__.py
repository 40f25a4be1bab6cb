"""Shared plumbing for every stage: CLI helpers, atomic I/O, clean stops, experiment tracking."""
