"""Figures and summary tables, read from the CSV/JSON files the stages write."""
