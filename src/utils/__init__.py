"""Shared plumbing: CLI conventions, atomic file I/O, CSV rows, stop signals, experiment tracking."""
