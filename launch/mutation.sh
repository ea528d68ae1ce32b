#!/usr/bin/env bash
# Mutation testing of one module on a seeded sample of mutants (launch/mutation.py;
# docs/testing.md), installing the venv with the test tools (cosmic-ray among them) first if needed.
#   ./launch/mutation.sh xenith/train/steps.py [--sample=40] [--seed=0] [--since=REV] [--rev=REV]
# Not part of CI: run it on the modules an issue touches before resolving it.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="$("$root/launch/setup.sh" requirements-test.txt | tail -n 1)"
cd "$root"
exec "$python" launch/mutation.py "$@"
