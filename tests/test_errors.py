"""Bad input fails early, names the function and argument, shows got vs expected."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gifjax
from gifjax import _checks, lowrank, masks, parallel, solvers, sweep

PARAMS = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
X = jnp.ones((5, 3))


def loss(p, x):
    return jnp.mean((x @ p["w"] + p["b"]) ** 2) + 0.1 * jnp.sum(p["w"] ** 2)


G = jax.tree_util.tree_map(jnp.ones_like, PARAMS)


def call(g=G, **kw):
    kw = {"mask": None, "method": "gif", "solver": "dense", "damping": 0.0} | kw
    return gifjax.influence(loss, PARAMS, g, X, **kw)


def test_mask_tree_mismatch_names_function_and_prints_both_structures():
    with pytest.raises(ValueError, match=r"(?s)gifjax\.influence: bad `mask`: got tree structure.*'w'.*expected the structure of `params`.*'b'.*'w'"):
        call(mask={"w": jnp.ones((3, 2), bool)})


def test_mask_shape_mismatch():
    with pytest.raises(ValueError, match=r"gifjax\.influence: bad `mask`: got shape \(2, 3\) at \['w'\]; expected shape \(3, 2\)"):
        call(mask={"w": jnp.ones((2, 3), bool), "b": jnp.ones(2, bool)})


def test_non_boolean_mask():
    with pytest.raises(TypeError, match=r"gifjax\.influence: bad `mask`: got dtype float32 at \['b'\]; expected bool"):
        call(mask={"w": jnp.ones((3, 2)), "b": jnp.ones(2)})


def test_empty_mask():
    empty = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, bool), PARAMS)
    with pytest.raises(ValueError, match=r"gifjax\.influence: bad `mask`: got a mask with no True entry"):
        call(mask=empty)


def test_unknown_method():
    with pytest.raises(ValueError, match=r"gifjax\.influence: bad `method`: got 'gift'; expected one of \['fif', 'gif', 'if', 'pif'\]"):
        call(method="gift")


def test_unknown_solver():
    with pytest.raises(ValueError, match=r"gifjax\.influence: bad `solver`: got 'newton'; expected one of \[.*'cg', 'dense', .*'lissa', .*'richardson'\]"):
        call(solver="newton")


@pytest.mark.parametrize("damping", [-0.1, float("nan")])
def test_negative_or_nan_damping(damping):
    with pytest.raises(ValueError, match=r"gifjax\.influence: bad `damping`: got .*; expected a finite number >= 0"):
        call(damping=damping)


def test_g_not_shaped_like_params():
    with pytest.raises(ValueError, match=r"gifjax\.influence: bad `g`: got shape \(6,\) at \['w'\]; expected shape \(3, 2\).*jax\.vmap"):
        call(g={"w": jnp.ones(6), "b": jnp.ones(2)})
    with pytest.raises(ValueError, match=r"gifjax\.influence: bad `g`: got tree structure"):
        call(g=[jnp.ones((3, 2)), jnp.ones(2)])


def test_hvp_vector_not_like_params():
    with pytest.raises(ValueError, match=r"gifjax\.hvp: bad `v`: got shape \(2,\) at \['w'\]"):
        gifjax.hvp(loss, PARAMS, {"w": jnp.ones(2), "b": jnp.ones(2)}, X)


def test_batched_hvp_bad_chunk_and_unbatched_args():
    with pytest.raises(ValueError, match=r"gifjax\.batched_hvp: bad `chunk_size`: got 0; expected a positive int"):
        gifjax.batched_hvp(loss, PARAMS, G, X, chunk_size=0)
    with pytest.raises(ValueError, match=r"gifjax\.batched_hvp: bad `\*args`: got leading axes \['4', '5'\]"):
        gifjax.batched_hvp(lambda p, x, y: loss(p, x), PARAMS, G, X, jnp.ones(4), chunk_size=2)


def test_scores_errors():
    ex_loss = lambda p, x: loss(p, x[None])
    with pytest.raises(ValueError, match=r"gifjax\.influence_scores: bad `method`: got 'loo'"):
        gifjax.influence_scores(loss, PARAMS, ex_loss, X, X, X, method="loo")
    with pytest.raises(ValueError, match=r"gifjax\.influence_scores: bad `chunk size`: got -1"):
        gifjax.influence_scores(loss, PARAMS, ex_loss, X, X, X, test_chunk_size=-1)
    with pytest.raises(ValueError, match=r"gifjax\.influence_scores: bad `test_examples`: got no examples"):
        gifjax.influence_scores(loss, PARAMS, ex_loss, X, X[:0], X)


def test_masks_validate_is_usable_directly():
    with pytest.raises(ValueError, match=r"gifjax\.masks\.validate: bad `mask`"):
        masks.validate({"w": jnp.ones((3, 2), bool)}, PARAMS)



# ----------------------------------------------------------------------------- NumPy scalars

EX_LOSS = lambda p, x: loss(p, x[None])  # noqa: E731


def test_numpy_integer_scalars_are_accepted_where_ints_are():
    i = np.int64
    ref = call(method="if").delta
    got = call(method="if", chunk_size=i(2)).delta  # Curvature chunk_size (normalised to int)
    np.testing.assert_allclose(got["w"], ref["w"], rtol=1e-5)
    auto = gifjax.AutoDamping(0.1, num_samples=np.int32(2))
    assert np.isfinite(float(call(damping=auto).damping))
    scores = gifjax.influence_scores(loss, PARAMS, EX_LOSS, X, X[:2], X, train_chunk_size=i(2),
                                     test_chunk_size=i(1), solver="dense")
    assert scores.shape == (5, 2)
    out = sweep.score_stream(loss, PARAMS, EX_LOSS, X, X[:2], X, top_k=i(2), train_chunk_size=i(2),
                             solver="dense", progress=False)
    assert out.top_indices.shape == (2, 2)
    assert np.isfinite(gifjax.removal_gradient(loss, PARAMS, X[:1], num_train=i(5))["w"]).all()
    assert int(lowrank.factorize(loss, PARAMS, X, method="if", rank=i(2), num_steps=i(3),
                                 damping=0.1).values.shape[0]) == 2
    assert parallel.make_mesh(data=i(1)).shape["data"] == 1
    assert _checks.as_int(jnp.int32(3)) == 3 and _checks.as_int(np.uint8(3)) == 3


@pytest.mark.parametrize("bad", [np.float64(2.0), 2.0, True, np.bool_(True), "2", np.array([2])])
def test_floats_bools_and_arrays_are_not_ints(bad):
    with pytest.raises(ValueError, match=r"gifjax\.sweep\.score_stream: bad `top_k`: got .*; expected a positive int"):
        sweep.score_stream(loss, PARAMS, EX_LOSS, X, X[:2], X, top_k=bad, progress=False)


# ----------------------------------------------------------------------------- solver configuration

def test_solver_config_accepts_numpy_scalars_and_normalises_ints():
    got = _checks.check_solver_config("solvers.CG", rtol=np.float32(1e-6), atol=0.0,
                                      max_steps=np.int64(50), restarts=np.int32(0))
    assert got["max_steps"] == 50 and type(got["max_steps"]) is int and type(got["restarts"]) is int
    assert _checks.check_solver_config("solvers.CG", rtol=None, max_steps=None) == {"rtol": None, "max_steps": None}
    jax.jit(lambda r: _checks.check_solver_config("solvers.CG", rtol=r)["rtol"])(1e-3)  # tracers pass


@pytest.mark.parametrize("field, value, expected", [
    ("max_steps", -3, r"None or a positive int"),
    ("max_steps", 0, r"None or a positive int"),
    ("max_steps", 10.0, r"None or a positive int"),
    ("max_steps", np.float32(10), r"None or a positive int"),
    ("max_steps", True, r"None or a positive int"),
    ("num_steps", 2.5, r"a positive int"),
    ("restarts", -1, r"an int >= 0"),
    ("rtol", float("nan"), r"None or a finite real number >= 0"),
    ("rtol", -1e-3, r"None or a finite real number >= 0"),
    ("rtol", "tight", r"None or a finite real number >= 0"),
    ("atol", np.float32("nan"), r"None or a finite real number >= 0"),
    ("atol", float("inf"), r"None or a finite real number >= 0"),
    ("rcond", float("nan"), r"None or a finite real number >= 0"),
    ("scale", 0, r"None or a finite real number > 0"),
    ("damping", -0.5, r"a finite real number >= 0"),
])
def test_solver_config_rejects_malformed_fields(field, value, expected):
    with pytest.raises(ValueError, match=rf"gifjax\.solvers\.CG: bad `{field}`: got .*; expected {expected}\. Fix: pass e\.g\. {field}="):
        _checks.check_solver_config("solvers.CG", **{field: value})


@pytest.mark.parametrize("solver, field", [
    (solvers.CG(max_steps=-1), "max_steps"), (solvers.CG(max_steps=2.0), "max_steps"),
    (solvers.CG(rtol=float("nan")), "rtol"), (solvers.LSTSQ(atol=float("nan")), "atol"),
    (solvers.Dense(rcond=float("nan")), "rcond"), (solvers.LiSSA(num_steps=-5), "num_steps"),
    (solvers.LiSSA(scale=0.0), "scale"), (solvers.Richardson(max_steps=1.5), "max_steps"),
])
def test_check_solver_reads_the_solver_dataclasses(solver, field):
    """The helper solvers.py calls on its values (``Solver.init``): every field it knows is checked."""
    name = f"solvers.{type(solver).__name__}"
    with pytest.raises(ValueError, match=rf"gifjax\.{name}: bad `{field}`"):
        _checks.check_solver(name, solver)
    fine = dataclasses.replace(solver, **{field: dataclasses.replace(type(solver)()).__dict__[field]})
    _checks.check_solver(name, fine)  # the defaults pass


def test_lissa_scale_zero_is_a_clear_error():
    with pytest.raises(ValueError, match=r"gifjax\.solvers\.LiSSA: bad `scale`: got 0"):
        call(method="if", solver=solvers.LiSSA(scale=0))


# ----------------------------------------------------------------------------- data and dtypes

def test_train_examples_leading_axis_mismatch_is_reported_as_such():
    pair = (X, jnp.ones(4))  # 5 inputs, 4 labels
    ex = lambda p, xy: loss(p, xy[0][None])  # noqa: E731
    with pytest.raises(ValueError, match=r"gifjax\.influence_scores: bad `train_examples`: got leading axes \['4', '5'\]"):
        gifjax.influence_scores(loss, PARAMS, ex, pair, (X[:2], jnp.ones(2)), X, solver="dense")
    with pytest.raises(ValueError, match=r"gifjax\.sweep\.score_stream: bad `train_examples`: got leading axes \['4', '5'\]"):
        sweep.score_stream(loss, PARAMS, ex, pair, (X[:2], jnp.ones(2)), X, solver="dense", progress=False)


def test_g_dtype_mismatch_is_a_clear_early_error():
    g16 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float16), G)
    with pytest.raises(TypeError, match=r"gifjax\.influence: bad `g`: got dtype float16 at \['b'\]; expected dtype float32 \(as in `params`\)\. Fix: cast `g`"):
        call(g=g16)
    with pytest.raises(TypeError, match=r"gifjax\.adjoint_solve: bad `test_grad`: got dtype float16"):
        gifjax.adjoint_solve(loss, PARAMS, g16, X, solver="dense")
    with pytest.raises(TypeError, match=r"gifjax\.hvp: bad `v`: got dtype float16 at \['b'\]"):
        gifjax.hvp(loss, PARAMS, g16, X)
    # weak types and Python scalars are not "mismatched": they follow params
    call(g={"w": jnp.ones((3, 2)), "b": jnp.asarray([1.0, 2.0]) * 1.0})
    assert gifjax.hvp(lambda w: w ** 2, 1.0, 1.0) == 2.0


@pytest.mark.parametrize("f", [lambda: call(damping=None),
                               lambda: gifjax.resolve_damping(loss, PARAMS, X, damping=None)],
                         ids=["influence", "resolve_damping"])
def test_damping_none_is_a_clear_error(f):
    with pytest.raises(ValueError, match=r"gifjax\.(influence|resolve_damping): bad `damping`: got None; expected a number >= 0 or gifjax\.AutoDamping\(\.\.\.\)\. Fix: pass damping=0\.01"):
        f()


def test_auto_damping_num_samples():
    with pytest.raises(ValueError, match=r"gifjax\.influence: bad `damping\.num_samples`: got 0; expected a positive int"):
        call(damping=gifjax.AutoDamping(0.1, num_samples=0))


# ----------------------------------------------------------------------------- lowrank

@pytest.mark.parametrize("kw, pattern", [
    (dict(rank=0), r"bad `rank`: got 0; expected a positive int"),
    (dict(rank=2.0), r"bad `rank`: got 2\.0; expected a positive int"),
    (dict(rank=99), r"bad `rank`: got 99; expected at most the dimension 8\. Fix: pass rank <= 8"),
    (dict(rank=5, num_steps=4), r"bad `rank`: got 5; expected at most num_steps = 4"),
    (dict(rank=2, num_steps=99), r"bad `num_steps`: got 99; expected at most the dimension 8"),
    (dict(rank=2, num_steps=-1), r"bad `num_steps`: got -1; expected a positive int"),
])
def test_factorize_rank_errors_name_the_argument_passed(kw, pattern):
    with pytest.raises(ValueError, match=r"gifjax\.lowrank\.factorize: " + pattern):
        lowrank.factorize(loss, PARAMS, X, method="if", damping=0.1, **kw)


def test_lowrank_lanczos_defaults_rank_without_blaming_it():
    with pytest.raises(ValueError, match=r"gifjax\.lowrank\.lanczos: bad `num_steps`: got 0"):
        lowrank.lanczos(lambda v: v, jnp.ones(3), num_steps=0)


def test_lowrank_save_then_load_the_same_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    f = lowrank.factorize(loss, PARAMS, X, method="gif", rank=3, damping=0.1)
    lowrank.save("x", f)                 # numpy writes x.npz
    for name in ("x", "x.npz", tmp_path / "x"):
        back = lowrank.load(name, PARAMS)
        np.testing.assert_array_equal(back.values, f.values)
        assert back.method == "gif"
    half = dataclasses.replace(f, values=f.values.astype(jnp.bfloat16),
                               left=jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), f.left))
    lowrank.save(tmp_path / "half.npz", half)
    back = lowrank.load(tmp_path / "half", PARAMS)
    assert back.values.dtype == jnp.bfloat16 and back.left["w"].dtype == jnp.bfloat16
    with pytest.raises(FileNotFoundError, match=r"gifjax\.lowrank\.load: bad `path`: got 'nope'; expected a file written by gifjax\.lowrank\.save \(looked for 'nope' and 'nope\.npz'\)"):
        lowrank.load("nope", PARAMS)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=r"gifjax\.lowrank\.load: bad `path`: got 'junk\.npz'.*damaged or not an \.npz"):
        lowrank.load("junk", PARAMS)


def _pair_loss(p, example):
    x, y = example
    return (x @ p["w"] + p["b"] - y) @ (x @ p["w"] + p["b"] - y)


def _batch_loss(p, example):  # written for a batch: one loss per row
    x, y = example
    return jnp.sum((x @ p["w"] + p["b"] - y) ** 2, axis=-1)


Y = jnp.zeros((5, 2))


@pytest.mark.parametrize("call_", ["influence_scores", "self_influence", "score_stream"])
def test_bare_array_examples_name_the_argument_and_the_fix(call_):
    run = {"influence_scores": lambda e: gifjax.influence_scores(loss, PARAMS, _pair_loss, e, (X, Y), X, damping=1.0),
           "self_influence": lambda e: gifjax.self_influence(loss, PARAMS, _pair_loss, e, X, damping=1.0),
           "score_stream": lambda e: sweep.score_stream(loss, PARAMS, _pair_loss, e, (X, Y), X, damping=1.0,
                                                        progress=False)}[call_]
    arg = "examples" if call_ == "self_influence" else "train_examples"
    with pytest.raises(ValueError, match=(rf"(?s)gifjax\.(sweep\.)?{call_}: bad `example_loss_fn`: got ValueError: "
                                          rf"too many values to unpack.*one example of `{arg}` is float32\[3\].*"
                                          rf"pass `{arg}=\(x, y\)`, not `x` alone")) as info:
        run(X)
    assert isinstance(info.value.__cause__, ValueError)   # the user's own error is chained, not lost
    run((X, Y))                                           # the right structure runs


def test_bare_array_test_examples():
    with pytest.raises(ValueError, match=r"gifjax\.influence_scores: bad `example_loss_fn`.*one example of `test_examples`"):
        gifjax.influence_scores(loss, PARAMS, _pair_loss, (X, Y), X, X, damping=1.0)


def test_example_loss_written_for_a_batch():
    with pytest.raises(ValueError, match=(r"(?s)gifjax\.self_influence: bad `example_loss_fn`: got output float32\[1\] "
                                          r"for one example.*expected a scalar loss per example.*a\[None\]")):
        gifjax.self_influence(loss, PARAMS, lambda p, e: _batch_loss(p, e)[None], (X, Y), X, damping=1.0)
    per_row = lambda p, e: _batch_loss(p, jax.tree.map(lambda a: a[None], e))[0]   # the suggested wrapper
    assert gifjax.self_influence(loss, PARAMS, per_row, (X, Y), X, damping=1.0).shape == (5,)
