"""Data pipelines: raw sources -> records -> task templates -> token shards."""
