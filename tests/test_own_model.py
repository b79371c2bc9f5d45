"""Issue 16's story end to end (slow): a user's nnx CNN (38,282 parameters) on digits, 64 test points.

The README's recipe — the default solver, a Hessian subsample and damping above |λ_min| — must
finish, report its convergence honestly, and agree with a tight reference where it says converged.
Wall time is measured by ``benchmarks/own_model.py``, not here.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gifjax
from benchmarks.own_model import CNN, train, user_losses
from gifjax.experiments import data


@pytest.fixture(scope="module")
def trained():
    ds = data.load("digits", seed=0, val_fraction=0.0)
    x, y = jnp.asarray(ds.train.x), jnp.asarray(ds.train.y)
    test = (jnp.asarray(ds.test.x[:64]), jnp.asarray(ds.test.y[:64]))
    graphdef, params = train(CNN(nnx.Rngs(0)), x, y, epochs=20)
    assert sum(a.size for a in jax.tree_util.tree_leaves(params)) == 38_282
    return graphdef, params, (x, y), test


def test_the_readme_recipe_finishes_reports_and_agrees_with_a_tight_reference(trained, capsys):
    graphdef, params, (x, y), test = trained
    loss, example_loss = user_losses(graphdef)
    lam_min = float(gifjax.spectrum.eigenvalues(loss, params, x, y, k=1, which="smallest").values[0])
    curvature = gifjax.Curvature(subsample=256, damping=2 * max(-lam_min, 0.05))   # H_λ positive definite
    out = gifjax.influence_scores(loss, params, example_loss, (x, y), test, x, y, curvature=curvature,
                                  return_info=True)
    assert out.scores.shape == (1438, 64) and np.all(np.isfinite(np.asarray(out.scores)))
    converged = np.asarray(out.solution.converged)
    assert converged.sum() >= 48, repr(out)                        # most queries converge …
    assert f"converged {converged.sum()}/64" in capsys.readouterr().err   # … and the bar said how many
    check = gifjax.check_scores(out, loss, params, example_loss, (x, y), test, x, y, curvature=curvature,
                                num_queries=6, reference=gifjax.solvers.MINRES(rtol=1e-6, max_steps=2000))
    print(repr(out), f"λ_min {lam_min:.4f}", check.summary(), sep="\n")
    both = check.converged & check.reference_converged
    assert both.sum() >= 3, check.summary()
    assert np.all(check.spearman[both] >= 0.95), check.summary()
    assert np.all(check.top_k_overlap[both] >= 0.7), check.summary()
