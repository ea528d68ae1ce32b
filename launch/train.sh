#!/usr/bin/env bash
# Trains an experiment locally (default: experiments/default.py into runs/default),
# installing the venv first if needed. Extra flags go to main.py:
#   ./launch/train.sh --config.num_train_steps=100
#   CONFIG=experiments/default.py:size=tiny WORKDIR=runs/tiny ./launch/train.sh
# Running it again resumes from the workdir's latest checkpoint.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="$("$root/launch/setup.sh" | tail -n 1)"
cd "$root"
exec "$python" main.py --config="${CONFIG:-experiments/default.py}" \
  --workdir="${WORKDIR:-runs/default}" "$@"
