#!/usr/bin/env bash
# Do the tests an issue added fail on the main it was filed against? (issue 29: "every item has a test
# that fails on today's main and passes after").
#   scripts/prove_tests_fail_on.sh OLD_COMMIT NEW_COMMIT [TEST_FILE ...]
# Checks out OLD_COMMIT and NEW_COMMIT (git worktrees under a temp dir), lists the test ids NEW's
# versions of the files have and OLD's do not (new functions and new parametrized cases), copies NEW's
# test files (and the helpers under tests/ it changed) into OLD, and runs each new id in both, one process per id (150 s limit: some old code
# hangs for good; a run killed for memory counts too). Prints one line per id and a count per outcome.
set -uo pipefail
old=$1 new=$2; shift 2
files=("$@")
root=$(git rev-parse --show-toplevel)
py=${PYTHON:-$root/.venv/bin/python}
tmp=$(mktemp -d)
git -C "$root" worktree add -q --detach "$tmp/old" "$old"
git -C "$root" worktree add -q --detach "$tmp/new" "$new"
[ ${#files[@]} -eq 0 ] && mapfile -t files < <(git -C "$root" diff --name-only "$old" "$new" -- 'tests/test_*.py')
collect() { (cd "$1" && "$py" -m pytest --co -q -p no:cacheprovider -m "" "${files[@]}" 2>/dev/null | grep '::' | sort); }
collect "$tmp/old" > "$tmp/ids_old" 2>/dev/null || true
# NEW's versions of every test file and helper it changed (conftest.py stays OLD's: it sets up OLD's code)
for f in $(git -C "$root" diff --name-only "$old" "$new" -- tests/ | grep -v conftest.py); do
  [ -f "$tmp/new/$f" ] && cp "$tmp/new/$f" "$tmp/old/$f"
done
collect "$tmp/new" > "$tmp/ids_new"
comm -13 "$tmp/ids_old" "$tmp/ids_new" > "$tmp/ids"
one() {
  (cd "$1" && HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=1 timeout 150 "$py" -m pytest -q \
      -p no:cacheprovider -m "" "$2" >/dev/null 2>&1)
  case $? in 0) echo PASS;; 124) echo TIMEOUT;; 137) echo KILLED;; *) echo FAIL;; esac
}
while read -r id; do echo "old $(one "$tmp/old" "$id") new $(one "$tmp/new" "$id")  $id"; done < "$tmp/ids" | tee "$tmp/report"
echo "$(wc -l < "$tmp/ids") new tests; on $old:"; awk '{print $2}' "$tmp/report" | sort | uniq -c
echo "on $new:"; awk '{print $4}' "$tmp/report" | sort | uniq -c
git -C "$root" worktree remove --force "$tmp/old"; git -C "$root" worktree remove --force "$tmp/new"
