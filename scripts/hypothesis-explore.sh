#!/usr/bin/env bash
# Explore the hypothesis properties with fresh seeds within a time budget (CI's `ci` profile always
# replays the same derandomized examples, so it never finds anything new).
#
#   HYPOTHESIS_EXPLORE_SECONDS=300 bash scripts/hypothesis-explore.sh [PYTEST ARGS...]
#
# Rounds of every @given test (profile `explore`, HYPOTHESIS_EXPLORE_EXAMPLES examples each, default
# 2000), each round with a new random seed, until the budget (default 600 s) is spent; a round that has
# started finishes. On a failure it prints the seed and the command that replays it, and exits 1.
set -euo pipefail
cd "$(dirname "$0")/.."
budget=${HYPOTHESIS_EXPLORE_SECONDS:-600}
tests=("$@")
if [ ${#tests[@]} -eq 0 ]; then
    tests=(tests/unit)
fi
# The project venv (scripts/test.sh makes it), or the active one (tox).
py=${VIRTUAL_ENV:+$VIRTUAL_ENV/bin/python}
py=${py:-.venv/bin/python}
export HYPOTHESIS_PROFILE=explore
start=$(date +%s)
round=0
while :; do
    round=$((round + 1))
    seed=$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')
    echo "== hypothesis explore round ${round}: --hypothesis-seed=${seed}"
    if ! "${py}" -m pytest -p no:cacheprovider -q -m hypothesis --hypothesis-seed="${seed}" "${tests[@]}"; then
        echo "hypothesis explore FAILED with seed ${seed}; replay with:"
        echo "  HYPOTHESIS_PROFILE=explore HYPOTHESIS_EXPLORE_EXAMPLES=${HYPOTHESIS_EXPLORE_EXAMPLES:-2000}" \
             "${py} -m pytest -m hypothesis --hypothesis-seed=${seed} ${tests[*]}"
        exit 1
    fi
    elapsed=$(( $(date +%s) - start ))
    if [ "${elapsed}" -ge "${budget}" ]; then
        echo "hypothesis explore: ${round} round(s), no failure, ${elapsed}s (budget ${budget}s)"
        exit 0
    fi
done
