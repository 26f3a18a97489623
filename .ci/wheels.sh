#!/usr/bin/env bash
# The four wheels as users get them. Build every wheel once, check its metadata, then install
# into clean, separate virtual environments (the etp-* wheels from the built files, given by
# path; third-party dependencies resolved from PyPI through uv's shared cache) and use them:
#   (a) etp-primitives alone: no sibling, no brainstate; a custom primitive under jit/grad/vmap;
#   (b) etp-compiler + etp-primitives: no learners, no layers; a hand-written brainstate model
#       compiled into an ETraceGraph with the expected hidden state and relations;
#   (c) all four: `import braintrace`, a GRU learning online with D_RTRL, its first step equal
#       to BPTT over that step (float64), later steps finite and non-zero.
# Each environment also passes `uv pip check` and runs the Python examples of the READMEs of its
# distributions, read back from the installed metadata (the PyPI page). Every check runs with
# `python -I` from a temporary directory, and asserts that nothing is imported from this checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
python_version=${ETP_WHEELS_PYTHON:-3.11}  # a version (the Requires-Python floor) or an interpreter path
# ETP_WHEELS_EXPECT: comma-separated name==version pins (a version or a release line, X.Y.*) the full-stack environment must have resolved
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
dist="$work/dist"
run="$work/run"
mkdir -p "$run"
start=$SECONDS

uv build --quiet --all-packages --wheel --out-dir "$dist"
wheel() { compgen -G "$dist/$1-*.whl"; }
prim=$(wheel etp_primitives)
comp=$(wheel etp_compiler)
algo=$(wheel etp_algorithms)
nn=$(wheel etp_nn)

# make_env NAME WHEEL...: a fresh venv holding exactly these wheels and what they require.
make_env() {
    local env="$work/$1"
    shift
    uv venv --quiet --python "$python_version" "$env"
    uv pip install --quiet --python "$env/bin/python" "$@"
    uv pip check --quiet --python "$env/bin/python"
}

# check ENV EXPECTED_ETP_DISTS < python: run stdin with `python -I` in $run; the prelude checks the
# installed etp-* distributions are exactly EXPECTED (from this build's wheel files), defines
# `absent(*modules)` and `run_readme(dist)`.
check() {
    local env="$work/$1"
    (cd "$run" && "$env/bin/python" -I - "$root" "$dist" "$2" 3<&0 <<'PRELUDE'
import importlib.metadata, importlib.util, json, os, re, sys
ROOT, DIST, EXPECTED = sys.argv[1], os.path.realpath(sys.argv[2]), set(sys.argv[3].split(","))
installed = {d.metadata["Name"] for d in importlib.metadata.distributions() if d.metadata["Name"].startswith("etp-")}
assert installed == EXPECTED, f"etp distributions installed: {sorted(installed)}, expected {sorted(EXPECTED)}"
for name in installed:
    url = json.loads(importlib.metadata.distribution(name).read_text("direct_url.json") or "{}").get("url", "")
    assert url.startswith("file://") and os.path.realpath(os.path.dirname(url[len("file://"):])) == DIST, f"{name} not from this build: {url!r}"


def absent(*modules):
    for module in modules:
        assert importlib.util.find_spec(module) is None, f"{module} must not be importable here"


def not_from_checkout(*modules):
    for module in modules:
        path = os.path.realpath(sys.modules[module].__file__)
        assert not path.startswith(ROOT + os.sep), f"{module} imported from the checkout: {path}"


def run_readme(dist):
    """Execute the python blocks of `dist`'s long description, as installed."""
    body = importlib.metadata.metadata(dist).get_payload()
    blocks = re.findall(r"```python\n(.*?)```", body, re.S)
    assert blocks, f"{dist}: no python example in its README"
    for block in blocks:
        exec(compile(block, f"<{dist} README>", "exec"), {"__name__": "__readme__"})


exec(compile(os.fdopen(3).read(), "<check>", "exec"))
PRELUDE
    )
}

echo "--- wheel metadata"
uv run --no-project --quiet --python "$python_version" python .ci/check_dists.py "$dist" --wheels-only

