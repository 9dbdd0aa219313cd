#!/usr/bin/env bash
# Runs the fast tests (not marked slow) under every Python 3.10-3.13 found on this machine:
# on PATH as python3.X, or installed by pyenv. Each gets its own venv, .venv-py3.X, built
# from requirements-dev.txt like .ci/setup.sh builds .venv (the first run downloads torch per
# version). Not part of .ci/run (that stays the README's one test command, under 10 minutes).
#   bash .ci/pythons.sh [pytest args...]    e.g.  bash .ci/pythons.sh tests/test_dataset.py -x
#   CACHEDATA_PYTHONS="3.10 3.13" bash .ci/pythons.sh    only these versions
# Prints one line per version and exits 1 if any version failed (0 if none was found).
set -uo pipefail
cd "$(dirname "$0")/.."
args=("$@")
[ ${#args[@]} -eq 0 ] && args=(-m "not slow")
failed=0
ran=()
for v in ${CACHEDATA_PYTHONS:-3.10 3.11 3.12 3.13}; do
  py=""
  if command -v pyenv >/dev/null 2>&1; then
    prefix=$(pyenv prefix "$(pyenv versions --bare | grep -E "^${v//./\\.}(\.[0-9]+)?$" | tail -1)" 2>/dev/null || true)
    [ -n "$prefix" ] && [ -x "$prefix/bin/python$v" ] && py="$prefix/bin/python$v"
  fi
  [ -z "$py" ] && py=$(command -v "python$v" 2>/dev/null || true)
  if [ -z "$py" ] || ! "$py" -c "" 2>/dev/null; then
    echo "python$v: not found, skipped"
    continue
  fi
  venv=".venv-py$v"
  stamp=$(cat requirements-dev.txt setup.cfg pyproject.toml | sha256sum | cut -d' ' -f1)
  if [ "$(cat "$venv/.cachedata-stamp" 2>/dev/null)" != "$stamp" ]; then
    echo "python$v: building $venv" >&2
    if ! { "$py" -m venv "$venv" && "$venv/bin/python" -m pip install -q --upgrade pip \
        && "$venv/bin/python" -m pip install -q -r requirements-dev.txt \
        && "$venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e .; }; then
      echo "python$v: FAILED to install requirements-dev.txt"
      failed=1
      continue
    fi
    echo "$stamp" > "$venv/.cachedata-stamp"
  fi
  # (-q comes from addopts: a second one would hide the line that counts passed and failed)
  if "$venv/bin/python" -m pytest -p no:cacheprovider "${args[@]}"; then
    echo "python$v ($("$venv/bin/python" -V 2>&1)): passed"
    ran+=("$v")
  else
    echo "python$v ($("$venv/bin/python" -V 2>&1)): FAILED"
    failed=1
  fi
done
echo "passed on: ${ran[*]:-none}"
exit $failed
