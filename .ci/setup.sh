#!/usr/bin/env bash
# Builds (or reuses) the project-local virtual environment .venv.
# Idempotent: a stamp of the requirement files makes a second run take a moment.
# A fresh clone reuses the packages of a .venv built earlier on this machine: the first clone
# to build one from scratch keeps a hard-linked copy of it (before its editable install) in
# ${XDG_CACHE_HOME:-~/.cache}/cachedata-ci/venv-<hash>, keyed by requirements-dev.txt and
# python3; a later clone makes its .venv from it with hard links (seconds instead of minutes,
# no extra disk space) and redoes only the editable install of itself. Without that copy, or
# on another filesystem, .venv is built as before. CACHEDATA_VENV_CACHE=0 turns this off.
# (Not under ~/.cache/cachedata: that is the library's default cache_dir.)
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

# copy_venv SRC DST: DST becomes a venv sharing SRC's packages through hard links. bin/ and
# pyvenv.cfg are real copies (venv and pip rewrite those in place), in which SRC's path becomes
# DST's (script shebangs, activate). The copy is made under a temporary name in the cache
# folder and renamed when complete, so that one killed half-way is never taken for a venv.
# Fails (status 1) where SRC or DST is on another filesystem than the cache folder.
copy_venv() {
  local src=$1 dst=$2 tmp="$cache_root/.tmp-venv-$$"
  [ "$(stat -c %d "$src")" = "$(stat -c %d "$cache_root")" ] || return 1
  [ "$(stat -c %d "$(dirname "$dst")")" = "$(stat -c %d "$cache_root")" ] || return 1
  rm -rf "$tmp"
  if ! cp -al "$src" "$tmp" 2>/dev/null; then
    rm -rf "$tmp"
    return 1
  fi
  rm -rf "$tmp/bin" "$tmp/pyvenv.cfg"
  cp -a "$src/bin" "$src/pyvenv.cfg" "$tmp/"
  python3 - "$src" "$dst" "$tmp" <<'EOF'
import pathlib, sys
old, new = sys.argv[1].encode(), sys.argv[2].encode()
root = pathlib.Path(sys.argv[3])
for p in [root / "pyvenv.cfg", *(root / "bin").iterdir()]:
    if p.is_file() and not p.is_symlink():
        data = p.read_bytes()
        if old in data and b"\0" not in data[:8192]:  # text files only (ruff is a binary)
            p.write_bytes(data.replace(old, new))
EOF
  mv -T "$tmp" "$dst" 2>/dev/null || { rm -rf "$tmp"; return 1; }
}

stamp_src=$(cat requirements-dev.txt setup.cfg pyproject.toml | sha256sum | cut -d' ' -f1)
if ! { [ -x .venv/bin/python ] && [ "$(cat .venv/.cachedata-stamp 2>/dev/null)" = "$stamp_src" ]; }; then
  here=$(pwd -P)  # the path Python and venv write into scripts (symbolic links resolved)
  cache_root="${XDG_CACHE_HOME:-${HOME:+$HOME/.cache}}"
  cache_root="${cache_root:+$cache_root/cachedata-ci}"
  cache=""
  if [ "${CACHEDATA_VENV_CACHE:-1}" != 0 ] && [ -n "$cache_root" ] && mkdir -p "$cache_root" 2>/dev/null; then
    # What the copied part is built from; bump "recipe" when the build steps below change.
    key=$({ echo "recipe 1"; cat requirements-dev.txt
            python3 -c 'import os, platform, sys; print(sys.version, os.path.realpath(sys.executable), platform.machine())'
          } | sha256sum | cut -c1-16)
    cache="$cache_root/venv-$key"
    for d in "$cache_root"/.tmp-venv-*; do  # left by a setup killed mid-copy
      if [ -d "$d" ] && ! kill -0 "${d##*-}" 2>/dev/null; then rm -rf "$d"; fi
    done
  fi
  if [ ! -e .venv ] && [ -n "$cache" ] && [ -f "$cache/.cachedata-complete" ] \
      && copy_venv "$cache" "$here/.venv"; then
    echo "made .venv from $cache (hard links)" >&2
  else
    echo "setting up .venv (the first run downloads torch and takes a few minutes)" >&2
    fresh=0
    [ -e .venv ] || fresh=1
    python3 -m venv .venv
    quiet .venv/bin/python -m pip install --upgrade pip
    quiet .venv/bin/python -m pip install -r requirements-dev.txt
    # Keep a copy for later clones: only of a venv built here from nothing (an older .venv may
    # hold more, e.g. the benchmark peers), and before the editable install of this clone.
    if [ "$fresh" = 1 ] && [ -n "$cache" ] && [ ! -e "$cache" ]; then
      touch .venv/.cachedata-complete
      if copy_venv "$here/.venv" "$cache"; then
        echo "kept a copy of .venv in $cache for later clones" >&2
        # Keep the two newest copies: older ones were built from older requirement files.
        # shellcheck disable=SC2012
        ls -1dt "$cache_root"/venv-* | tail -n +3 | xargs -r rm -rf
      fi
      rm -f .venv/.cachedata-complete
    fi
  fi
  quiet .venv/bin/python -m pip install --no-deps --no-build-isolation -e .
  .venv/bin/python -c "import cachedata, torch, torchvision, torchaudio, h5py, xxhash, soundfile, tokenizers"
  .venv/bin/python -c "import lightning, transformers, accelerate, torchdata, xdist"
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
