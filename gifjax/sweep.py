r"""Streaming, resumable influence sweeps over large training sets.

:func:`score_stream` computes the same scores as
:func:`gifjax.influence_scores`,

    I[i, j] = −∇ℓ(test_j)ᵀ Δ(∇ℓ(train_i)),

(Koh & Liang's upweighting sign: removing training point i of n changes test
loss j by ≈ −I[i, j] / n), but consumes the training set chunk by chunk:

* one adjoint solve per *test* point (:func:`gifjax.adjoint_solve`, vmapped),
  done once, before any training example is read;
* training examples come from an array (split into fixed-size chunks) or an
  iterator of chunks; every chunk is padded to the same size and the padding
  masked, so **one compiled chunk function** serves the whole sweep;
* per test point the top-k most positive and most negative training
  examples are kept incrementally; the full [N, n_test] matrix only with
  ``keep_full=True``. Memory does not grow with N: ``benchmarks/memory.py``
  measures the same peak RSS for N = 1,000 and 50,000 (see
  :func:`score_stream` for what a memmap adds);
* with ``out_dir`` every finished chunk is written atomically (temporary
  file in the same directory, fsync, ``os.replace``, fsync of the
  directory) next to a JSON manifest of the configuration. Rerunning skips
  finished chunks and returns bit-identical results, also after the
  process was killed outright, with no chance to clean up (tested with
  SIGKILL);
* nothing is ever mixed or loaded wrong: the manifest fingerprints the
  configuration *and the contents* of params, test examples and solutions;
  every chunk file carries its row range, a SHA-256 of the training rows it
  was computed from and a checksum over all it holds, verified on resume. A
  damaged chunk (truncated, garbage, edited) is recomputed with a warning; a
  chunk of other data or another configuration is refused with an error
  (it is never overwritten: nothing is lost); a damaged manifest gives an
  error naming the file and the way to recover;
* non-finite scores are never ranked: training rows with a non-finite score
  stay out of the top-k and are reported (``nonfinite_train``); a test
  example whose gradient or solve is non-finite gets a NaN column, never
  zeros (``nonfinite_test``), and one warning says so;
* tqdm bars on stderr, over the test chunks' solves and then over the
  training chunks (``progress=False`` or ``GIFJAX_PROGRESS=0`` turns them
  off) and/or a ``callback(chunk_index, num_chunks)``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import sys
import tempfile
import warnings
import zipfile
import zlib
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import _checks, _progress, _repr, _tree
from ._chunks import pad_rows
from .estimators import adjoint_solves, contract
from .operators import METHODS
from .solvers import FAILURES

__all__ = ["FORMAT", "MANIFEST", "StreamScores", "score_stream"]

tree_map = jax.tree_util.tree_map

FORMAT = "gifjax.sweep/2"
MANIFEST = "manifest.json"
_CHUNK_RE = re.compile(r"^chunk_(\d{6})\.npz$")


@_repr.compact_repr()
class StreamScores(NamedTuple):
    """Result of :func:`score_stream`.

    Attributes:
      top_indices: [n_test, k] int64 — per test point the training indices of
        the k largest (most positive) scores, largest first.
      top_scores: [n_test, k] — those scores.
      bottom_indices: [n_test, k] int64 — the k smallest (most negative)
        scores' training indices, smallest first.
      bottom_scores: [n_test, k] — those scores.
      scores: the full [n_train, n_test] matrix with ``keep_full=True``, else ``None``.
      num_train: number of training examples scored (padding excluded).
      solution: per-test-point :class:`gifjax.solvers.Solution` (batched) —
        check ``converged`` on real models.
      damping: the λ used.
      computed_chunks: chunk indices computed in *this* call (chunks loaded
        from ``out_dir`` are not listed).
      nonfinite_train: int64 indices of the training examples whose gradient
        is non-finite or whose score against a finite test column is
        non-finite (NaN/±Inf); they are never in ``top_*``/``bottom_*``.
      nonfinite_test: int64 indices of the test examples whose gradient is
        non-finite or whose solve is (value non-finite or failure
        ``"nonfinite"``); their score column is NaN (``scores``) and their
        top-k rows hold no entries (index −1).
      train_sha256: with ``out_dir``, the SHA-256 of the training data as
        streamed (chained over the chunks' hashes, as in the manifest's
        ``result``); else ``None``.

    k = min(top_k, num_train). Ties are broken by the smaller training index.
    Where a test point has fewer than k finite scores, the remaining slots
    hold index −1 and score NaN. ``num_nonfinite_train`` and
    ``num_nonfinite_test`` count the bad examples.
    """

    top_indices: np.ndarray
    top_scores: np.ndarray
    bottom_indices: np.ndarray
    bottom_scores: np.ndarray
    scores: np.ndarray | None
    num_train: int
    solution: Any
    damping: Any
    computed_chunks: tuple
    nonfinite_train: np.ndarray = np.zeros(0, np.int64)
    nonfinite_test: np.ndarray = np.zeros(0, np.int64)
    train_sha256: str | None = None

    @property
    def num_nonfinite_train(self) -> int:
        return int(np.size(self.nonfinite_train))

    @property
    def num_nonfinite_test(self) -> int:
        return int(np.size(self.nonfinite_test))


def _is_stream(x) -> bool:
    return hasattr(x, "__next__")


def _spec(tree):
    """Structure, per-example shapes and dtypes of a batched pytree (JSON-able)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return {"tree": str(treedef),
            "leaves": [[list(np.shape(a)[1:]), str(a.dtype if hasattr(a, "dtype") else np.asarray(a).dtype)] for a in leaves]}


