"""Distributed training pieces: expert parallelism (and, later, sharding plans, pipelines, checkpoints)."""
