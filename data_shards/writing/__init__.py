"""Shard writing: pairs + catalog -> WebDataset tar shards with their manifest, and the per-note statistics written beside them."""
