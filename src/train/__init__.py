"""Stages 4-5 and connector training: reconstructors, replacement connectors, the calibrated testbed."""
