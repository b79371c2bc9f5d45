"""gifjax.parallel and the data-parallel ``axis_name`` hook of the core.

Multi-device checks run in one subprocess (tests/_parallel_worker.py) with 8
fake CPU devices: XLA_FLAGS must be set before JAX is imported, and this
process already has one device. The rest runs here on that one device: the
hook against no hook (under ``vmap`` with a named axis, which reduces like a
device axis, and under a 1-device ``shard_map``) and the input errors.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gifjax
from gifjax import parallel, solvers

WORKER = pathlib.Path(__file__).with_name("_parallel_worker.py")
TOL = 1e-10


def _apply(p, x, y=None):
    return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]


def _xent(logits, y):
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[..., None], axis=-1)[..., 0]


def _l2(p):
    return sum(jnp.sum(a ** 2) for a in jax.tree_util.tree_leaves(p))


def loss(p, x, y):  # the mean over the local batch (+ L2): what data parallelism needs
    return jnp.mean(_xent(_apply(p, x), y)) + _l2(p)


def example_loss(p, ex):
    return _xent(_apply(p, ex[0][None]), ex[1][None])[0]


def make(dtype=np.float64, n=24):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(n, 4)).astype(dtype), rng.integers(0, 3, n).astype(np.int32)
    params = {"w1": (0.8 * rng.normal(size=(4, 5))).astype(dtype), "b1": np.zeros(5, dtype),
              "w2": (0.8 * rng.normal(size=(5, 3))).astype(dtype)}
    mask = jax.tree_util.tree_map(lambda a: np.arange(a.size).reshape(a.shape) % 3 != 1, params)
    return params, x, y, mask


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def tree_rel(a, b):
    return max(rel(u, v) for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


# ----------------------------------------------------------------------------- 8 devices


def test_sharded_modes_equal_single_device(tmp_path):
    """Query-, data- and both-parallel scores, adjoints and Δ equal one device's, in float64."""
    out = tmp_path / "parallel.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, str(WORKER), str(out)], env=env, capture_output=True,
                          text=True, timeout=900, cwd=WORKER.parent.parent)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(out.read_text())
    assert res["devices"] == 8 and res["ref_converged"]
    expected = {  # mode: (output shape, score spec, solution spec); "()" = replicated
        "query_if_13": ([24, 13], "()", "()"),           # 13 test points on 8: padded, trimmed
        "data_if_1x8": ([22, 5], "()", "()"),            # 22 train points on 8: padded, trimmed
        "both_gif_2x4": ([24, 6], "('data', 'queries')", "('queries',)"),
        "both_auto_if_2x4": ([24, 6], "('data', 'queries')", "('queries',)"),
    }
    for mode, (shape, spec, sol_spec) in expected.items():
        r = res[mode]
        assert r["diff"] <= TOL and r["adjoint_diff"] <= TOL, (mode, r)
        assert (r["shape"], r["spec"], r["solution_spec"], r["converged"]) == (shape, spec, sol_spec, True), (mode, r)
    assert res["adjoint_2x4"]["diff"] <= TOL and res["adjoint_2x4"]["converged"], res["adjoint_2x4"]
    assert res["adjoint_2x4"]["spec"] == "('queries',)"
    assert res["self_2x4"]["diff"] <= TOL and res["self_2x4"]["spec"] == "('queries',)", res["self_2x4"]
    inf = res["influence_2x4"]
    assert inf["diff"] <= TOL and inf["damping_diff"] <= TOL and inf["damping"] > 0, inf
    assert inf["spec"] == "()" and inf["converged"]
    assert res["indivisible_error"] is not None and (
        "gifjax.parallel.influence_scores: bad `*args`: got a Hessian batch of 21 examples; "
        "expected a multiple of the 8 devices on data_axis='data'") in res["indivisible_error"]


# ----------------------------------------------------------------------------- the core hook, one device


def test_axis_name_products_are_the_global_mean_then_damped(x64):
    """vmap with a named axis reduces like devices: 4 shards of 6 give the 24-example product."""
    params, x, y, _ = make()
    v = jax.tree_util.tree_map(lambda a: np.linspace(-1.0, 1.0, a.size).reshape(a.shape), params)
    xs, ys = x.reshape(4, 6, 4), y.reshape(4, 6)
    ggn = gifjax.GGN(_apply, lambda z, x, y: jnp.mean(_xent(z, y)), regularizer=_l2)

    @jax.jit  # one compile, not one per operation
    def products(v):
        out = []
        for kw in [{}, {"chunk_size": 4}, {"curvature": ggn}]:
            local = lambda xd, yd: gifjax.curvature_operator(loss, params, xd, yd, damping=0.3,
                                                             axis_name="d", **kw)(v)
            out.append((gifjax.curvature_operator(loss, params, x, y, damping=0.3, **kw)(v),
                        jax.vmap(local, axis_name="d")(xs, ys)))
        return out

    for want, got in products(v):
        for i in range(4):
            assert tree_rel(jax.tree_util.tree_map(lambda a: a[i], got), want) < 1e-12


