"""Mixed precision (gifjax.mixed_precision): bfloat16 curvature products, float32 solver state.

Tolerances come from bfloat16's machine epsilon ε = 2⁻⁸ (8 significant bits;
unit roundoff ε/2). A product H v goes through a forward, a backward and a
tangent pass of some ten to twenty rounded operations each, so its norm-wise
relative error is a small multiple of ε: we allow 16 ε ≈ 6 % (measured ≈ 3 %
on these tiny models). A solve multiplies that by at most the condition number
κ of H_λ (first-order perturbation bound), so solves are checked at damping
chosen to keep κ small, against κ · 16 ε. Every check also asserts the error
is far *above* float32 rounding, i.e. that the low precision really is in effect.
"""

import re

import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gifjax
from conftest import _l2, _xent, dense_estimate, make_problem, mlp_apply, rel_err

EPS_BF16 = 2.0 ** -8
HVP_TOL = 16 * EPS_BF16
ABOVE_F32 = 1e-4  # float32 products of these models agree with the oracle to ~1e-6


def _hv_error(p, fn, seed=0):
    flat = p.flat(p.params)
    v = jax.random.normal(jax.random.key(seed), flat.shape, flat.dtype)
    hv = jax.jit(lambda v: gifjax.hvp(fn, p.params, v, p.x, p.y))(p.unravel(v))
    H = np.asarray(p.hessian, np.float64)
    return hv, rel_err(p.flat(hv), H @ np.asarray(v, np.float64))


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_bf16_hvp_matches_dense_oracle(kind):
    p = make_problem(kind, jnp.float32)
    hv, err = _hv_error(p, gifjax.mixed_precision(p.loss))
    assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(hv))  # cast back
    assert ABOVE_F32 < err < HVP_TOL, err


def _kappa(p, lam):
    ev = np.linalg.eigvalsh(np.asarray(p.hessian, np.float64))
    return (ev[-1] + lam) / (ev[0] + lam)


@pytest.mark.parametrize("method, solver", [
    ("if", "dense"), ("if", gifjax.solvers.CG(rtol=1e-2)),
    ("gif", "dense"), ("gif", gifjax.solvers.LSTSQ(rtol=1e-2)),
])
def test_bf16_influence_matches_dense_oracle(method, solver):
    p = make_problem("mlp", jnp.float32)
    lam = p.damping + 1.0  # κ(H_λ) ≈ 2.6 on this model
    kappa = _kappa(p, lam)
    assert kappa < 3
    flat = p.flat(p.params)
    on = np.arange(flat.size) % 3 == 0
    mask = p.unravel(jnp.asarray(on))
    g = p.unravel(jax.random.normal(jax.random.key(1), flat.shape))
    M = np.asarray(p.hessian, np.float64) + lam * np.eye(flat.size)
    ref = dense_estimate(M, p.flat(g), method, np.nonzero(on)[0])
    out = jax.jit(lambda g: gifjax.influence(gifjax.mixed_precision(p.loss), p.params, g, p.x, p.y,
                                             mask=mask, method=method, solver=solver, damping=lam))(g)
    err = rel_err(p.flat(out.delta), ref)
    tol = kappa * HVP_TOL + (1e-2 * kappa if solver != "dense" else 0.0)  # + the solver's rtol
    assert bool(out.converged)
    assert ABOVE_F32 < err < tol, (err, tol)


