#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs paxgpt[test] into .venv when
# needed, then runs pytest over tests/ on a fake 8-device CPU mesh.
# Extra arguments go to pytest (e.g. bash launch/test.sh -k model). Two pytest
# workers (pytest-xdist) by default, one per core of the 2-core machines CI
# runs on; PYTEST_WORKERS=0 runs in one process.
set -euo pipefail
EXTRAS=test source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=8"
set +e
python -m pytest -q -ra -n "${PYTEST_WORKERS:-2}" --durations=15 "$@" tests
status=$?
set -e
[ "$status" -eq 5 ] && { echo "no tests ran"; exit 1; }
exit "$status"