echo "--- (a) etp-primitives alone"
make_env prim "$prim"
check prim etp-primitives <<'PY'
import contextlib, io
import jax
import jax.numpy as jnp
import etp_primitives as etp

absent("etp_compiler", "etp_algorithms", "etp_nn", "braintrace", "brainstate")
not_from_checkout("etp_primitives")
p = etp.register_primitive("etp_wheel_check_mm", lambda x, w, *, scale: scale * (x @ w), batched=True)
assert etp.is_etp_primitive(p) and etp.is_batched_primitive(p)
x, w = jnp.ones((4, 3)), jnp.ones((3, 5))
y = jax.jit(lambda x, w: p.bind(x, w, scale=2.0))(x, w)
assert jnp.allclose(y, 2.0 * x @ w)
g = jax.grad(lambda w: jnp.sum(p.bind(x, w, scale=2.0)))(w)
assert jnp.allclose(g, 2.0 * jnp.ones((3, 1)) * 4.0)
v = jax.vmap(lambda xi: p.bind(xi, w, scale=2.0))(jnp.ones((8, 4, 3)))
assert v.shape == (8, 4, 5)
assert jnp.allclose(etp.matmul(x, w), x @ w)
with contextlib.redirect_stdout(io.StringIO()):
    run_readme("etp-primitives")
print("etp-primitives alone: custom primitive under jit, grad and vmap; README example runs")
PY

echo "--- (b) etp-compiler with etp-primitives"
make_env comp "$comp" "$prim"
check comp etp-primitives,etp-compiler <<'PY'
import contextlib, io, warnings
import brainstate
import jax.numpy as jnp
import etp_primitives as etp
import etp_compiler
from etp_compiler import DiagnosticKind

absent("etp_algorithms", "etp_nn", "braintrace")
not_from_checkout("etp_primitives", "etp_compiler")


class RecurrentLeaky(brainstate.nn.Module):
    """h <- 0.9 h + x W_in + b + tanh(h) W_rec, and a readout h W_out that drives no hidden state."""

    def __init__(self, n_in, n, n_out, batch):
        super().__init__()
        self.w_in = brainstate.ParamState({"weight": jnp.full((n_in, n), 0.1), "bias": jnp.zeros(n)})
        self.w_rec = brainstate.ParamState(jnp.eye(n) * 0.05)
        self.w_out = brainstate.ParamState(jnp.ones((n, n_out)))
        self.h = brainstate.HiddenState(jnp.zeros((batch, n)))

    def update(self, x):
        w = self.w_in.value
        self.h.value = 0.9 * self.h.value + etp.matmul(x, w["weight"], w["bias"]) + etp.matmul(jnp.tanh(self.h.value), self.w_rec.value)
        return etp.matmul(self.h.value, self.w_out.value)


with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    graph = etp_compiler.compile_etrace_graph(RecurrentLeaky(3, 4, 2, batch=2), jnp.ones((2, 3)))
assert [g.hidden_paths for g in graph.hidden_groups] == [(("h",),)], graph.hidden_groups
assert graph.hidden_groups[0].varshape == (2, 4)
relations = {r.weight_path: r for r in graph.hidden_param_op_relations}
assert set(relations) == {("w_in",), ("w_rec",)}, set(relations)
for r in relations.values():
    assert r.connected_hidden_paths == (("h",),) and etp.is_etp_primitive(r.primitive)
records = graph.explain(weight_path=("w_out",), file=io.StringIO())
assert [rec.kind for rec in records] == [DiagnosticKind.RELATION_EXCLUDED_NON_TEMPORAL], records
assert any("w_out" in str(w.message) for w in caught), [str(w.message) for w in caught]