def _walk(jaxpr):
    """Every equation of a jaxpr and of the jaxprs nested in its parameters."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, jcore.ClosedJaxpr):
                    yield from _walk(sub.jaxpr)
                elif isinstance(sub, jcore.Jaxpr):
                    yield from _walk(sub)


@pytest.mark.parametrize("kind, heavy", [("mlp", "dot_general"), ("cnn", "conv_general_dilated")])
def test_products_run_in_bf16_and_return_float32(kind, heavy):
    p = make_problem(kind, jnp.float32)
    low = gifjax.mixed_precision(p.loss)
    v = jax.tree_util.tree_map(jnp.ones_like, p.params)
    for name, product in [("hvp", lambda v: gifjax.hvp(low, p.params, v, p.x, p.y)),
                          ("linearize_hvp", lambda v: gifjax.linearize_hvp(low, p.params, p.x, p.y)(v))]:
        closed = jax.make_jaxpr(product)(v)
        assert {str(a.aval.dtype) for a in closed.jaxpr.invars} == {"float32"}, name
        assert {str(a.aval.dtype) for a in closed.jaxpr.outvars} == {"float32"}, name
        eqns = [e for e in _walk(closed.jaxpr) if e.primitive.name in ("dot_general", heavy)]
        assert len(eqns) >= 3, name  # forward, backward and tangent passes
        for e in eqns:
            dtypes = {str(a.aval.dtype) for a in list(e.invars) + list(e.outvars)}
            assert dtypes == {"bfloat16"}, (name, e)
    # and in what XLA receives: every dot_general of the lowered HVP is bf16 × bf16 → bf16
    text = jax.jit(lambda v: gifjax.hvp(low, p.params, v, p.x, p.y)).lower(v).as_text()
    lines = [line for line in text.splitlines() if "stablehlo.dot_general" in line]
    if kind == "mlp":
        assert lines
    for line in lines:
        assert set(re.findall(r"tensor<[0-9x]*x?(\w+)>", line)) == {"bf16"}, line


def test_solver_state_stays_float32():
    p = make_problem("mlp", jnp.float32)
    low = gifjax.mixed_precision(p.loss)
    g = jax.tree_util.tree_map(jnp.ones_like, p.params)
    solve = lambda g: gifjax.influence(low, p.params, g, p.x, p.y, method="if",
                                       solver=gifjax.solvers.CG(rtol=1e-2), damping=p.damping + 1.0)
    out = jax.jit(solve)(g)
    for tree in (out.delta, out.solution.value):
        assert {a.dtype for a in jax.tree_util.tree_leaves(tree)} == {jnp.dtype("float32")}
    assert out.solution.residual_norm.dtype == jnp.float32
    # the CG loop's carried state (iterate, residual, direction, ‖r‖²) is float32; bf16 lives
    # only inside the products
    loops = [e for e in _walk(jax.make_jaxpr(solve)(g).jaxpr) if e.primitive.name == "while"]
    assert loops
    for loop in loops:
        floats = {str(a.aval.dtype) for a in loop.outvars if "float" in str(a.aval.dtype)}
        assert floats == {"float32"}, floats


def test_float32_products_of_float64_params(x64):
    p = make_problem("mlp", jnp.float32)
    params, x = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), (p.params, p.x))
    v = jax.tree_util.tree_map(lambda a: jnp.cos(jnp.arange(a.size, dtype=jnp.float64).reshape(a.shape)),
                               params)
    hvp = jax.jit(lambda fn, v: gifjax.hvp(fn, params, v, x, p.y), static_argnums=0)
    ref = hvp(p.loss, v)
    got = hvp(gifjax.mixed_precision(p.loss, jnp.float32), v)
    assert all(a.dtype == jnp.float64 for a in jax.tree_util.tree_leaves(got))
    assert 1e-12 < rel_err(p.flat(got), p.flat(ref)) < 16 * 2.0 ** -24  # float32's ε


def test_ggn_spec_wraps_the_model_only():
    p = make_problem("mlp", jnp.float32)
    out_loss = lambda z, x, y: optax.softmax_cross_entropy_with_integer_labels(z, y).mean()
    ggn = gifjax.GGN(mlp_apply_xy, out_loss, regularizer=_l2)
    low = gifjax.mixed_precision(ggn)
    assert isinstance(low, gifjax.GGN) and low.apply_fn is not ggn.apply_fn
    assert low.output_loss is out_loss and low.regularizer is _l2  # full precision, cheap
    v = jax.tree_util.tree_map(jnp.ones_like, p.params)
    product = jax.jit(lambda spec, v: gifjax.ggn_product(spec, p.params, v, p.x, p.y), static_argnums=0)
    ref, got = product(ggn, v), product(low, v)
    assert {a.dtype for a in jax.tree_util.tree_leaves(got)} == {jnp.dtype("float32")}
    assert ABOVE_F32 < rel_err(p.flat(got), p.flat(ref)) < HVP_TOL


def test_bf16_model_inside_a_float32_loss():
    """The recommended use: only the model in bf16; its cross-entropy (and L2) in float32."""
    p = make_problem("mlp", jnp.float32)
    apply16 = gifjax.mixed_precision(mlp_apply)
    logits = apply16(p.params, p.x)
    assert logits.dtype == jnp.float32  # outputs come back in the params' dtype
    loss = lambda q, x, y: jnp.mean(_xent(apply16(q, x), y)) + _l2(q)
    _, err_model = _hv_error(p, loss)
    assert ABOVE_F32 < err_model < HVP_TOL, err_model


def mlp_apply_xy(params, x, y):
    return mlp_apply(params, x)


@pytest.mark.parametrize("dtype, shown", [(jnp.int32, "int32"), ("nope", "'nope'"),
                                          (None, "None"), (jnp.complex64, "complex64")])
def test_bad_dtype(dtype, shown):
    with pytest.raises(ValueError, match=r"gifjax\.mixed_precision: bad `dtype`: got .*"
                                         + re.escape(shown) + r".*floating dtype"):
        gifjax.mixed_precision(lambda p: p, dtype)


def test_bad_loss_fn():
    with pytest.raises(ValueError, match=r"gifjax\.mixed_precision: bad `loss_fn`: got 3"):
        gifjax.mixed_precision(3)
