#!/usr/bin/env bash
# Runs the whole test suite (slow end-to-end tests included), installing the venv
# first if needed. Extra arguments go to pytest: ./launch/test.sh -m "not slow" -x
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="$("$root/launch/setup.sh" requirements-test.txt | tail -n 1)"
cd "$root"
# Two workers (the CI machine has 2 cores); a file's tests stay on one worker so
# module fixtures such as the uninterrupted reference run are built once.
exec "$python" -m pytest -n 2 --dist loadfile "$@"