def test_axis_name_influence_under_vmap_equals_full_batch(x64):
    params, x, y, mask = make()
    kw = dict(method="gif", mask=mask, solver=solvers.LSTSQ(rtol=1e-11, max_steps=200), damping=0.1)

    @jax.jit
    def both(params):
        g = jax.grad(loss)(params, x[:3], y[:3])
        local = lambda xd, yd: gifjax.influence(loss, params, g, xd, yd, axis_name="d", **kw)
        return (gifjax.influence(loss, params, g, x, y, **kw),
                jax.vmap(local, axis_name="d")(x.reshape(4, 6, 4), y.reshape(4, 6)))

    want, got = both(params)
    assert bool(jnp.all(got.converged))
    assert tree_rel(jax.tree_util.tree_map(lambda a: a[2], got.delta), want.delta) < TOL


def test_one_device_mesh_equals_no_hook(x64):
    """parallel.influence_scores on a 1-device mesh (shard_map, axis_name set) = no hook."""
    params, x, y, mask = make()
    kw = dict(method="fif", mask=mask, solver=solvers.CG(rtol=1e-11, max_steps=200), damping=0.1,
              test_chunk_size=2, train_chunk_size=5)
    mesh = parallel.make_mesh(1, 1)
    assert mesh.axis_names == ("queries", "data") and mesh.devices.size == 1
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    train, test = (x, y), (x[:3], y[:3])
    got = parallel.influence_scores(loss, params, example_loss, train, test, x, y, mesh=mesh,
                                    data_axis="data", **kw)
    want = jax.jit(lambda p: gifjax.influence_scores(loss, p, example_loss, train, test, x, y, **kw))(params)
    assert got.shape == (24, 3) and isinstance(got.sharding, jax.sharding.NamedSharding)
    assert rel(got, want) < TOL


# ----------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def small():
    params, x, y, mask = make(np.float32, n=6)
    return params, x, y, mask, parallel.make_mesh()


def scores(small, **kw):
    params, x, y, _, mesh = small
    kw = {"mesh": mesh} | kw
    return parallel.influence_scores(loss, params, example_loss, (x, y), (x[:2], y[:2]), x, y, **kw)


@pytest.mark.parametrize("kw, match", [
    (dict(mesh="cpu"), r"gifjax\.parallel\.influence_scores: bad `mesh`: got str; expected a jax\.sharding\.Mesh"),
    (dict(query_axis="batch"), r"bad `query_axis`: got 'batch'; expected None or an axis of the mesh \('queries', 'data'\)"),
    (dict(data_axis="batch"), r"bad `data_axis`: got 'batch'; expected None or an axis of the mesh"),
    (dict(query_axis="data", data_axis="data"), r"bad `data_axis`: got 'data'; expected an axis other than query_axis='data'"),
    (dict(method="gift"), r"gifjax\.parallel\.influence_scores: bad `method`: got 'gift'"),
    (dict(solver="newton"), r"gifjax\.parallel\.influence_scores: bad `solver`: got 'newton'"),
    (dict(damping=-1.0), r"gifjax\.parallel\.influence_scores: bad `damping`: got -1\.0; expected a finite number >= 0"),
    (dict(mask={"w1": np.ones((4, 5), bool)}), r"gifjax\.parallel\.influence_scores: bad `mask`: got tree structure"),
])
def test_scores_input_errors(small, kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        scores(small, **kw)


def test_explicit_mesh_is_refused_with_the_fix(small):
    with pytest.raises(ValueError, match=r"bad `mesh`: got .*Explicit.*expected a mesh with AxisType\.Auto "
                                         r"axes\. Fix: build it with gifjax\.parallel\.make_mesh"):
        scores(small, mesh=jax.make_mesh((1,), ("queries",)))


def test_data_errors(small):
    params, x, y, _, mesh = small
    closed = lambda p: loss(p, x, y)
    with pytest.raises(ValueError, match=r"bad `\*args`: got no Hessian batch; expected data sharded over "
                                         r"data_axis='data'\. Fix: pass the Hessian batch as \*args"):
        parallel.influence(closed, params, params, mesh=mesh)
    with pytest.raises(ValueError, match=r"parallel\.influence_scores: bad `test_examples`: got leading axes \['0'\]"):
        parallel.influence_scores(loss, params, example_loss, (x, y), (x[:0], y[:0]), x, y, mesh=mesh)
    with pytest.raises(ValueError, match=r"parallel\.influence_scores: bad `train_examples`: got leading axes \['5', '6'\]"):
        parallel.influence_scores(loss, params, example_loss, (x, y[:5]), (x, y), x, y, mesh=mesh)
    with pytest.raises(ValueError, match=r"gifjax\.parallel\.adjoint_solve: bad `test_grads`: got tree .* "
                                         r"expected params' structure with one leading test axis"):
        parallel.adjoint_solve(loss, params, params, x, y, mesh=mesh)
    with pytest.raises(ValueError, match=r"gifjax\.parallel\.influence: bad `g`: got shape \(2, 5\) at \[.b1.\]"):
        parallel.influence(loss, params, jax.tree_util.tree_map(lambda a: np.stack([a, a]), params),
                           x, y, mesh=mesh)


def test_make_mesh_errors():
    n = jax.device_count()
    with pytest.raises(ValueError, match=r"gifjax\.parallel\.make_mesh: bad `data`: got 0; expected a positive int"):
        parallel.make_mesh(data=0)
    with pytest.raises(ValueError, match=r"gifjax\.parallel\.make_mesh: bad `queries`: got .*; expected a positive "
                                         rf"int with queries \* data <= {n} devices"):
        parallel.make_mesh(queries=n + 1)
