"""Shared fixtures: tiny models with dense Hessian oracles, in float32 and float64."""

from __future__ import annotations

import functools

from typing import NamedTuple

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

# A script run in a subprocess (it sets XLA_FLAGS and float64 for its own process):
# never import it here, not even to look for doctests.
collect_ignore = ["_parallel_worker.py"]

# Exactness tolerances (relative) per dtype: dense float64 references are exact
# to rounding; float32 ones to a few ulps times the condition number.
RTOL = {jnp.float32: 2e-3, jnp.float64: 1e-8}


@pytest.fixture(params=[jnp.float32, jnp.float64], ids=["f32", "f64"])
def dtype(request):
    """Run a test in float32 and in float64 (jax_enable_x64 on for the latter)."""
    with jax.enable_x64(request.param == jnp.float64):
        yield request.param


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield jnp.float64


class Problem(NamedTuple):
    """A tiny model: mean loss, per-example loss, params, data, and its dense Hessian."""

    loss: callable            # loss(params, x, y) -> scalar (mean + L2)
    example_loss: callable    # example_loss(params, (x_i, y_i)) -> scalar (no L2)
    params: dict
    x: jax.Array
    y: jax.Array
    hessian: jax.Array        # dense ∇²loss at params, flattened in ravel_pytree order
    unravel: callable
    damping: float            # smallest λ making H + λI comfortably positive definite

    def flat(self, tree):
        return jax.flatten_util.ravel_pytree(tree)[0]


def _xent(logits, y):
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[..., None], axis=-1)[..., 0]


def _l2(params, wd=1e-2):
    return 0.5 * wd * sum(jnp.sum(p**2) for p in jax.tree_util.tree_leaves(params))


def mlp_apply(params, x):
    h = jnp.tanh(x @ params["dense1"]["kernel"] + params["dense1"]["bias"])
    return h @ params["dense2"]["kernel"] + params["dense2"]["bias"]


def cnn_apply(params, x):
    """x: [N, 5, 5, 1] → conv 3×3 (2 channels, VALID) → tanh → dense to 3 classes."""
    h = jax.lax.conv_general_dilated(x, params["conv"]["kernel"], (1, 1), "VALID",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    h = jnp.tanh(h + params["conv"]["bias"])
    return h.reshape(h.shape[0], -1) @ params["dense"]["kernel"] + params["dense"]["bias"]


@functools.lru_cache(maxsize=None)  # oracles are pure; build each once per session
def make_problem(kind: str, dtype, n: int = 24, seed: int = 0) -> Problem:
    keys = jax.random.split(jax.random.key(seed), 6)
    if kind == "mlp":
        apply = mlp_apply
        x = jax.random.normal(keys[0], (n, 4), dtype)
        params = {
            "dense1": {"kernel": 0.8 * jax.random.normal(keys[1], (4, 6), dtype),
                       "bias": 0.1 * jax.random.normal(keys[2], (6,), dtype)},
            "dense2": {"kernel": 0.8 * jax.random.normal(keys[3], (6, 3), dtype),
                       "bias": jnp.zeros((3,), dtype)},
        }
    elif kind == "cnn":
        apply = cnn_apply
        x = jax.random.normal(keys[0], (n, 5, 5, 1), dtype)
        params = {
            "conv": {"kernel": 0.5 * jax.random.normal(keys[1], (3, 3, 1, 2), dtype),
                     "bias": 0.1 * jax.random.normal(keys[2], (2,), dtype)},
            "dense": {"kernel": 0.5 * jax.random.normal(keys[3], (18, 3), dtype),
                      "bias": jnp.zeros((3,), dtype)},
        }
    else:
        raise ValueError(kind)
    y = jax.random.randint(keys[4], (n,), 0, 3)

    # jitted: a test's own eager jax.grad / evaluation then runs a few compiled programs instead of
    # compiling every primitive separately (inside the library's programs they simply inline)
    @jax.jit
    def loss(p, x, y):
        return jnp.mean(_xent(apply(p, x), y)) + _l2(p)

    @jax.jit
    def example_loss(p, example):
        xi, yi = example
        return _xent(apply(p, xi[None]), yi[None])[0]

    flat, unravel = jax.flatten_util.ravel_pytree(params)
    with jax.enable_x64(True):  # oracle in float64 whatever the run's dtype
        p64 = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
        flat64, unravel64 = jax.flatten_util.ravel_pytree(p64)
        H = jax.jit(jax.hessian(lambda f: loss(unravel64(f), np.asarray(x, np.float64), y)))(flat64)
        lam_min = float(jnp.linalg.eigvalsh(H)[0])
    damping = max(0.0, -lam_min) + 0.05
    return Problem(loss, example_loss, params, x, y, jnp.asarray(H, dtype), unravel, damping)


@pytest.fixture(params=["mlp", "cnn"])
def problem(request, dtype):
    return make_problem(request.param, dtype)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def dense_estimate(M, g, method, idx):
    """Δ from the definitions for a dense curvature matrix M (float64 oracle)."""
    M, g = np.asarray(M, np.float64), np.asarray(g, np.float64)
    if method == "if":
        return np.linalg.solve(M, g)
    out = np.zeros_like(g)
    if method == "pif":
        out[idx] = np.linalg.solve(M, g)[idx]
    elif method == "fif":
        out[idx] = np.linalg.solve(M[np.ix_(idx, idx)], g[idx])
    else:  # gif: argmin over x supported on idx of ‖M x − g‖
        out[idx] = np.linalg.lstsq(M[:, idx], g, rcond=None)[0]
    return out