class NoHidden(brainstate.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = brainstate.ParamState(jnp.ones((3, 4)))

    def update(self, x):
        return etp.matmul(x, self.w.value)


try:
    etp_compiler.compile_etrace_graph(NoHidden(), jnp.ones(3))
except etp_compiler.CompilationError as err:
    assert "no hidden state" in str(err), err
else:
    raise AssertionError("a model without hidden state must not compile")
with contextlib.redirect_stdout(io.StringIO()):
    run_readme("etp-compiler")
print("etp-compiler with etp-primitives: hidden state and relations found, readout excluded; README example runs")
PY

echo "--- (c) the full stack"
make_env full "$nn" "$algo" "$comp" "$prim"
check full etp-primitives,etp-compiler,etp-algorithms,etp-nn <<'PY'
import contextlib, io, warnings
import jax

jax.config.update("jax_enable_x64", True)
import brainstate

brainstate.environ.set(precision=64)
import jax.numpy as jnp
import numpy as np
import braintrace

not_from_checkout("braintrace", "etp_nn", "etp_algorithms", "etp_compiler", "etp_primitives")
# The stack this environment was meant to resolve (ETP_WHEELS_EXPECT="jax==0.12.*,brainstate==0.6.*"): a release
# line, not one release, since the wheels take the newest third-party releases their bounds allow (jax 0.12.1 came
# out after 0.12.0.1, the lock's).
for pin in filter(None, os.environ.get("ETP_WHEELS_EXPECT", "").split(",")):
    name, version = pin.split("==")
    found = importlib.metadata.version(name)
    same = found.startswith(version[:-1]) if version.endswith(".*") else found == version
    assert same, f"{name} {found} installed next to the wheels, expected {version}"
print(f"full stack on Python {sys.version.split()[0]}: jax {jax.__version__}, brainstate {brainstate.__version__}")
B, I, H, O, T = 4, 3, 8, 2, 5


class Net(brainstate.nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = braintrace.nn.GRUCell(I, H)
        self.readout = braintrace.nn.Linear(H, O)

    def update(self, x):
        return self.readout(self.rnn(x))


def mse(out, y):
    return jnp.mean((out - y) ** 2)


def rel(a, b):
    return float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-300))


brainstate.random.seed(0)
rng = np.random.default_rng(0)
xs, ys = jnp.asarray(rng.normal(size=(T, B, I))), jnp.asarray(rng.normal(size=(T, B, O)))
model = Net()
brainstate.nn.init_all_states(model, batch_size=B)
params = model.states(brainstate.ParamState)
assert all(leaf.dtype == jnp.float64 for leaf in jax.tree.leaves({k: s.value for k, s in params.items()}))
h0 = jnp.array(model.rnn.h.value)

# BPTT over one step from the initial state: the plain gradient through the model.
bptt = brainstate.transform.grad(lambda x, y: mse(model(x), y), params)(xs[0], ys[0])
brainstate.nn.reset_all_states(model, batch_size=B)
assert jnp.array_equal(model.rnn.h.value, h0)

learner = braintrace.D_RTRL(model)
with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)  # Wr reaches h only through another weight; the readout
    learner.compile_graph(xs[0])
traced = {r.weight_path for r in learner.graph.hidden_param_op_relations}
assert {("rnn", "Wz", "weight"), ("rnn", "Wh", "weight")} <= traced, traced
step = brainstate.transform.jit(brainstate.transform.grad(lambda x, y: mse(learner(x), y), params))
grads = [step(xs[t], ys[t]) for t in range(T)]
assert set(grads[0]) == set(bptt)
for path in bptt:
    for got, want in zip(jax.tree.leaves(grads[0][path]), jax.tree.leaves(bptt[path]), strict=True):
        assert got.dtype == jnp.float64 and rel(got, want) < 1e-10, (path, rel(got, want))
for t, g in enumerate(grads):
    leaves = jax.tree.leaves(g)
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in leaves), t
    assert sum(float(jnp.sum(jnp.abs(leaf))) for leaf in leaves) > 0, t
assert not all(jnp.allclose(a, b) for a, b in zip(jax.tree.leaves(grads[1]), jax.tree.leaves(grads[2]))), "steps equal"
with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    run_readme("etp-algorithms")
    run_readme("etp-nn")
print(f"full stack: braintrace GRU with D_RTRL, step 1 equals BPTT(T=1) in float64, {T} steps finite; README examples run")
PY

echo "wheels ok ($((SECONDS - start)) s)"
