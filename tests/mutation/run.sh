#!/usr/bin/env bash
# Automatic mutation score of the kernel modules, with cosmic-ray (tox -e mutation; not in CI:
# it takes tens of minutes). One session per op, each in its own copy of the tree (cosmic-ray
# rewrites the module on disk), with that op's own tests as the test command: its property and
# gradcheck tests, the contract tests and the fuzzed bad inputs. Reports land in .mutation/.
#
#   tests/mutation/run.sh                 every op, JOBS=2 at a time
#   OPS="tanh linear" tests/mutation/run.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
out=$root/.mutation
mkdir -p "$out"

one() {
    op=$1
    work=$(mktemp -d)
    git -C "$root" ls-files -z | (cd "$root" && xargs -0 tar cf -) | tar xf - -C "$work"
    cp "$root/backprop/$op.py" "$work/backprop/$op.py"  # the working copy, committed or not
    cat > "$work/cr.toml" <<TOML
[cosmic-ray]
module-path = "backprop/$op.py"
timeout = 300.0
excluded-modules = []
test-command = "python -m pytest -x -q -p no:cacheprovider -o addopts= tests/test_$op.py tests/test_contract.py tests/test_fuzz_bad_inputs.py -k $op"

[cosmic-ray.distributor]
name = "local"
TOML
    cd "$work"
    # python -m puts this copy first on sys.path, ahead of any installed backprop
    python -c "import backprop, sys; assert backprop.__file__.startswith('$work'), backprop.__file__"
    cosmic-ray init cr.toml "$out/$op.sqlite" --force
    HYPOTHESIS_PROFILE=ci cosmic-ray exec cr.toml "$out/$op.sqlite"
    cr-report "$out/$op.sqlite" --show-output > "$out/$op.txt"
    tail -n 3 "$out/$op.txt"
    rm -rf "$work"
}
export -f one
export root out
printf '%s\n' ${OPS:-cross_entropy logsumexp batch_norm tanh linear embedding} | xargs -P "${JOBS:-2}" -I{} bash -c 'one {}'
