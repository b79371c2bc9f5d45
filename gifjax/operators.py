r"""Curvature operators as values: a frozen spec resolves into a linear operator.

The middle layer between the curvature products (:mod:`gifjax.curvature`)
and the solvers (:mod:`gifjax.solvers`). Three small values:

* :class:`Curvature` — *which* curvature: the Hessian of ``loss_fn`` or a
  :class:`gifjax.GGN`; micro-batch chunking; data-parallel ``axis_name``;
  damping λ (a number or :class:`AutoDamping`). ``spec.resolve(loss_fn,
  params, *args)`` returns the damped operator C_λ = C + λI.
* :class:`LinearOperator` — a matvec, its transpose, and structure tags
  (``symmetric``, ``psd``); ``op.sample(key, size)`` is the same operator on a
  random minibatch of ``size`` examples (stochastic LiSSA), an explicit value
  rather than a hidden keyword.
* :class:`Estimator` — ``(method, mask)``; ``estimator.problem(C)`` reads the
  estimator table below and returns the :class:`Problem` to hand a solver.

The estimator table (forward problems; P the element mask, C_λ the damped
curvature). It is :data:`ESTIMATORS`, the one place these facts live:

======= ===============  =========  ======  ======  ==========================
method  form             operator   rhs     answer  Δ
======= ===============  =========  ======  ======  ==========================
``if``  symmetric        C_λ        g       x       C_λ⁻¹ g
``pif`` symmetric        C_λ        g       P x     P C_λ⁻¹ g
``fif`` symmetric        P C_λ P    P g     P x     [C_λ]_tt⁻¹ g_t
``gif`` least squares    C_λ P      g       P x     argmin_{x=Px} ‖C_λ x − g‖
======= ===============  =========  ======  ======  ==========================

The *adjoint* problem (one solve per test point for influence scores,
∇ᵀΔ(g) = sᵀg) is the transpose, :attr:`Problem.T`: the operator transposed,
rhs and answer maps swapped, least squares ↔ minimum norm. For GIF that is
min ‖s‖ s.t. P C_λ s = P∇, because (C_λ P)⁺ᵀ = (P C_λ)⁺.

Example:
    >>> import jax.numpy as jnp, gifjax
    >>> from gifjax import operators
    >>> loss = lambda w: 0.5 * jnp.sum(jnp.array([1.0, 2.0, 3.0]) * w ** 2)
    >>> C = operators.Curvature(damping=0.5).resolve(loss, jnp.zeros(3))
    >>> C(jnp.ones(3)), C.symmetric
    (Array([1.5, 2.5, 3.5], dtype=float32), True)
    >>> problem = operators.Estimator("gif", jnp.array([True, False, True])).problem(C)
    >>> problem.form, problem.T.form
    ('least_squares', 'min_norm')
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from . import _checks, _repr, _tree
from . import curvature as _curv
from . import masks as _masks

__all__ = ["AutoDamping", "Curvature", "ESTIMATORS", "Estimator", "FORMS", "LinearOperator",
           "METHODS", "Problem", "curvature_operator", "hessian_operator", "resolve_damping"]

METHODS = ("if", "pif", "fif", "gif")
FORMS = ("symmetric", "least_squares", "min_norm")
_TRANSPOSED_FORM = {"symmetric": "symmetric", "least_squares": "min_norm", "min_norm": "least_squares"}

tree_map = jax.tree_util.tree_map


# ----------------------------------------------------------------------------- linear operators


@dataclasses.dataclass(frozen=True)
class LinearOperator:
    r"""A linear map on parameter-shaped pytrees, with its transpose and structure tags.

    Fields:
      matvec: ``v ↦ A v``.
      rmatvec: ``u ↦ Aᵀ u``; ``None`` means A is symmetric (Aᵀ = A).
      symmetric, psd: structure tags (static); ``psd`` promises vᵀAv ≥ 0.
      sample: ``sample(key, size) → LinearOperator`` — the same operator on a
        random minibatch of ``size`` examples, or ``None`` when it has no data
        to sample (explicit stochastic products, e.g. for stochastic LiSSA).
      damping: the λ included in A (reported in results).
      domain, codomain: element masks of A's input and output spaces
        (``None``: all parameters), used by Krylov starts and restarts.
      name: what A is, e.g. ``"C"``, ``"PCP"``, ``"CP"``, ``"PC"`` (checked
        by :class:`gifjax.lowrank.LowRank` against its factors' operator).
      curvature: ``"hessian"`` or ``"ggn"``.
      conv_layout: rewrite convolutions into XLA:CPU's fast layout where
        the operator enters a solver loop (no-op off CPU; ``False`` opts out).
      like: a pytree like A's input vectors (shapes and dtypes; e.g. the
        parameters), for solvers that materialise or factorise A.

    ``op(v)`` applies A; ``op.T`` is the transposed operator.
    """

    matvec: Callable
    rmatvec: Callable | None = None
    symmetric: bool = False
    psd: bool = False
    sample: Callable | None = None
    damping: Any = 0.0
    domain: Any = None
    codomain: Any = None
    name: str = "A"
    curvature: str = "hessian"
    conv_layout: bool = True
    like: Any = None

    def __call__(self, v):
        return self.matvec(v)

    def transpose_matvec(self, u):
        """Aᵀ u."""
        return (self.matvec if self.rmatvec is None else self.rmatvec)(u)

    @property
    def T(self) -> "LinearOperator":
        """The transposed operator Aᵀ (``self`` when symmetric)."""
        if self.rmatvec is None:
            return self
        sample = None if self.sample is None else (lambda key, size: self.sample(key, size).T)
        name = _TRANSPOSED_NAME.get(self.name, self.name + "ᵀ")
        return dataclasses.replace(self, matvec=self.rmatvec, rmatvec=self.matvec, sample=sample,
                                   domain=self.codomain, codomain=self.domain, name=name)


_TRANSPOSED_NAME = {"CP": "PC", "PC": "CP"}


def masked(op: LinearOperator, mask, *, left: bool, right: bool) -> LinearOperator:
    """P_left · op · P_right for an element mask (symmetric only when both or neither side)."""
    if not (left or right):
        return op
    P = lambda v: _masks.apply(mask, v)
    L = P if left else (lambda v: v)
    R = P if right else (lambda v: v)
    matvec = lambda v: L(op(R(v)))
    symmetric = op.symmetric and left == right
    rmatvec = None if symmetric else (lambda u: R(op.transpose_matvec(L(u))))
    sample = None if op.sample is None else (
        lambda key, size: masked(op.sample(key, size), mask, left=left, right=right))
    name = ("P" if left else "") + op.name + ("P" if right else "")
    return dataclasses.replace(op, matvec=matvec, rmatvec=rmatvec, symmetric=symmetric,
                               psd=symmetric and op.psd, sample=sample,
                               domain=mask if right else op.domain,
                               codomain=mask if left else op.codomain, name=name)


# ----------------------------------------------------------------------------- damping


@_tree.pytree_dataclass(static=("num_samples",))
class AutoDamping:
    r"""Damping as a fraction of the mean eigenvalue: ``damping=gifjax.AutoDamping(0.1, key=k)``.

        λ = fraction · max(tr(P C P), 0) / \|t\|,

    C the curvature (Hessian or GGN), P the mask for ``fif`` / ``gif`` (all
    parameters, \|t\| = p, for ``if`` / ``pif``), the trace by
    :func:`gifjax.hutchinson_trace` with ``num_samples`` Rademacher probes
    drawn from ``key`` — deterministic given the key. The resolved λ is
    reported as ``damping`` in :class:`gifjax.Influence` / :class:`gifjax.Scores`,
    or get it with :func:`resolve_damping`.

    Fields: ``fraction`` (traced, ≥ 0), ``num_samples`` (static),
    ``key`` (traced; default ``jax.random.key(0)``).

    Example:
      >>> import jax, jax.numpy as jnp, gifjax
      >>> loss = lambda w: 0.5 * jnp.sum(jnp.arange(1.0, 5.0) * w ** 2)
      >>> float(gifjax.resolve_damping(loss, jnp.zeros(4), damping=gifjax.AutoDamping(0.1)))
      0.25

    Warning:
      The mean eigenvalue of a deep-network Hessian is dominated by a few
      large outliers and the bulk sits near 0 (or below): the same fraction
      means different things on different models; Hutchinson's error is
      ∝ 1/sqrt(num_samples). Where the trace is negative λ becomes 0.
    """

    fraction: Any = 0.1
    num_samples: int = 16
    key: Any = None

    def resolve(self, C: Callable, params, trace_mask=None):
        """λ for the undamped curvature operator ``C`` (mean eigenvalue on ``trace_mask``)."""
        key = jax.random.key(0) if self.key is None else self.key
        trace = _curv.hutchinson_trace(C, params, key=key, num_samples=self.num_samples, mask=trace_mask)
        count = _masks.size(params) if trace_mask is None else _masks.count(trace_mask)
        return self.fraction * jnp.maximum(trace, 0) / count


def _check_damping(fn: str, damping):
    if isinstance(damping, AutoDamping):
        _checks.check_nonnegative(fn, "damping.fraction", damping.fraction)
        num = _checks.check_positive_int(fn, "damping.num_samples", damping.num_samples,
                                         example="AutoDamping(0.1, num_samples=16)")
        if type(damping.num_samples) is not int:  # a NumPy integer: normalise (static, hashed)
            damping = dataclasses.replace(damping, num_samples=num)
        return damping
    try:
        if damping is None or isinstance(damping, (str, bool)):
            raise TypeError
        jnp.asarray(damping, dtype=float)
    except (TypeError, ValueError):
        raise _checks.error(fn, "damping", repr(damping), "a number >= 0 or gifjax.AutoDamping(...)",
                            "pass damping=0.01 or damping=gifjax.AutoDamping(0.1, key=key).") from None
    _checks.check_nonnegative(fn, "damping", damping)
    return damping


def _damp(op: Callable, lam) -> Callable:
    if isinstance(lam, (int, float)) and lam == 0:
        return op
    return lambda v: _tree.axpy(lam, v, op(v))


# ----------------------------------------------------------------------------- the curvature spec


@_tree.pytree_dataclass(static=("ggn", "chunk_size", "axis_name", "conv_layout", "subsample"))
class Curvature:
    r"""Which curvature, and how to take its products: ``spec.resolve(loss_fn, params, *args)``.

    C = ∇²loss_fn(params, \*args) (Hessian, the default) or, with ``ggn``, the
    Gauss–Newton matrix Jᵀ H_out J of :class:`gifjax.GGN`; the resolved
    operator is C_λ = C + λI.

    Fields:
      ggn: ``None`` (Hessian) or a :class:`gifjax.GGN` spec (static).
      damping: λ ≥ 0 or :class:`AutoDamping` (traced).
      chunk_size: Hessian products averaged over fixed-size chunks of
        ``args`` (bounded memory; static; not with a GGN).
      axis_name: data parallelism (static): inside ``jax.shard_map`` /
        named ``vmap``, ``args`` is this device's equal-sized shard and every
        product — full or sampled — is ``pmean`` ed over the axis *before*
        λ is added once: C v = (1/D) Σ_d C_d v + λv. This is the global
        curvature of the mean loss only if ``loss_fn`` is the mean over its
        batch and all shards have the same size. Every device must run the
        same sequence of products (solvers do: their decisions read only
        reduced values).
      conv_layout: rewrite convolutions for XLA:CPU where the operator enters
        a solver loop (default ``True``; see ``gifjax._conv_layout``).
      subsample: if set (static), C is the curvature on a fixed random subset
        of ``subsample`` examples of ``args`` (drawn without replacement from
        ``jax.random.key(0)``; all of them when there are fewer): every
        product, the sampled ones and :class:`AutoDamping`'s trace cost that
        many examples instead of n. Each product's cost is proportional to the
        examples it averages over, so this is the knob that makes a solve on a
        large training set affordable; a few hundred examples are usually
        enough for a curvature estimate (Koh & Liang 2017; Lyu et al. 2024 use
        subsets), and ``subsample`` larger than n changes nothing.

    The public functions build this value from their ``curvature``,
    ``damping``, ``chunk_size`` and ``axis_name`` keywords; pass a
    ``Curvature`` as ``curvature=`` to set all at once.

    Example:
      >>> import jax.numpy as jnp, gifjax
      >>> loss = lambda w, x: jnp.mean((x * w) ** 2)
      >>> C = gifjax.operators.Curvature(chunk_size=2).resolve(loss, 1.0, jnp.arange(4.0))
      >>> float(C(1.0))    # 2·mean(x²) = 7
      7.0
    """

    ggn: Any = None
    damping: Any = 0.0
    chunk_size: int | None = None
    axis_name: str | None = None
    conv_layout: bool = True
    subsample: int | None = None

    @property
    def kind(self) -> str:
        return "hessian" if self.ggn is None else "ggn"

    def replace(self, **changes) -> "Curvature":
        return dataclasses.replace(self, **changes)

    def check(self, fn: str = "operators.Curvature") -> "Curvature":
        """Validate the fields in Python (clear errors before any tracing)."""
        if self.ggn is not None:
            _curv.check_ggn(fn, self.ggn)
            if self.chunk_size is not None:
                raise _checks.error(fn, "chunk_size", self.chunk_size, "None with a GGN curvature",
                                    "drop chunk_size (GGN products are linearised over the whole batch), "
                                    "or use curvature='hessian'.")
        changes = {}
        for field, example in (("chunk_size", "chunk_size=256"), ("subsample", "Curvature(subsample=512)")):
            value = getattr(self, field)
            if value is not None:
                size = _checks.check_positive_int(fn, field, value, example=example)
                if type(value) is not int:  # NumPy integers are normalised (a static field)
                    changes[field] = size
        damping = _check_damping(fn, self.damping)
        if damping is not self.damping:
            changes["damping"] = damping
        return self.replace(**changes) if changes else self

    def undamped(self, loss_fn: Callable, params, *args) -> tuple[Callable, Callable | None]:
        """(v ↦ C v, sample) without damping; ``sample(key, size)`` gives minibatch products."""
        args = self.subsampled(args)
        if self.ggn is None:
            if self.chunk_size is None:
                full = _curv.linearize_hvp(loss_fn, params, *args)
            else:
                full = _curv.batched_hvp_fn(loss_fn, params, *args, chunk_size=self.chunk_size)
            product = lambda v, *sub: _curv.hvp(loss_fn, params, v, *sub)
        else:
            full = _curv.linearize_ggn(self.ggn, params, *args)
            product = lambda v, *sub: _curv.ggn_product(self.ggn, params, v, *sub)
        reduce = (lambda f: f) if self.axis_name is None else (
            lambda f: (lambda v: jax.lax.pmean(f(v), self.axis_name)))
        leaves = jax.tree_util.tree_leaves(args)
        sample = None
        if leaves:
            n = _curv.batch_size_of("operators.Curvature.resolve", args)

            def sample(key, size):
                idx = jax.random.choice(key, n, (min(size, n),), replace=False)
                sub = tree_map(lambda a: a[idx], args)
                return reduce(lambda v: product(v, *sub))

        return reduce(full), sample

    def subsampled(self, args):
        """``args`` restricted to the fixed random subset of :attr:`subsample` examples (or all)."""
        if self.subsample is None or not jax.tree_util.tree_leaves(args):
            return args
        n = _curv.batch_size_of("operators.Curvature.resolve", args)
        if self.subsample >= n:
            return args
        idx = jax.random.choice(jax.random.key(0), n, (self.subsample,), replace=False)
        return tree_map(lambda a: a[idx], args)

    def resolve(self, loss_fn: Callable, params, *args, trace_mask=None) -> LinearOperator:
        """The damped operator C_λ at ``params`` on data ``args`` (symmetric; PSD tag for a GGN).

        ``trace_mask`` is the mask :class:`AutoDamping` averages the
        eigenvalues over (:attr:`Estimator.trace_mask`).
        """
        self = self.check()  # noqa: PLW0642 — the checked (normalised) spec
        C, sample = self.undamped(loss_fn, params, *args)
        lam = self.damping
        if isinstance(lam, AutoDamping):
            lam = lam.resolve(C, params, trace_mask)
        damped_sample = None if sample is None else (
            lambda key, size: LinearOperator(_damp(sample(key, size), lam), symmetric=True,
                                             psd=self.ggn is not None, damping=lam,
                                             curvature=self.kind, name="C",
                                             conv_layout=self.conv_layout, like=params))
        return LinearOperator(_damp(C, lam), symmetric=True, psd=self.ggn is not None,
                              sample=damped_sample, damping=jnp.asarray(lam), name="C",
                              curvature=self.kind, conv_layout=self.conv_layout, like=params)


def curvature_spec(fn: str, curvature="hessian", *, damping=0.0, chunk_size=None,
                   axis_name=None) -> Curvature:
    """The :class:`Curvature` behind the public keywords (checked; a ``Curvature`` passes through).

    With ``curvature=Curvature(...)``, keywords given explicitly (non-default)
    override its fields.
    """
    if isinstance(curvature, Curvature):
        spec = curvature
        changes = {k: v for k, v in (("chunk_size", chunk_size), ("axis_name", axis_name))
                   if v is not None}
        if not (isinstance(damping, (int, float)) and not isinstance(damping, bool) and damping == 0):
            changes["damping"] = damping
        spec = spec.replace(**changes)
    elif isinstance(curvature, str) and curvature == "hessian":
        spec = Curvature(None, damping, chunk_size, axis_name)
    else:
        _curv.check_ggn(fn, curvature)
        spec = Curvature(curvature, damping, chunk_size, axis_name)
    return spec.check(fn)


# ----------------------------------------------------------------------------- the estimator table


class Row(NamedTuple):
    """One estimator: its forward problem's form and where the mask P acts."""

    form: str          # "symmetric" or "least_squares"
    mask_left: bool    # operator P·C
    mask_right: bool   # operator C·P
    mask_rhs: bool     # rhs P g
    mask_answer: bool  # Δ = P x


