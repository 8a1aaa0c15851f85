"""Rows in: streamed sources, compact id sets, shards."""
