#!/usr/bin/env bash
# CI check of the pytest plugin as a user meets it: install backprop and the example package
# (examples/mykernels) into a fresh venv, then run plain `pytest` in a copy of the example's folder,
# where its [tool.backprop.impl] table names both ops. The plugin loads through the pytest11 entry
# point (no -p). Expected: tanh passes every check; cross_entropy (backward's 'mean' divides by the
# target weights of every row, ignored rows too, not of the kept rows) fails fixed_cases,
# gradient_vs_float64 and gradcheck and passes the rest; suite power is printed with every known
# bug caught.
#
#   bash examples/run.sh            # MAX_EXAMPLES=40 by default; PYTHON picks the interpreter
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# --system-site-packages: torch, pytest and hypothesis from the CI image (an unpinned torch would
# pull a multi-GB CUDA build); --no-deps: nothing else is fetched
$PY -m venv --system-site-packages "$WORK/venv"
"$WORK/venv/bin/python" -m pip install --quiet --no-deps -e "$ROOT" "$ROOT/examples/mykernels"
cp -r "$ROOT/examples/mykernels" "$WORK/user"   # a separate folder, as a user's checkout
rm -rf "$WORK/user/src"                          # the installed package is what gets tested
cd "$WORK/user"

set +e
"$WORK/venv/bin/python" -m pytest -p no:cacheprovider -rA --backprop-profile ci \
    --backprop-max-examples "${MAX_EXAMPLES:-40}" | tee "$WORK/out.txt"
rc=${PIPESTATUS[0]}
set -e

fail() { echo "examples/run.sh: $*" >&2; exit 1; }
[ "$rc" = 1 ] || fail "expected exit code 1 (tests failed), got $rc"
for check in suite_power fixed_cases gradient_vs_float64 gradcheck noncontiguous bad_inputs; do
    grep -qF "PASSED backprop[tanh::$check]" "$WORK/out.txt" || fail "backprop[tanh::$check] did not pass"
done
grep -qF "FAILED backprop[cross_entropy::fixed_cases]" "$WORK/out.txt" || fail "the buggy cross_entropy was not caught"
grep -qF "FAILED backprop[cross_entropy::gradient_vs_float64]" "$WORK/out.txt" || fail "hypothesis did not catch the bug"
grep -qF "FAILED backprop[cross_entropy::gradcheck]" "$WORK/out.txt" || fail "finite differences did not catch the bug"
grep -qE "^FAIL +dlogits " "$WORK/out.txt" || fail "no failing dlogits row in the table"
# the bug is in backward's 'mean' alone: the checks that cannot see it pass, and every failure is
# that one bug (one falsifying example, not an ExceptionGroup of unrelated errors)
for check in noncontiguous bad_inputs; do
    grep -qF "PASSED backprop[cross_entropy::$check]" "$WORK/out.txt" || fail "backprop[cross_entropy::$check] did not pass"
done
if grep -qF "ExceptionGroup" "$WORK/out.txt"; then fail "a check found more than one distinct error"; fi
grep -qE "= 3 failed, 9 passed" "$WORK/out.txt" || fail "expected 3 failed, 9 passed"
grep -qF "PASSED backprop[cross_entropy::suite_power]" "$WORK/out.txt" || fail "suite power failed"
grep -qE "suite power: ([0-9]+) of \1 known bugs caught" "$WORK/out.txt" || fail "suite power not printed, or a bug missed"
echo "examples/run.sh: ok (tanh passes, cross_entropy fails as expected, every known bug caught)"