#: The estimator table (forward problems); adjoints are their transposes.
ESTIMATORS = {
    "if": Row("symmetric", False, False, False, False),
    "pif": Row("symmetric", False, False, False, True),
    "fif": Row("symmetric", True, True, True, True),
    "gif": Row("least_squares", False, True, False, True),
}


@_repr.compact_repr()
class Problem(NamedTuple):
    """A linear problem for a solver: ``answer = post(solve(form, operator, rhs(g)))``."""

    operator: LinearOperator
    form: str
    rhs: Callable
    post: Callable

    @property
    def T(self) -> "Problem":
        """The adjoint problem: sᵀg = ∇ᵀΔ(g) for every g."""
        return Problem(self.operator.T, _TRANSPOSED_FORM[self.form], self.post, self.rhs)


@_tree.pytree_dataclass(static=("method",))
class Estimator:
    """An influence estimator as a value: ``(method, mask)`` (see :data:`ESTIMATORS`).

    Fields: ``method`` — ``"if"``, ``"pif"``, ``"fif"`` or ``"gif"`` (static);
    ``mask`` — a boolean element mask like the parameters, or ``None`` for
    all of them (traced; ignored by ``"if"``).
    """

    method: str = "gif"
    mask: Any = None

    @property
    def row(self) -> Row:
        return ESTIMATORS[self.method]

    @property
    def form(self) -> str:
        return self.row.form

    @property
    def trace_mask(self):
        """Where :class:`AutoDamping` averages: the mask for masked operators (fif, gif)."""
        r = self.row
        return self.mask if (r.mask_left or r.mask_right) else None

    def check(self, fn: str, params) -> "Estimator":
        _checks.check_choice(fn, "method", self.method, METHODS)
        return Estimator(self.method, _masks.validate(self.mask, params, fn=fn))

    def problem(self, C: LinearOperator) -> Problem:
        """The forward problem of this estimator for the damped curvature ``C``."""
        r, mask = self.row, self.mask
        P = lambda v: _masks.apply(mask, v)
        ident = lambda v: v
        A = masked(C, mask, left=r.mask_left, right=r.mask_right) if mask is not None else C
        return Problem(A, r.form, P if r.mask_rhs else ident, P if r.mask_answer else ident)


