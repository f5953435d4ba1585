"""Benchmarks (scripts that print tables of ratios measured in one run) and the
GPU check that drives them (`gpu_check`). Nothing outside this room and the
CLI imports it."""
