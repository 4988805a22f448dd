#!/usr/bin/env bash
# Mutation testing of the sans-I/O core with mutmut 3 (configured in pyproject.toml [tool.mutmut]).
#
#   bash scripts/mutation.sh                 # the five protocol modules, one after the other
#   bash scripts/mutation.sh wire.capnp      # one module
#   MUTATION_JOBS=1 bash scripts/mutation.sh # fewer worker processes
#
# CPU-heavy: it runs niced. Results land in mutants/ (git-ignored); `mutmut results` lists the
# survivors, `mutmut show NAME` shows one. The last report is docs/mutation-report.md.
set -euo pipefail
cd "$(dirname "$0")/.."
modules=("$@")
if [ ${#modules[@]} -eq 0 ]; then
    modules=(wire.headers wire.eyeball wire.origin wire.capnp wire.rpc)
fi
# Derandomized hypothesis: the same examples for every mutant, so a kill is reproducible; failures are not
# shrunk (tests/conftest.py, profile "mutation").
export HYPOTHESIS_PROFILE=mutation
# The project venv (scripts/test.sh makes it), or the active one (tox).
py=${VIRTUAL_ENV:+$VIRTUAL_ENV/bin/python}
py=${py:-.venv/bin/python}
for module in "${modules[@]}"; do
    echo "== mutmut: ${module}"
    nice -n 15 "${py}" -m mutmut run --max-children "${MUTATION_JOBS:-2}" "${module}.*" >/dev/null
done
"${py}" -m mutmut results
# Mutants mutmut cannot make (module-level tables): scripts/named_mutants.py; fails the run if one survives.
echo "== named mutants"
nice -n 15 "${py}" scripts/named_mutants.py