# ----------------------------------------------------------------------------- functional forms


def resolve_damping(loss_fn: Callable, params, *args, damping, method: str = "if", mask=None,
                    curvature="hessian", chunk_size: int | None = None, axis_name: str | None = None):
    """The damping λ an estimator will use: ``damping`` itself, or :class:`AutoDamping` resolved.

    Arguments as in :func:`gifjax.influence`. Resolve once and pass the number
    when calling :func:`gifjax.adjoint_solve` many times.
    """
    fn = "resolve_damping"
    est = Estimator(method, mask).check(fn, params)
    spec = curvature_spec(fn, curvature, damping=damping, chunk_size=chunk_size, axis_name=axis_name)
    return jnp.asarray(spec.resolve(loss_fn, params, *args, trace_mask=est.trace_mask).damping)


def curvature_operator(loss_fn: Callable, params, *args, curvature="hessian", damping=0.0,
                       chunk_size: int | None = None, sample_size: int | None = None,
                       axis_name: str | None = None):
    """The function ``v ↦ (C + λI) v`` (C the Hessian or a :class:`gifjax.GGN`).

    A functional shortcut for ``Curvature(...).resolve(...)``; with
    ``sample_size`` the function also accepts ``key=``: ``op(v, key=k)`` is
    ``resolved.sample(k, sample_size)(v)``, a random minibatch of that many
    examples; ``op(v)`` stays the full product. ``axis_name`` as in
    :class:`Curvature`.
    """
    fn = "curvature_operator"
    spec = curvature_spec(fn, curvature, damping=damping, chunk_size=chunk_size, axis_name=axis_name)
    op = spec.resolve(loss_fn, params, *args)
    if sample_size is None:
        return op.matvec
    sample_size = _checks.check_positive_int(fn, "sample_size", sample_size, example="sample_size=32")
    return lambda v, key=None: op(v) if key is None else op.sample(key, sample_size)(v)


def hessian_operator(loss_fn: Callable, params, *args, damping=0.0, chunk_size: int | None = None,
                     sample_size: int | None = None, axis_name: str | None = None):
    r"""The Hessian operator ``v ↦ (H + λI) v`` used by the estimators.

    Linearised once at ``params`` (:func:`gifjax.linearize_hvp`), or, with
    ``chunk_size``, averaged over fixed-size chunks of ``args``
    (:func:`gifjax.batched_hvp`); ``sample_size`` and ``axis_name`` as in
    :func:`curvature_operator` and :class:`Curvature`.

    Example:
      >>> import jax.numpy as jnp, gifjax
      >>> H = gifjax.hessian_operator(lambda w: jnp.sum(w ** 3), jnp.ones(2), damping=1.0)
      >>> H(jnp.array([1.0, 0.0]))
      Array([7., 0.], dtype=float32)
    """
    return curvature_operator(loss_fn, params, *args, damping=damping, chunk_size=chunk_size,
                              sample_size=sample_size, axis_name=axis_name)
