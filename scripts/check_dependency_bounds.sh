#!/usr/bin/env bash
# Run the whole test suite against the lowest or the highest versions that pyproject.toml allows, in a fresh venv.
#
#   scripts/check_dependency_bounds.sh lowest      # every ">=X" lower bound in pyproject.toml installed as "==X"
#   scripts/check_dependency_bounds.sh highest     # the newest versions pip picks today within the ranges
#   scripts/check_dependency_bounds.sh lowest -x tests/engine/test_quantized.py    # extra arguments go to pytest
#
# The lowest pins are read from pyproject.toml itself, so the bounds and what this script tests cannot drift apart.
# torch stays at the local CPU build (torch==2.13.0) in both profiles. Results are recorded in
# scripts/dependency_bounds.md. Takes 10-20 minutes on 2 CPU cores.
set -euo pipefail

usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; }
[ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ] && { usage; exit 0; }
profile="${1:-}"
case "$profile" in
    lowest|highest) shift ;;
    *) usage >&2; echo "profile must be 'lowest' or 'highest', got '${profile}'" >&2; exit 2 ;;
esac

repo="$(cd "$(dirname "$0")/.." && pwd)"
venv="${BOUNDS_VENV:-$repo/.venv-bounds-$profile}"
# Packages whose lower bound we promise (torch is the user's own build; the rest are small, stable utilities).
checked="transformers accelerate deepspeed peft bitsandbytes datasets trl"

pins=""
if [ "$profile" = lowest ]; then
    pins=$(python3 - "$repo/pyproject.toml" $checked <<'PY'
import re, sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
reqs = project["dependencies"] + project["optional-dependencies"]["dev"]
wanted = set(sys.argv[2:])
for req in reqs:
    m = re.match(r"([A-Za-z0-9_.-]+)\s*>=\s*([^,;\s]+)", req)
    if m and m.group(1).lower() in wanted:
        print(f"{m.group(1)}=={m.group(2)}")
PY
)
fi

echo "profile: $profile; venv: $venv; pins: ${pins:-none (newest allowed)}"
rm -rf "$venv"
python3 -m venv "$venv"
. "$venv/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
# torch==2.13.0 again on every line: pip must never trade the local CPU build for a CUDA one.
# shellcheck disable=SC2086
DS_BUILD_OPS=0 python -m pip install -q torch==2.13.0 -e "$repo[dev]" $pins
python -m pip freeze | grep -iE "^(torch|$(echo $checked | tr ' ' '|'))==" || true
cd "$repo"
python -m pytest -q "$@"
