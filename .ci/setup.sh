#!/usr/bin/env bash
# Builds (or reuses) the project-local virtual environment .venv.
# Idempotent: a stamp of the requirement files makes a second run take a moment.
set -euo pipefail
cd "$(dirname "$0")/.."
stamp_src=$(cat requirements-dev.txt setup.cfg pyproject.toml | sha256sum | cut -d' ' -f1)
if [ -x .venv/bin/python ] && [ "$(cat .venv/.cachedata-stamp 2>/dev/null)" = "$stamp_src" ]; then
  exit 0
fi
echo "setting up .venv (the first run downloads torch and takes a few minutes)" >&2
log=$(mktemp)
quiet() { "$@" >"$log" 2>&1 || { grep -v '^WARNING: Location' "$log" >&2; exit 1; }; }
python3 -m venv .venv
quiet .venv/bin/python -m pip install --upgrade pip
quiet .venv/bin/python -m pip install -r requirements-dev.txt
quiet .venv/bin/python -m pip install --no-deps --no-build-isolation -e .
.venv/bin/python -c "import cachedata, torch, torchvision, torchaudio, h5py, xxhash, soundfile, tokenizers"
rm -f "$log"
echo "$stamp_src" > .venv/.cachedata-stamp
echo ".venv is ready" >&2
