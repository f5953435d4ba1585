"""paxgpt: a TPU-first JAX system that trains and samples GPT-3-family models."""
import os


def _quiet_libtpu_without_tpu():
  # libtpu (installed for TPU compile checks) probes for a TPU when JAX starts
  # and prints pages of warnings on a machine without one. Real TPU VMs have
  # these device nodes and set their own values.
  if not (os.path.exists("/dev/accel0") or os.path.exists("/dev/vfio/0")):
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")


_quiet_libtpu_without_tpu()
