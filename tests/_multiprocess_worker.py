"""One of 2 processes of a real multi-process gifjax.parallel run, started by tests/test_multiprocess.py.

    python tests/_multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT OUT.json

Each process has 4 CPU devices (XLA_FLAGS, set before JAX starts a backend)
and joins the others through ``jax.distributed.initialize`` on
``localhost:PORT`` with gloo CPU collectives: one global mesh of 8 devices. It
runs the multi-host recipe of the README on the tiny float64 MLP of
tests/test_parallel.py: every process loads only its own part of each sharded
input (``jax.make_array_from_process_local_data``), calls
``parallel.influence_scores`` and ``parallel.self_influence``, and gathers the
global results with ``multihost_utils.process_allgather(..., tiled=True)``
(plus one call whose solves fail, to record the warning each process gives).
It writes them as JSON (floats round-trip exactly); the comparison with one
device lives in the test. A JAX build without CPU collectives (jaxlib gloo is
Linux and macOS only) writes ``{"no_cpu_collectives": why}`` instead.
"""

import os
import sys

if __name__ == "__main__":  # only when run: pytest --doctest-modules imports this file too
    # 4 CPU devices per process; low XLA optimisation compiles faster (as in _parallel_worker.py)
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + (
        " --xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"
        " --xla_llvm_disable_expensive_passes=true")

import json  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from gifjax import parallel, solvers  # noqa: E402
from test_parallel import example_loss, loss, make  # noqa: E402  (the tiny MLP; tests/ is sys.path[0])

DAMPING = 0.1
CG = solvers.CG(rtol=1e-11, max_steps=200)
LSTSQ = solvers.LSTSQ(rtol=1e-11, max_steps=200)
N_TEST = 16
# what a jaxlib without gloo raises when the CPU backend starts (jaxlib/xla.cc, not Linux or macOS)
NO_GLOO = "make_gloo_tcp_collectives only implemented for linux and macos"


def problem():
    """Global inputs, identical in every process and in the test: params, mask, x [24, 4], y [24]."""
    return make()


def local_part(mesh, spec, a):
    """This process's rows of the global NumPy array ``a`` under ``NamedSharding(mesh, spec)``.

    What a host would load from its own files: the union of the rows its
    devices hold (all of them where its devices span the sharded axis).
    """
    index = NamedSharding(mesh, spec).addressable_devices_indices_map(a.shape).values()
    starts = [i[0].indices(len(a))[0] for i in index]
    stops = [i[0].indices(len(a))[1] for i in index]
    return a[min(starts):max(stops)]


def global_array(mesh, spec, tree):
    """A pytree of global arrays, built from each process's part only."""
    sharding = NamedSharding(mesh, spec)
    return jax.tree.map(
        lambda a: jax.make_array_from_process_local_data(sharding, local_part(mesh, spec, a), a.shape),
        tree)


def gathered(a):
    """A global result as a nested list, fetched whole to this process; with its layout."""
    return {"value": np.asarray(multihost_utils.process_allgather(a, tiled=True)).tolist(),
            "spec": str(tuple(a.sharding.spec)), "fully_addressable": a.is_fully_addressable}


def main(process_id, num_processes, port, out_path):
    start = time.time()
    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=num_processes,
                               process_id=process_id, initialization_timeout=120)
    try:
        jax.devices()  # starts the CPU backend, with its collectives
    except RuntimeError as e:
        if NO_GLOO not in str(e):
            raise
        with open(out_path, "w") as f:
            json.dump({"no_cpu_collectives": str(e)}, f)
        return

    params, x, y, mask = problem()
    train, test = (x, y), (x[:N_TEST], y[:N_TEST])
    qd = parallel.make_mesh(queries=2, data=4)  # queries across the processes, data within each
    d8 = parallel.make_mesh(queries=1, data=8)  # data across the processes: pmean over gloo
    res = {"process_index": jax.process_index(), "process_count": jax.process_count(),
           "device_count": jax.device_count(), "local_device_count": jax.local_device_count(),
           "meshes": {"2x4": np.vectorize(lambda d: d.process_index)(qd.devices).tolist(),
                      "1x8": np.vectorize(lambda d: d.process_index)(d8.devices).tolist()}}

    # 2 x 4: each process loads half of the test examples; the Hessian batch and training
    # examples are split over "data", whose 4 devices are all this process's (it loads all of them)
    test_q, train_d, batch_d = (global_array(qd, P("queries"), test), global_array(qd, P("data"), train),
                                global_array(qd, P("data"), (x, y)))
    out = parallel.influence_scores(loss, params, example_loss, train_d, test_q, *batch_d, mesh=qd,
                                    data_axis="data", solver=CG, damping=DAMPING, return_info=True)
    res["scores_2x4"] = gathered(out.scores) | {"converged": gathered(out.solution.converged)}
    # failed solves warn in every process (the failure codes are gathered from both): an rtol
    # below float64's reach (a traced solver field: the same compiled program)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        parallel.influence_scores(loss, params, example_loss, train_d, test_q, *batch_d, mesh=qd,
                                  data_axis="data", solver=solvers.CG(rtol=1e-30, max_steps=200),
                                  damping=DAMPING)
    res["warnings"] = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    examples_q = global_array(qd, P("queries"), train)
    si = parallel.self_influence(loss, params, example_loss, examples_q, *batch_d, mesh=qd,
                                 data_axis="data", solver=CG, damping=DAMPING, example_chunk_size=4)
    res["self_2x4"] = gathered(si)

    # 1 x 8: each process loads half of the Hessian batch and of the training examples; every
    # curvature product is a mean over both processes' devices (GIF with a mask, LSTSQ)
    test_r, train_d, batch_d = (global_array(d8, P(), test), global_array(d8, P("data"), train),
                                global_array(d8, P("data"), (x, y)))
    out = parallel.influence_scores(loss, params, example_loss, train_d, test_r, *batch_d, mesh=d8,
                                    data_axis="data", method="gif", mask=mask, solver=LSTSQ,
                                    damping=DAMPING, return_info=True)
    res["gif_1x8"] = gathered(out.scores) | {"converged": gathered(out.solution.converged)}
    res["local_rows"] = {"test_2x4": local_part(qd, P("queries"), x[:N_TEST]).shape[0],
                         "batch_2x4": local_part(qd, P("data"), x).shape[0],
                         "batch_1x8": local_part(d8, P("data"), x).shape[0]}

    res["seconds"] = time.time() - start
    with open(out_path, "w") as f:
        json.dump(res, f)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
