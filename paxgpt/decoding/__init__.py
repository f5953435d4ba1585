"""Decoding: the KV-cache sampler (`sampling`) and the offline JSONL driver
(`offline`)."""
