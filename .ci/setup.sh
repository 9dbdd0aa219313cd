#!/usr/bin/env bash
# Builds (or reuses) the project-local virtual environment .venv.
# Idempotent: a stamp of the requirement files makes a second run take a moment.
# --bench: also install the optional benchmark peers (requirements-bench.txt: MONAI,
# Hugging Face datasets, litdata, Mosaic streaming, matplotlib) on top, for benchmarks/bench_peers.py. CI does not.
set -euo pipefail
cd "$(dirname "$0")/.."
bench=0
for arg in "$@"; do
  case "$arg" in
    --bench) bench=1 ;;
    *) echo "usage: bash .ci/setup.sh [--bench]" >&2; exit 2 ;;
  esac
done
log=$(mktemp)
trap 'rm -f "$log"' EXIT
quiet() { "$@" >"$log" 2>&1 || { grep -v '^WARNING: Location' "$log" >&2; exit 1; }; }
stamp_src=$(cat requirements-dev.txt setup.cfg pyproject.toml | sha256sum | cut -d' ' -f1)
if ! { [ -x .venv/bin/python ] && [ "$(cat .venv/.cachedata-stamp 2>/dev/null)" = "$stamp_src" ]; }; then
  echo "setting up .venv (the first run downloads torch and takes a few minutes)" >&2
  python3 -m venv .venv
  quiet .venv/bin/python -m pip install --upgrade pip
  quiet .venv/bin/python -m pip install -r requirements-dev.txt
  quiet .venv/bin/python -m pip install --no-deps --no-build-isolation -e .
  .venv/bin/python -c "import cachedata, torch, torchvision, torchaudio, h5py, xxhash, soundfile, tokenizers"
  .venv/bin/python -c "import lightning, transformers, accelerate, torchdata"
  echo "$stamp_src" > .venv/.cachedata-stamp
  echo ".venv is ready" >&2
fi
if [ "$bench" = 1 ]; then
  bench_stamp=$(cat requirements-bench.txt requirements-dev.txt | sha256sum | cut -d' ' -f1)
  if [ "$(cat .venv/.cachedata-bench-stamp 2>/dev/null)" != "$bench_stamp" ]; then
    echo "installing the benchmark peers (requirements-bench.txt) into .venv" >&2
    quiet .venv/bin/python -m pip install -r requirements-bench.txt
    # Its metadata pins numpy<2.2, xxhash<4, transformers<5; local folders work with ours.
    quiet .venv/bin/python -m pip install --no-deps mosaicml-streaming==0.13.0
    .venv/bin/python -c "import monai, datasets, matplotlib, litdata, streaming"
    echo "$bench_stamp" > .venv/.cachedata-bench-stamp
    echo "benchmark peers are ready" >&2
  fi
fi
