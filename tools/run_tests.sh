#!/usr/bin/env bash
# The whole test suite as two parallel pytest processes (2 cores): the tests not marked slow, and the slow ones
# (marked one by one, or in tests/conftest.py's SECOND_STEP_FILES). Fails if either fails; prints both summaries.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
log1=$(mktemp) log2=$(mktemp)
"$PY" -m pytest -q -p no:cacheprovider -m "not slow" "$@" >"$log1" 2>&1 & p1=$!
"$PY" -m pytest -q -p no:cacheprovider -m slow "$@" >"$log2" 2>&1 & p2=$!
wait $p1; r1=$?
wait $p2; r2=$?
echo "== step 1: tests not marked slow (exit $r1)"; cat "$log1"
echo "== step 2: slow tests (exit $r2)"; cat "$log2"
rm -f "$log1" "$log2"
# pytest exits 5 when a step selects no test; that is not a failure of the suite.
[ "$r1" -eq 5 ] && r1=0
[ "$r2" -eq 5 ] && r2=0
if [ "$r1" -ne 0 ] || [ "$r2" -ne 0 ]; then exit 1; fi
