"""Data layer: tasks (GLUE, offline, generated), client partitions, tokenisation and batching."""
