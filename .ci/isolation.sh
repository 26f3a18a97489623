#!/usr/bin/env bash
# Each package's own tests in an environment holding exactly that package and its declared
# dependencies (locked versions, `uv sync --package NAME` into a temporary environment; the
# workspace's .venv is not touched), plus pytest, pytest-xdist and hypothesis. An import of a
# sibling or third-party distribution the package does not declare fails here as it would for
# a user; tests/test_import_contracts.py checks the same statically.
#
# Test-only additions (kept in step with TEST_ONLY_DEPENDENCIES in tests/test_import_contracts.py):
# the etp-compiler and etp-algorithms tests use etp-nn's layers as subjects, so etp-nn is added
# to those environments WITHOUT its dependencies (etp_nn imports only etp_primitives); the
# compiler's environment therefore still lacks etp-algorithms, which is asserted.
#
# Usage: bash .ci/isolation.sh [--quick] [PACKAGE...]   (default: all four; PYTEST_ADDOPTS is honoured)
#   --quick: collect only (every test module and the sources it imports are imported in the
#            isolated environment, nothing runs): about a minute instead of the full tests.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
start=$SECONDS

quick=0
if [[ ${1:-} == --quick ]]; then
    quick=1
    shift
fi
packages=("$@")
[[ ${#packages[@]} -gt 0 ]] || packages=(etp-primitives etp-compiler etp-algorithms etp-nn)
declare -A test_only=([etp-compiler]=etp-nn [etp-algorithms]=etp-nn)

# Test tools at their locked versions.
uv export --quiet --frozen --all-packages --all-groups --no-hashes --no-emit-workspace --no-header \
    --no-annotate -o "$work/constraints.txt"

for pkg in "${packages[@]}"; do
    [[ -f "packages/$pkg/pyproject.toml" ]] || { echo "no package $pkg" >&2; exit 2; }
    t0=$SECONDS
    env="$work/env-$pkg"
    py="$env/bin/python"
    UV_PROJECT_ENVIRONMENT="$env" uv sync --quiet --locked --package "$pkg" --no-default-groups
    uv pip install --quiet --python "$py" -c "$work/constraints.txt" pytest pytest-xdist hypothesis
    uv pip check --quiet --python "$py"
    extra=${test_only[$pkg]:-}
    if [[ -n $extra ]]; then
        uv pip install --quiet --python "$py" --no-deps -e "packages/$extra"
    fi

    # Workspace siblings that are neither declared (directly or through a sibling) nor test-only
    # must be absent, and so must brainstate where nothing declares it.
    (cd "$work" && "$py" -I - "$root" "$pkg" "$extra" <<'PY'
import importlib.util, sys, tomllib
root, pkg, extra = sys.argv[1], sys.argv[2], sys.argv[3]
names = ["etp-primitives", "etp-compiler", "etp-algorithms", "etp-nn"]
imports = {"etp-primitives": ["etp_primitives"], "etp-compiler": ["etp_compiler"],
           "etp-algorithms": ["etp_algorithms"], "etp-nn": ["etp_nn", "braintrace"]}
def deps(name):
    with open(f"{root}/packages/{name}/pyproject.toml", "rb") as fh:
        reqs = tomllib.load(fh)["project"]["dependencies"]
    return {r.split(">")[0].split("<")[0].split("=")[0].strip() for r in reqs}
closure, todo = set(), [pkg]
while todo:
    name = todo.pop()
    if name not in closure:
        closure.add(name)
        todo.extend(d for d in deps(name) if d in names)
third_party = set().union(*(deps(n) for n in closure)) - set(names)
present = closure | ({extra} if extra else set())
for name in names:
    for mod in imports[name]:
        found = importlib.util.find_spec(mod) is not None
        assert found == (name in present), f"{pkg}: {mod} {'importable' if found else 'missing'}"
if "brainstate" not in third_party:
    assert importlib.util.find_spec("brainstate") is None, f"{pkg}: brainstate installed but not declared"
print(f"{pkg}: environment = {sorted(closure)} + {sorted(third_party)}" + (f" + {extra} (no deps, tests only)" if extra else ""))
PY
    )
    if ((quick)); then
        out=$("$env/bin/pytest" "packages/$pkg/tests" --collect-only -q -p no:cacheprovider 2>&1) || {
            echo "$out"
            exit 1
        }
        tail -n 1 <<<"$out"
        echo "$pkg: isolated test collection passed ($((SECONDS - t0)) s)"
    else
        "$env/bin/pytest" "packages/$pkg/tests" -n auto -q -p no:cacheprovider
        echo "$pkg: isolated tests passed ($((SECONDS - t0)) s)"
    fi
done
echo "isolation ok ($((SECONDS - start)) s)"
