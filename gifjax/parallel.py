r"""Query- and data-parallel influence over a device mesh (``Mesh`` / ``NamedSharding`` / ``shard_map``).

Two independent kinds of parallelism, one mesh with axes ``("queries", "data")``:

* **Query parallel** (``query_axis``): test examples (or test gradients) are
  split over the axis; each device solves only its own queries with the full
  curvature. Solves never talk to each other, so this scales with no
  communication beyond the inputs and the result.
* **Data parallel** (``data_axis``): the Hessian batch ``*args`` is split into D
  equal shards and every curvature product is the mean of the local ones,

      H v = (1/D) Σ_d H_d v + λv,   H_d = ∇²loss_fn(θ, \*args_d),

  one ``jax.lax.pmean`` per product, damping added once after it (the
  ``axis_name`` hook of :func:`gifjax.hessian_operator`). With ``loss_fn``
  the mean loss over its batch and equal shards, (1/D) Σ_d H_d is exactly the
  Hessian of the mean over the global batch. In :func:`influence_scores` the
  training examples are split over the same axis, so device (q, d) returns
  the block I[train shard d, test shard q] and the score matrix comes back
  sharded ``P(data_axis, query_axis)``.

Every function here is one jitted ``jax.shard_map`` around the single-device
function of :mod:`gifjax.influence`; results equal the single-device ones to
rounding (tested on 8 devices for every mode). Test and training examples
are padded inside ``jit`` to a multiple of their axis size (repeating the last
example) and trimmed, so any n works; XLA can only lay out an axis evenly,
so an output axis is sharded when its length is a multiple of the mesh axis
size and replicated otherwise. The Hessian batch is never padded (that would
change the mean): its length must be a multiple of the data-axis size.

Example (runs on any number of devices; try
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` on CPU)::

    import jax, jax.numpy as jnp, gifjax
    from gifjax import parallel

    X = jax.random.normal(jax.random.key(0), (64, 3)); y = X @ jnp.ones(3)
    loss = lambda w, X, y: 0.5 * jnp.mean((X @ w - y) ** 2) + 0.01 * w @ w
    ex = lambda w, xy: 0.5 * (xy[0] @ w - xy[1]) ** 2
    mesh = parallel.make_mesh()                   # all devices on "queries"
    I = parallel.influence_scores(loss, jnp.ones(3), ex, (X, y), (X[:16], y[:16]), X, y,
                                  mesh=mesh, damping=0.01)
    I.shape, I.sharding.spec                      # (64, 16), P(None, 'queries') on 8 devices
    mesh = parallel.make_mesh(data=jax.device_count())  # all devices on "data"
    I = parallel.influence_scores(loss, jnp.ones(3), ex, (X, y), (X[:16], y[:16]), X, y,
                                  mesh=mesh, query_axis=None, data_axis="data", damping=0.01)
    I.sharding.spec                               # P('data',): rows by training shard

Multi-host (e.g. a TPU pod slice): call ``jax.distributed.initialize()`` on
every host, build the mesh over the global ``jax.devices()`` (``make_mesh``
does), and have every process run the same program. Inputs are global arrays:
each host loads its part and calls
``jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local_batch)``
for sharded inputs (the Hessian batch and training examples along ``"data"``,
test examples along ``"queries"``); small replicated inputs (parameters, mask)
may be the same NumPy/JAX values on every host. Results are global arrays;
fetch the whole of one to every host with
``jax.experimental.multihost_utils.process_allgather(I, tiled=True)`` (a
NumPy array), or read the process's own blocks from ``I.addressable_shards``.

Notes: devices along the data axis run the same solver iterations in lockstep
(their stopping tests read only reduced, identical values), as collectives
inside loops require. ``loss_fn`` and ``example_loss_fn`` are static (the
compile cache is keyed on them, like ``jax.jit``): define them once, not as
fresh lambdas per call. ``shard_map`` runs with ``check_vma=False``: with the
default ``check_vma=True``, JAX 0.10 sums gradients with respect to
replicated parameters across shards — silently wrong scores.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from . import _checks, _progress
from . import curvature as _curv
from . import estimators as _core
from . import solvers as _solvers
from ._chunks import map_in_chunks, pad_rows
from .operators import Estimator, curvature_spec

__all__ = ["AXES", "adjoint_solve", "influence", "influence_scores", "make_mesh", "self_influence"]

AXES = ("queries", "data")
tree_map = jax.tree_util.tree_map


def make_mesh(queries: int | None = None, data: int = 1, devices=None) -> Mesh:
    """A ``queries × data`` device mesh with axis names ``("queries", "data")``.

    Args:
      queries: devices on the query axis; default: all devices not on the
        data axis (``len(devices) // data``).
      data: devices on the data axis (default 1: no data parallelism).
      devices: the devices to use (default ``jax.devices()``, global on a
        multi-host system); the first ``queries * data`` are taken.

    Returns:
      A ``jax.sharding.Mesh`` with ``AxisType.Auto`` axes. ``jax.make_mesh``
      defaults to ``Explicit`` axes in JAX 0.10, which this module refuses:
      there ``shard_map`` rejects inputs not already laid out as its
      ``in_specs`` say, and ``jax.scipy.sparse.linalg.cg`` under ``vmap``
      fails on explicitly sharded inputs.

    Example:
      >>> from gifjax import parallel
      >>> parallel.make_mesh().axis_names
      ('queries', 'data')
    """
    fn = "parallel.make_mesh"
    devices = list(jax.devices() if devices is None else devices)
    data = _checks.as_int(data) if _checks.as_int(data) is not None else data
    if not isinstance(data, int) or data < 1 or data > len(devices) or (
            queries is None and len(devices) % data):
        raise _checks.error(fn, "data", repr(data),
                            f"a positive int dividing the {len(devices)} devices",
                            f"pass data=1 or a divisor of {len(devices)} (or set queries too).")
    queries = len(devices) // data if queries is None else queries
    queries = _checks.as_int(queries) if _checks.as_int(queries) is not None else queries
    if not isinstance(queries, int) or queries < 1 or queries * data > len(devices):
        raise _checks.error(fn, "queries", repr(queries),
                            f"a positive int with queries * data <= {len(devices)} devices",
                            f"pass queries <= {len(devices) // data} (or leave it out to use all).")
    return jax.make_mesh((queries, data), AXES, axis_types=(AxisType.Auto,) * 2,
                         devices=devices[:queries * data])


# ----------------------------------------------------------------------------- the one sharded call


@dataclasses.dataclass(frozen=True)
class _Job:
    """Static part of one sharded call (hashable: the compile-cache key)."""

    kind: str                  # "scores" | "adjoint" | "self" | "influence"
    mesh: Mesh
    query_axis: str | None
    data_axis: str | None
    loss_fn: Callable
    example_loss_fn: Callable | None
    options: tuple             # static keyword options, sorted (name, value) pairs


def _size(mesh, axis):
    return 1 if axis is None else mesh.shape[axis]


@functools.partial(jax.jit, static_argnums=0)
def _sharded(job: _Job, params, dynamic, queries, train, args):
    """jit(shard_map(body)): pad queries / train, run the single-device function, trim."""
    q, d, mesh = job.query_axis, job.data_axis, job.mesh
    opts = dict(job.options)
    n_q = 0 if queries is None else _checks.leading_size("parallel", "queries", queries, nonempty=True)
    n_t = 0 if train is None else _checks.leading_size("parallel", "train", train, nonempty=True)
    multiple = lambda n, axis: -(-n // _size(mesh, axis)) * _size(mesh, axis)
    queries, train = pad_rows(queries, multiple(n_q, q)), pad_rows(train, multiple(n_t, d))

    if job.kind == "scores":
        def body(params, dynamic, queries, train, args):
            return _core.influence_scores(job.loss_fn, params, job.example_loss_fn, train, queries,
                                          *args, axis_name=d, return_info=True, **dynamic, **opts)
        out_specs = _core.Scores(P(d, q), P(q), P())
    elif job.kind == "adjoint":
        chunk = opts.pop("test_chunk_size")

        def body(params, dynamic, queries, train, args):
            s = _core.setup(job.loss_fn, params, *args, axis_name=d, adjoint=True,
                            fn="parallel.adjoint_solve", **dynamic, **opts)
            return map_in_chunks(s.solve_many, queries, chunk,
                                 caller="parallel.adjoint_solve", arg="test_grads")
        out_specs = P(q)
    elif job.kind == "self":
        def body(params, dynamic, queries, train, args):
            return _core.self_influence(job.loss_fn, params, job.example_loss_fn, queries, *args,
                                        axis_name=d, return_info=True, **dynamic, **opts)
        out_specs = _core.Scores(P(q), P(q), P())
    else:
        def body(params, dynamic, queries, train, args):
            rest = {k: v for k, v in dynamic.items() if k != "g"}
            return _core.influence(job.loss_fn, params, dynamic["g"], *args, axis_name=d,
                                   **rest, **opts)
        out_specs = P()

    in_specs = (P(), P(), P(q), P(d), P(d))
    out = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                        check_vma=False)(params, dynamic, queries, train, args)

    # trim the padding; an axis stays sharded where its length divides evenly
    even = lambda axis, n: axis if n % _size(mesh, axis) == 0 else None
    layout = lambda x, spec: jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
    if job.kind == "influence":
        return out
    per_query = lambda tree: tree_map(lambda a: layout(a[:n_q], P(even(q, n_q))), tree)
    if job.kind == "adjoint":
        return per_query(out)
    if job.kind == "self":
        return _core.Scores(per_query(out.scores), per_query(out.solution), out.damping)
    scores = layout(out.scores[:n_t, :n_q], P(even(d, n_t), even(q, n_q)))
    return _core.Scores(scores, per_query(out.solution), out.damping)


def _run(fn, kind, loss_fn, params, args, *, mesh, query_axis, data_axis, method, mask, solver,
         damping, queries=None, queries_arg="test_examples", train=None, example_loss_fn=None,
         g=None, **options):
    """Check the inputs in Python (clear errors, global shapes), then call :func:`_sharded`."""
    if not isinstance(mesh, Mesh):
        raise _checks.error(fn, "mesh", type(mesh).__name__, "a jax.sharding.Mesh",
                            "pass mesh=gifjax.parallel.make_mesh(...) (or any jax.sharding.Mesh).",
                            kind=TypeError)
    explicit = [a for a, t in zip(mesh.axis_names, mesh.axis_types) if t != AxisType.Auto]
    if explicit:
        raise _checks.error(fn, "mesh", repr(mesh), "a mesh with AxisType.Auto axes",
                            "build it with gifjax.parallel.make_mesh(...), or jax.make_mesh(shape, "
                            "names, axis_types=(jax.sharding.AxisType.Auto,) * len(names)) "
                            f"(axes {explicit} are not Auto; jax.make_mesh defaults to Explicit).")
    for arg, axis in (("query_axis", query_axis), ("data_axis", data_axis)):
        if axis is not None and axis not in mesh.axis_names:
            raise _checks.error(fn, arg, repr(axis), f"None or an axis of the mesh {mesh.axis_names}",
                                f"pass one of {mesh.axis_names}, or build the mesh with "
                                "gifjax.parallel.make_mesh (axes 'queries', 'data').")
    if query_axis is not None and query_axis == data_axis:
        raise _checks.error(fn, "data_axis", repr(data_axis), f"an axis other than query_axis={query_axis!r}",
                            "put queries and data on different mesh axes (make_mesh(queries, data)).")
    estimator = Estimator(method, mask).check(fn, params)
    curvature_spec(fn, options.get("curvature", "hessian"), damping=damping,
                   chunk_size=options.get("chunk_size"))  # clear errors before tracing
    mask = estimator.mask
    solver = _solvers.get_solver(solver, form=estimator.form, fn=fn)  # a pytree: traced fields stay traced
    if data_axis is not None:
        if not jax.tree_util.tree_leaves(args):
            raise _checks.error(fn, "*args", "no Hessian batch", f"data sharded over data_axis={data_axis!r}",
                                "pass the Hessian batch as *args (not closed over in loss_fn), "
                                "or leave data_axis=None.")
        n, size = _curv.batch_size_of(fn, args), mesh.shape[data_axis]
        if n % size:
            raise _checks.error(fn, "*args", f"a Hessian batch of {n} examples",
                                f"a multiple of the {size} devices on data_axis={data_axis!r}",
                                f"drop {n % size} examples or add {-n % size} (padding inside would "
                                "change the mean loss), or use another data-axis size.")
    for arg, tree in ((queries_arg, queries), ("train_examples", train)):
        if tree is not None:
            _checks.leading_size(fn, arg, tree, nonempty=True)
    dynamic = dict(mask=mask, solver=solver, damping=damping)
    if g is not None:
        dynamic["g"] = g
    return_info = options.pop("return_info", False)
    total = 0
    if kind in ("scores", "self"):
        per_device = -(-_checks.leading_size(fn, queries_arg, queries) // _size(mesh, query_axis))
        chunk = options["test_chunk_size" if kind == "scores" else "example_chunk_size"]
        total = _progress.chunks(per_device, chunk) * _size(mesh, query_axis) * _size(mesh, data_axis)
    emit, show = _progress.wanted(options.pop("progress", None), fn, total, params, queries, train, args)
    if kind in ("scores", "self"):
        options["progress"] = emit  # every device reports its own chunks
    job = _Job(kind, mesh, query_axis, data_axis, loss_fn, example_loss_fn,
               tuple(sorted(dict(method=method, **options).items())))
    with _progress.bar(fn, total, show, replicas=_size(mesh, data_axis)):
        out = _sharded(job, params, dynamic, queries, train, tuple(args))
    sol = out if kind == "adjoint" else out.solution
    _solvers.warn_failures(fn, sol)  # outside jit only; inside, the diagnostics travel in the result
    return out.scores if kind in ("scores", "self") and not return_info else out


# ----------------------------------------------------------------------------- public functions


def influence_scores(loss_fn: Callable, params, example_loss_fn: Callable, train_examples,
                     test_examples, *args, mesh: Mesh, query_axis: str | None = "queries",
                     data_axis: str | None = None, mask=None, method: str = "if", solver="auto",
                     damping=0.0, chunk_size: int | None = None, test_chunk_size: int = 16,
                     train_chunk_size: int = 256, curvature="hessian", return_info: bool = False,
                     progress: bool | None = None):
    r"""Sharded :func:`gifjax.influence_scores`: I[i, j] = −∇ℓ(test_j)ᵀ Δ(∇ℓ(train_i)), [n_train, n_test].

    Test examples are split over ``query_axis`` (each device solves its own
    queries). With ``data_axis``, the Hessian batch ``*args`` and the training
    examples are split over it too: products are the mean of the local ones
    (module docstring) and device (q, d) scores train shard d × test shard q.

    Args:
      mesh: a ``jax.sharding.Mesh`` (:func:`make_mesh`).
      query_axis: mesh axis for the test examples (``None``: replicated).
      data_axis: mesh axis for the Hessian batch and training examples
        (``None``: replicated; the length of ``*args`` must be a multiple of
        its size, ``loss_fn`` the mean over its batch).
      everything else: as in :func:`gifjax.influence_scores` (static:
        ``method``, chunk sizes, ``curvature``, ``return_info``; traced:
        ``params``, data, ``mask``, ``damping``, the solver's fields).

    Returns:
      The score matrix, a global array sharded ``P(data_axis, query_axis)``
      on each axis whose length is a multiple of the mesh-axis size
      (replicated on the others); with ``return_info``, :class:`gifjax.Scores`
      whose ``solution`` is sharded ``P(query_axis)`` likewise.
    """
    return _run("parallel.influence_scores", "scores", loss_fn, params, args, mesh=mesh,
                query_axis=query_axis, data_axis=data_axis, method=method, mask=mask, solver=solver,
                damping=damping, queries=test_examples, train=train_examples,
                example_loss_fn=example_loss_fn, chunk_size=chunk_size,
                test_chunk_size=test_chunk_size, train_chunk_size=train_chunk_size,
                curvature=curvature, return_info=return_info, progress=progress)


def adjoint_solve(loss_fn: Callable, params, test_grads, *args, mesh: Mesh,
                  query_axis: str | None = "queries", data_axis: str | None = None, mask=None,
                  method: str = "if", solver="auto", damping=0.0, chunk_size: int | None = None,
                  test_chunk_size: int = 16, curvature="hessian") -> _solvers.Solution:
    """Sharded, batched :func:`gifjax.adjoint_solve`: one solve per test gradient.

    ``test_grads`` is a pytree like ``params`` with a leading axis of n test
    points, split over ``query_axis``; each device solves its share in
    vmapped chunks of ``test_chunk_size``. ``data_axis`` and the other
    arguments as in :func:`influence_scores`.

    Returns:
      :class:`gifjax.Solution` batched over the n test points (``value``: the
      adjoint vectors s), sharded ``P(query_axis)`` when n is a multiple of
      the axis size. The solver set-up (and a :class:`gifjax.AutoDamping`) is
      shared by each device's queries.
    """
    fn = "parallel.adjoint_solve"
    leaves, ref = jax.tree_util.tree_leaves(test_grads), jax.tree_util.tree_leaves(params)
    if jax.tree_util.tree_structure(test_grads) != jax.tree_util.tree_structure(params) or any(
            jnp.ndim(a) != jnp.ndim(b) + 1 for a, b in zip(leaves, ref)):
        raise _checks.error(fn, "test_grads", f"tree {jax.tree_util.tree_structure(test_grads)} "
                            f"with shapes {[jnp.shape(a) for a in leaves]}",
                            "params' structure with one leading test axis on every leaf "
                            f"(params shapes {[jnp.shape(b) for b in ref]})",
                            "stack per-test gradients, e.g. jax.vmap(jax.grad(example_loss), (None, 0)).")
    return _run(fn, "adjoint", loss_fn, params, args, mesh=mesh, query_axis=query_axis,
                data_axis=data_axis, method=method, mask=mask, solver=solver, damping=damping,
                queries=test_grads, queries_arg="test_grads", chunk_size=chunk_size,
                test_chunk_size=test_chunk_size, curvature=curvature)


def self_influence(loss_fn: Callable, params, example_loss_fn: Callable, examples, *args, mesh: Mesh,
                   query_axis: str | None = "queries", data_axis: str | None = None, mask=None,
                   method: str = "if", solver="auto", damping=0.0, chunk_size: int | None = None,
                   example_chunk_size: int = 16, curvature="hessian", return_info: bool = False,
                   progress: bool | None = None):
    """Sharded :func:`gifjax.self_influence`: I[i, i] = −∇ℓ(z_i)ᵀ Δ(∇ℓ(z_i)), shape [n].

    One solve per example (e.g. a mislabel sweep over the whole training
    set): the examples are split over ``query_axis``, each device solving its
    share in vmapped chunks of ``example_chunk_size``; with ``data_axis``
    the Hessian batch ``*args`` is split too (products reduced as in
    :func:`influence_scores`). Returns [n] sharded ``P(query_axis)`` when n is
    a multiple of the axis size (replicated otherwise); ``return_info=True``
    returns :class:`gifjax.Scores` with the per-example diagnostics. Failed
    solves warn once, outside ``jit``.
    """
    return _run("parallel.self_influence", "self", loss_fn, params, args, mesh=mesh,
                query_axis=query_axis, data_axis=data_axis, method=method, mask=mask,
                solver=solver, damping=damping, queries=examples, queries_arg="examples",
                example_loss_fn=example_loss_fn, chunk_size=chunk_size,
                example_chunk_size=example_chunk_size, curvature=curvature, return_info=return_info,
                progress=progress)


def influence(loss_fn: Callable, params, g, *args, mesh: Mesh, data_axis: str = "data", mask=None,
              method: str = "gif", solver="auto", damping=0.0, chunk_size: int | None = None,
              curvature="hessian") -> _core.Influence:
    """Data-parallel :func:`gifjax.influence`: one Δ, the Hessian batch split over ``data_axis``.

    ``*args`` is split into equal shards over ``data_axis`` (its length a
    multiple of the axis size) and every product is the mean of the local
    ones; devices on other mesh axes repeat the work. Arguments as in
    :func:`gifjax.influence`. Returns :class:`gifjax.Influence`, replicated.
    """
    fn = "parallel.influence"
    _checks.check_like(fn, "g", g, params)
    return _run(fn, "influence", loss_fn, params, args, mesh=mesh, query_axis=None,
                data_axis=data_axis, method=method, mask=mask, solver=solver, damping=damping,
                g=g, chunk_size=chunk_size, curvature=curvature)
