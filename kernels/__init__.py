"""Attention kernels for paxgpt: one entry point, several backends.

Imports with JAX alone (no TensorFlow, no Flax), so it runs on a bare
accelerator box.
"""
from kernels.api import BACKENDS, attention, decode_attention, default_backend

__all__ = ["attention", "decode_attention", "default_backend", "BACKENDS"]