def _hash_update(h, tree):
    """Feed a pytree's structure, leaf dtypes, shapes and bytes (host copies) into ``h``."""
    h.update(str(jax.tree_util.tree_structure(tree)).encode())
    for leaf in jax.tree_util.tree_leaves(tree):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    return h


def _hash_tree(tree) -> str:
    return _hash_update(hashlib.sha256(), tree).hexdigest()


def _grads(example_loss_fn, params, examples):
    return jax.vmap(jax.grad(example_loss_fn), in_axes=(None, 0))(params, examples)


# Module-level jits keyed on the (static) per-example loss: reruns and resumes of a sweep with
# the same function reuse the compiled chunk function.
@functools.partial(jax.jit, static_argnums=0)
def _score_chunk(example_loss_fn, params, S, chunk):
    """The one compiled chunk function: scores −G Sᵀ [m, n_test] and per-row gradient finiteness."""
    g = _grads(example_loss_fn, params, chunk)
    return contract(g, S), _tree.rows_finite(g)


def _chunks(fn, train_examples, chunk_size):
    """Yield (chunk, n_valid) with ``chunk_size`` rows (the last padded), and the chunk count."""
    if _is_stream(train_examples):
        def gen():
            for c in train_examples:
                m = _checks.leading_size(fn, "train_examples", c)
                if m > chunk_size:
                    raise _checks.error(fn, "train_examples", f"a chunk of {m} examples",
                                        f"chunks of at most train_chunk_size={chunk_size}",
                                        "pass train_chunk_size >= the largest chunk, or split the chunks.")
                yield c, m
        return gen(), None
    n = _checks.leading_size(fn, "train_examples", train_examples)
    total = -(-n // chunk_size)
    return ((tree_map(lambda a: a[s:s + chunk_size], train_examples), min(chunk_size, n - s))
            for s in range(0, n, chunk_size)), total


def _merge(best_s, best_i, block, start, k, largest):
    """Merge the running top-k (rows = test points) with a [m, n_test] block; ties → smaller index.

    Non-finite scores are never ranked: they sort behind every finite one and
    the slots they would fill hold index −1 and score NaN.
    """
    m, n_test = block.shape
    cand_s = np.concatenate([best_s, block.T], axis=1)  # [n_test, k' + m]
    idx = np.broadcast_to(np.arange(start, start + m, dtype=np.int64), (n_test, m))
    cand_i = np.concatenate([best_i, idx], axis=1)
    by_index = np.argsort(cand_i, axis=1, kind="stable")  # then a stable sort by score keeps
    cand_s = np.take_along_axis(cand_s, by_index, 1)      # equal scores in index order
    cand_i = np.take_along_axis(cand_i, by_index, 1)
    finite = np.isfinite(cand_s) & (cand_i >= 0)
    key = np.where(finite, -cand_s if largest else cand_s, np.inf)
    order = np.argsort(key, axis=1, kind="stable")[:, :k]
    top_s, top_i = np.take_along_axis(cand_s, order, 1), np.take_along_axis(cand_i, order, 1)
    ok = np.take_along_axis(finite, order, 1)
    return np.where(ok, top_s, np.nan).astype(cand_s.dtype), np.where(ok, top_i, -1)


def _write_atomic(path, write):
    d = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp_", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(d)


def _fsync_dir(d):
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(d or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_RECOVER = ("delete {path} and rerun with the original configuration: every chunk file carries "
            "its own checksum and fingerprint, so finished chunks are verified and kept (or pass a "
            "fresh out_dir)")


def _read_manifest(fn, out_dir, path):
    """The manifest as a dict; a damaged one raises an error naming the file and the recovery."""
    try:
        with open(path, "rb") as f:
            old = json.loads(f.read().decode("utf-8"))
        if not isinstance(old, dict) or not isinstance(old.get("fingerprint"), str) \
                or not isinstance(old.get("config"), dict):
            raise ValueError("not a score_stream manifest (no fingerprint/config)")
    except (OSError, UnicodeDecodeError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        raise _checks.error(
            fn, "out_dir", f"{out_dir!r}, whose {MANIFEST} is damaged or unreadable "
            f"({type(e).__name__}: {e})", f"a {MANIFEST} as written by score_stream",
            _RECOVER.format(path=path) + ".") from e
    return old


def _open_dir(fn, out_dir, config):
    """Create ``out_dir`` with a manifest, or check the existing manifest matches ``config``.

    Returns ``(fingerprint, manifest)``. A missing manifest is (re)written even
    where chunk files exist: each chunk is verified on its own when loaded
    (:func:`_load_chunk`), so a deleted manifest is the way to recover from a
    damaged one.
    """
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, MANIFEST)
    fingerprint = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    if os.path.exists(path):
        old = _read_manifest(fn, out_dir, path)
        if old.get("fingerprint") != fingerprint:
            old_cfg = old.get("config", {})
            diff = sorted(k for k in set(old_cfg) | set(config) if old_cfg.get(k) != config.get(k))
            raise _checks.error(
                fn, "out_dir", f"{out_dir!r}, which holds a sweep with a different configuration "
                f"(differs in: {', '.join(diff) or 'format'})",
                "a new directory, or the configuration recorded in its manifest.json",
                "pass a fresh out_dir, delete the old one, or rerun with the original configuration.")
        return fingerprint, old
    manifest = {"format": FORMAT, "fingerprint": fingerprint, "config": config}
    _write_manifest(path, manifest)
    return fingerprint, manifest


def _write_manifest(path, manifest):
    body = json.dumps(manifest, sort_keys=True, indent=1).encode()
    _write_atomic(path, lambda f: f.write(body))


def _chunk_checksum(context, start, count, input_sha256, scores, train_finite):
    """SHA-256 over everything a chunk file holds: inputs (fingerprint, rows, data hash) and outputs."""
    h = hashlib.sha256()
    h.update(f"{FORMAT}|{context}|{int(start)}|{int(count)}|{input_sha256}|".encode())
    _hash_update(h, (scores, train_finite))
    return h.hexdigest()


def _save_chunk(path, context, start, count, input_sha256, scores, train_finite):
    checksum = _chunk_checksum(context, start, count, input_sha256, scores, train_finite)
    _write_atomic(path, lambda f: np.savez(
        f, scores=scores, train_finite=train_finite, start=np.int64(start), count=np.int64(count),
        input_sha256=np.str_(input_sha256), context=np.str_(context), checksum=np.str_(checksum)))


class _Damaged(Exception):
    """A chunk file that cannot be trusted as written (recompute it)."""


def _load_chunk(path, context, start, count, input_sha256, n_test, dtype):
    """Verify and load a chunk file: ``(scores, train_finite)``.

    Raises :class:`_Damaged` when the file is unreadable, incomplete or its
    checksum fails (recompute it), and returns ``None`` for an intact file
    written from other rows, other data or another configuration (the caller
    refuses it).
    """
    fields = ("scores", "train_finite", "start", "count", "input_sha256", "context", "checksum")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [f for f in fields if f not in z.files]
            if missing:
                raise _Damaged(f"missing fields {missing}")
            z = {f: z[f] for f in fields}
    except _Damaged:
        raise
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zlib.error) as e:
        raise _Damaged(f"unreadable: {type(e).__name__}: {e}") from e
    scores, finite = z["scores"], z["train_finite"]
    if scores.dtype != dtype and scores.dtype.kind == "V" and scores.dtype.itemsize == dtype.itemsize:
        scores = scores.view(dtype)  # npz keeps extension dtypes (bfloat16) as raw bytes
    try:
        ok = (str(z["checksum"]) == _chunk_checksum(str(z["context"]), int(z["start"]), int(z["count"]),
                                                    str(z["input_sha256"]), scores, finite))
    except (TypeError, ValueError) as e:
        raise _Damaged(f"malformed fields: {e}") from e
    if not ok:
        raise _Damaged("checksum mismatch: the file was edited or corrupted")
    saved_count = int(z["count"])
    if scores.shape != (saved_count, n_test) or scores.dtype != dtype or finite.shape != (saved_count,):
        raise _Damaged(f"scores of shape {scores.shape} and dtype {scores.dtype}, expected "
                       f"({saved_count}, {n_test}) {dtype}")
    if (str(z["context"]) != context or int(z["start"]) != start or saved_count != count
            or str(z["input_sha256"]) != input_sha256):
        return None, (int(z["start"]), saved_count, str(z["context"]) == context)
    return (scores, finite.astype(bool)), None


def _progress_bar(progress, total):
    if not progress or not _progress.env_on():
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc="gifjax.score_stream", unit="chunk", file=sys.stderr)


