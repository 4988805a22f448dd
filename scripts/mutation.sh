#!/usr/bin/env bash
# Mutation testing of the sans-I/O core with mutmut 3 (configured in pyproject.toml [tool.mutmut]).
#
#   bash scripts/mutation.sh                 # the protocol modules, one after the other
#   bash scripts/mutation.sh wire.capnp      # one module
#   MUTATION_JOBS=1 bash scripts/mutation.sh # fewer worker processes
#   bash scripts/mutation.sh 'wire.rpc.x_parse_rpc_message__mutmut_*'   # re-check some mutants only
#
# CPU-heavy: it runs niced. Results land in mutants/ (git-ignored); `mutmut results` lists the
# survivors, `mutmut show NAME` shows one. `python scripts/mutation_report.py` then updates the rows and
# sections of docs/mutation-report.md for the modules this run covered (mutants/run-MODULE.txt says when
# and at which commit each was run).
set -euo pipefail
cd "$(dirname "$0")/.."
modules=("$@")
if [ ${#modules[@]} -eq 0 ]; then
    modules=(wire.headers wire.eyeball wire.origin wire.capnp wire.rpc wire.sniff wire.hpack_encoder wire.redact)
fi
# Derandomized hypothesis: the same examples for every mutant, so a kill is reproducible; failures are not
# shrunk (tests/conftest.py, profile "mutation").
export HYPOTHESIS_PROFILE=mutation
# The project venv (scripts/test.sh makes it), or the active one (tox).
py=${VIRTUAL_ENV:+$VIRTUAL_ENV/bin/python}
py=${py:-.venv/bin/python}
jobs=${MUTATION_JOBS:-2}
mkdir -p mutants
for target in "${modules[@]}"; do
    # a module name (all its mutants) or a pattern of mutant names (some of them), as wire.X; mutmut
    # knows them by their import name (tunnel_lab.wire.X)
    case "${target}" in
        *'*'*|*__mutmut_*) module=${target%%.x*}; pattern=tunnel_lab.${target} ;;
        *) module=${target}; pattern="tunnel_lab.${target}.*" ;;
    esac
    echo "== mutmut: ${pattern}"
    commit=$(git rev-parse --short HEAD)
    if [ -n "$(git status --porcelain -- wire tests pyproject.toml)" ]; then
        commit="${commit}+uncommitted"
    fi
    start=$(date -u +%Y-%m-%dT%H:%M:%S+00:00)
    nice -n 15 "${py}" -m mutmut run --max-children "${jobs}" "${pattern}" >/dev/null
    # one line per run of (part of) the module; scripts/mutation_report.py reads them
    echo "start=${start} end=$(date -u +%Y-%m-%dT%H:%M:%S+00:00) commit=${commit} jobs=${jobs} mutants=${pattern}" \
        >> "mutants/run-${module}.txt"
done
"${py}" -m mutmut results
# Mutants mutmut cannot make (module-level tables): scripts/named_mutants.py; fails the run if one survives.
echo "== named mutants"
nice -n 15 "${py}" scripts/named_mutants.py
