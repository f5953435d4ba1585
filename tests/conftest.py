"""Tests run on CPU with 8 fake devices (set before JAX starts)."""
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import paxgpt  # noqa: E402,F401  (quiets libtpu's start-up on machines without a TPU)