def score_stream(loss_fn: Callable, params, example_loss_fn: Callable, train_examples,
                 test_examples, *args, mask=None, method: str = "if", solver="auto",
                 damping=0.0, chunk_size: int | None = None, curvature="hessian",
                 axis_name: str | None = None, test_chunk_size: int = 16, train_chunk_size: int | None = None,
                 top_k: int = 10, keep_full: bool = False, out_dir: str | os.PathLike | None = None,
                 config_id: str = "", progress: bool = True,
                 callback: Callable[[int, int | None], Any] | None = None) -> StreamScores:
    r"""Influence scores streamed over the training set: top-k per test point, resumable.

        I[i, j] = −∇ℓ(test_j)ᵀ Δ(∇ℓ(train_i)),

    Δ the estimator chosen by ``method`` (see :mod:`gifjax.influence`); the
    numbers equal :func:`gifjax.influence_scores`. Removing training point i
    of n changes test loss j by ≈ −I[i, j] / n, so the most *positive*
    scores are the most harmful training examples (removing them lowers the
    test loss; ``top_*``), the most negative the most helpful (``bottom_*``).

    Work and memory: the n_test adjoint solves s_j run first (vmapped, in
    chunks of ``test_chunk_size``); then each training chunk costs one
    batched gradient and a [chunk, n_test] contraction −G Sᵀ in one jitted
    function compiled once (the last chunk is padded by repeating its last
    example and the padding dropped). Memory is O(train_chunk_size · n_test
    + n_test · (p + k)), independent of N unless ``keep_full``. A numpy
    memmap is read one chunk at a time, but the pages read stay mapped and
    count in the process's RSS as (clean, reclaimable) file cache, up to the
    file's size; to keep RSS itself flat, pass a generator that reads each
    chunk (e.g. ``numpy.fromfile`` with an offset) instead.

    Resuming: with ``out_dir`` each finished chunk's block is saved as
    ``chunk_{index:06d}.npz`` (written to a temporary file, then
    ``os.replace``) and ``manifest.json`` records a fingerprint of the
    configuration: shapes/dtypes of params, test and training examples,
    method, solver kind, damping, chunk sizes, ``top_k``, ``config_id`` and
    SHA-256 hashes of the *contents* of ``params``, of the test examples and
    of the test-point solutions. A rerun with the same configuration loads
    finished chunks instead of computing them and returns bit-identical
    results; a different configuration in that directory raises
    ``ValueError``. Put anything the fingerprint cannot see (e.g. a change
    of ``loss_fn``'s code, or ``gifjax.mixed_precision`` — though its
    solutions' hash already differs) into ``config_id``. A process killed at
    any point leaves only finished chunks and, if it died inside a write, one
    ``.tmp_*.part`` file, which is never read as a chunk (delete it at
    leisure; it is left alone because another process may still be writing
    it).

    Integrity: the training data are hashed as they stream (SHA-256 of each
    chunk's bytes on the host; the chained hash is returned as
    ``train_sha256`` and stored in the manifest's ``result`` when the sweep
    completes). Each chunk file holds its row range, the hash of the rows it
    was computed from, the manifest's fingerprint and a checksum over all of
    it and the scores, and is verified before it is used:

    * a damaged file (truncated, garbage bytes, edited values or row count —
      anything failing the checksum) is recomputed and overwritten, with a
      ``RuntimeWarning`` naming it;
    * an intact file computed from *other* training rows (different data of
      the same shapes, or an iterator chunked differently) or under another
      fingerprint raises ``ValueError`` naming the file and the directory: it
      belongs to another sweep and is never overwritten, so nothing is lost
      (pass a fresh ``out_dir``, or delete the directory or that file);
    * a damaged or unreadable ``manifest.json`` raises ``ValueError`` naming
      it; delete it and rerun with the original configuration: a missing
      manifest is rewritten and every chunk is still verified on its own.

    Non-finite values: a test example whose gradient is non-finite, or
    whose solve is (non-finite value, or failure ``"nonfinite"`` — solvers
    may return zeros there), gets a NaN score column, never zeros. Non-finite
    scores are never ranked in the top-k; such training rows are reported
    in ``nonfinite_train`` and such test examples in ``nonfinite_test``, and
    one ``RuntimeWarning`` names both when there are any.

    Args:
      loss_fn, params, \*args, mask, method, solver, damping, chunk_size, curvature, axis_name, test_chunk_size:
        as in :func:`gifjax.influence_scores`.
      example_loss_fn: ``example_loss_fn(params, example) -> scalar`` for one
        example (no batch axis).
      train_examples: a pytree of arrays with a leading axis N (numpy
        memmaps welcome: only one chunk is read at a time), or an
        *iterator* (anything with ``__next__``, e.g. a generator or
        ``iter(list_of_chunks)``) yielding such pytrees of at most
        ``train_chunk_size`` examples each; training indices count across
        chunks in order.
      test_examples: pytree with a leading axis n_test.
      train_chunk_size: rows per compiled chunk (static); default 256 for
        arrays, the first chunk's size for iterators.
      top_k: how many most positive / most negative examples to keep per test point.
      keep_full: also return the full [N, n_test] matrix (memory O(N)).
      out_dir: directory for resumable results (created if missing), or ``None``.
      config_id: a user string folded into the fingerprint.
      progress: show a tqdm bar over chunks on stderr.
      callback: ``callback(chunk_index, num_chunks)`` after each chunk
        (computed or loaded) is final; ``num_chunks`` is ``None`` for
        iterators of unknown length. An exception raised here stops the
        sweep; finished chunks stay on disk.

    Returns:
      :class:`StreamScores`.

    Example:
      >>> import jax, jax.numpy as jnp, gifjax
      >>> from gifjax import sweep
      >>> X = jax.random.normal(jax.random.key(0), (50, 3)); y = X @ jnp.ones(3)
      >>> loss = lambda w, X, y: 0.5 * jnp.mean((X @ w - y) ** 2) + 0.01 * w @ w
      >>> ex = lambda w, xy: 0.5 * (xy[0] @ w - xy[1]) ** 2
      >>> r = sweep.score_stream(loss, jnp.ones(3), ex, (X, y), (X[:4], y[:4]), X, y,
      ...                        train_chunk_size=16, top_k=3, progress=False)
      >>> r.top_indices.shape, r.num_train
      ((4, 3), 50)

    Warning:
      Bit-identical resumption assumes deterministic computation (same
      device kind, same jax version): the solutions' hash is part of the
      fingerprint, so a rerun whose solves differ in the last bit is
      refused rather than mixed. Check ``solution.converged``.
    """
    fn = "sweep.score_stream"
    _checks.check_choice(fn, "method", method, METHODS)
    top_k = _checks.check_positive_int(fn, "top_k", top_k, example="top_k=10")
    if train_chunk_size is not None:
        train_chunk_size = _checks.check_positive_int(fn, "train_chunk_size", train_chunk_size,
                                                      example="train_chunk_size=256")
    if callback is not None and not callable(callback):
        raise _checks.error(fn, "callback", repr(callback), "None or callable(chunk_index, num_chunks)",
                            "pass a function, e.g. lambda i, n: print(i, n).")
    if _is_stream(train_examples):
        first = next(train_examples, None)
        if first is None:
            raise _checks.error(fn, "train_examples", "an empty iterator", "at least one chunk",
                                "pass an iterator that yields at least one chunk of examples.")
        size = train_chunk_size or _checks.leading_size(fn, "train_examples", first)
        rest = train_examples

        def chained():
            yield first
            yield from rest

        stream = chained()
        try:
            hint = rest.__length_hint__() + 1 if hasattr(rest, "__length_hint__") else None
        except TypeError:
            hint = None
        train_spec, num_train_known = _spec(first), None
        source = stream
    else:
        size = train_chunk_size or 256
        hint = None
        n = _checks.leading_size(fn, "train_examples", train_examples)
        size = min(size, n)
        train_spec, num_train_known = _spec(train_examples), n
        source = train_examples
    _checks.check_example_loss(fn, example_loss_fn, params,  # a stream: on its first chunk
                               first if _is_stream(train_examples) else train_examples, "train_examples")

    # One solve per test point, shared by every training chunk.
    sols, lam = adjoint_solves(loss_fn, params, example_loss_fn, test_examples, *args, mask=mask,
                               method=method, solver=solver, damping=damping, chunk_size=chunk_size,
                               curvature=curvature, axis_name=axis_name,
                               test_chunk_size=test_chunk_size, progress=None if progress else False, fn=fn)
    n_test = _checks.leading_size(fn, "test_examples", test_examples)
    # adjoint_solves gives a bad test example (non-finite gradient or solve) a NaN adjoint
    # vector and failure "nonfinite", so its score column is NaN, never zeros
    test_ok = np.asarray(sols.failure).reshape(-1) != FAILURES.index("nonfinite")
    bad_test = np.flatnonzero(~test_ok).astype(np.int64)
    S = sols.value

    context = manifest = None
    if out_dir is not None:
        out_dir = os.fspath(out_dir)
        lam_repr = (repr(float(np.asarray(lam))) if _checks.is_concrete(lam) and np.ndim(lam) == 0
                    else type(lam).__name__)
        config = {
            "format": FORMAT,
            "method": method,
            "solver": solver if isinstance(solver, str) else type(solver).__name__,
            "damping": lam_repr,
            "curvature": curvature if isinstance(curvature, str) else type(curvature).__name__,
            "hvp_chunk_size": chunk_size,
            "train_chunk_size": size,
            "test_chunk_size": test_chunk_size,
            "top_k": top_k,
            "config_id": str(config_id),
            "num_train": num_train_known,
            "num_test": n_test,
            "params": _spec(tree_map(lambda a: np.asarray(a)[None], params)),
            "train_examples": train_spec,
            "test_examples": _spec(test_examples),
            "params_sha256": _hash_tree(params),
            "test_sha256": _hash_tree(test_examples),
            "solutions_sha256": _hash_tree(S),
        }
        context, manifest = _open_dir(fn, out_dir, config)
        data_hash = hashlib.sha256(context.encode())

    chunks, total = _chunks(fn, source, size)
    total = total if total is not None else hint
    bar = _progress_bar(progress, total)
    k = top_k
    dtype = np.result_type(*[np.asarray(l).dtype for l in jax.tree_util.tree_leaves(S)])
    good_cols = test_ok
    top_s = np.empty((n_test, 0), dtype); top_i = np.empty((n_test, 0), np.int64)
    bot_s = np.empty((n_test, 0), dtype); bot_i = np.empty((n_test, 0), np.int64)
    full, computed, bad_train, start, c = [], [], [], 0, -1
    try:
        for c, (chunk, m) in enumerate(chunks):
            path = None if out_dir is None else os.path.join(out_dir, f"chunk_{c:06d}.npz")
            loaded = None
            if path is not None:
                input_sha256 = _hash_tree(chunk)
                data_hash.update(input_sha256.encode())
                if os.path.exists(path):
                    try:
                        loaded, foreign = _load_chunk(path, context, start, m, input_sha256, n_test, dtype)
                    except _Damaged as e:
                        warnings.warn(f"gifjax.{fn}: {path} is damaged ({e}); recomputing chunk {c} "
                                      f"(training rows [{start}, {start + m})).", RuntimeWarning,
                                      stacklevel=2)
                    else:
                        if loaded is None:
                            raise _foreign_chunk(fn, out_dir, path, c, start, m, *foreign)
            if loaded is not None:
                block, finite = loaded
            else:
                padded = tree_map(jnp.asarray, pad_rows(chunk, size))
                block, finite = _score_chunk(example_loss_fn, params, S, padded)
                block, finite = np.asarray(block)[:m], np.asarray(finite)[:m]
                computed.append(c)
                if path is not None:
                    _save_chunk(path, context, start, m, input_sha256, block, finite)
            bad = ~finite | np.any(~np.isfinite(block[:, good_cols]), axis=1)
            if np.any(bad):
                bad_train.append(start + np.flatnonzero(bad))
            top_s, top_i = _merge(top_s, top_i, block, start, k, largest=True)
            bot_s, bot_i = _merge(bot_s, bot_i, block, start, k, largest=False)
            if keep_full:
                full.append(block)
            start += m
            if bar is not None:
                bar.update(1)
            if callback is not None:
                callback(c, total)
    finally:
        if bar is not None:
            bar.close()
    train_sha256 = None
    if out_dir is not None:
        train_sha256 = data_hash.hexdigest()
        result = {"num_train": start, "num_chunks": c + 1, "train_sha256": train_sha256}
        if manifest.get("result") != result:
            _write_manifest(os.path.join(out_dir, MANIFEST), dict(manifest, result=result))
    bad_train = np.concatenate(bad_train).astype(np.int64) if bad_train else np.zeros(0, np.int64)
    if bad_train.size or bad_test.size:
        show = lambda a: (f"{a[:10].tolist()}" + (" …" if a.size > 10 else ""))
        parts = []
        if bad_train.size:
            parts.append(f"{bad_train.size} training example(s) {show(bad_train)} have non-finite "
                         "scores and were left out of the top-k (StreamScores.nonfinite_train)")
        if bad_test.size:
            parts.append(f"{bad_test.size} test example(s) {show(bad_test)} have a non-finite gradient "
                         "or solve: their score columns are NaN (StreamScores.nonfinite_test)")
        warnings.warn(f"gifjax.{fn}: " + "; ".join(parts) + ". Fix: check those examples for "
                      "NaN/Inf inputs or labels, or the solves' `solution.failure`.",
                      RuntimeWarning, stacklevel=2)
    return StreamScores(top_i, top_s, bot_i, bot_s, np.concatenate(full) if keep_full else None,
                        start, sols, jnp.asarray(lam), tuple(computed), bad_train, bad_test,
                        train_sha256)


def _foreign_chunk(fn, out_dir, path, c, start, m, saved_start, saved_count, same_config):
    """The error for an intact chunk file that belongs to other data (never overwritten)."""
    if not same_config:
        got = f"{path}, written by a sweep with a different configuration or parameters"
    elif (saved_start, saved_count) != (start, m):
        got = (f"chunk {c} at training rows [{start}, {start + m}), but {path} holds rows "
               f"[{saved_start}, {saved_start + saved_count})")
    else:
        got = (f"training rows [{start}, {start + m}) whose contents differ from the rows "
               f"{path} was computed from (different training data of the same shapes)")
    return _checks.error(
        fn, "train_examples", got, f"the training data of the sweep saved in {out_dir!r}",
        f"pass a fresh out_dir, or delete {out_dir!r} (or just {path}) to recompute it, or rerun "
        "with the original data and chunks; the old chunk is left untouched.")
