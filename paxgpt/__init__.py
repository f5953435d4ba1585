"""paxgpt: a TPU-first JAX system that trains and samples GPT-3-family models."""
import os


def _quiet_libtpu_without_tpu():
  # libtpu (installed for TPU compile checks) probes for a TPU when JAX starts
  # and prints pages of warnings on a machine without one. Real TPU VMs have
  # these device nodes and set their own values.
  if not (os.path.exists("/dev/accel0") or os.path.exists("/dev/vfio/0")):
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    # libtpu takes a machine-wide lock; compile-only use in several processes
    # (pytest workers, multi-process CPU runs) is safe without it.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


_quiet_libtpu_without_tpu()
