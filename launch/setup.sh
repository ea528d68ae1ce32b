#!/usr/bin/env bash
# Creates .venv (Python 3.11) beside the repo, installs requirement files into it
# (default: requirements.txt) and Xenith itself, editable (pyproject.toml), so that
# `import xenith` works from any directory. Idempotent: reinstalls only when those
# files change.
#   ./launch/setup.sh [--gpu | --tpu] [requirements-test.txt ...]
#     -> prints the venv's python on its last line.
# --gpu adds requirements-gpu.txt (jax's CUDA 12 plugin and NVIDIA's CUDA wheels), --tpu
# requirements-tpu.txt (libtpu); requirements.txt is always installed: the plugins add a
# backend to the same jax and jaxlib. See docs/accelerators.md.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Arguments first, so that a mistyped flag stops before anything is created or installed.
extras=()
accelerator=''
for arg in "$@"; do
  case "$arg" in
    --gpu|--tpu)
      if [ -n "$accelerator" ] && [ "$accelerator" != "$arg" ]; then
        echo "launch/setup.sh: --gpu and --tpu exclude each other; pick one." >&2
        exit 2
      fi
      accelerator="$arg"
      extras+=("requirements-${arg#--}.txt") ;;
    -*)
      echo "launch/setup.sh: unknown flag '$arg'; the flags are --gpu (CUDA 12) and" \
        "--tpu (libtpu), other arguments are requirement files." >&2
      exit 2 ;;
    *)
      if [ ! -f "$root/$arg" ]; then
        echo "launch/setup.sh: no requirements file '$arg' in $root." >&2
        exit 2
      fi
      extras+=("$arg") ;;
  esac
done
venv="${XENITH_VENV:-$root/.venv}"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null 2>&1 || python=python3
if ! "$python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "Xenith needs Python 3.11; '$python' is $("$python" --version 2>&1)." >&2
  exit 1
fi
files=("$root/requirements.txt")
for extra in ${extras[@]+"${extras[@]}"}; do files+=("$root/$extra"); done
set_name="$(printf '%s' "${extras[*]-}" | tr -c 'A-Za-z0-9._-' '_')"
stamp="$venv/.requirements${set_name:+-$set_name}.sha256"
want="$(cat "${files[@]}" "$root/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "Installing requirements into $venv ..." >&2
  "$venv/bin/python" -m pip install -q --upgrade pip >&2
  "$venv/bin/python" -m pip install -q $(printf -- '-r %q ' "${files[@]}") >&2
  "$venv/bin/python" -m pip install -q --no-deps -e "$root" >&2
  echo "$want" > "$stamp"
fi
echo "$venv/bin/python"
