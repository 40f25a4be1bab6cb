"""Stage 4 and the connector stage: reconstructor and replacement-connector training, exports, the testbed."""
