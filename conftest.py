"""Root conftest: the namespace every docstring example runs in (``--doctest-modules``), the suite split."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest


def pytest_configure(config):
    """The default suite (``-m "not slow"``) compiles with XLA's lighter CPU pipeline.

    Its programs are tiny, so its time is compile time, and the lighter pipeline compiles
    faster: no LLVM optimisation, and the classic elemental emitters instead of the fusion
    emitters (each about halves XLA:CPU's compile time here); results stay exact to rounding
    (every tolerance here is relative). The slow suite
    keeps full optimisation: its notebooks and tasks train and evaluate real models in-process.
    XLA reads the flags once, when the backend starts (here, before any test module is
    imported); subprocesses (the demo, benchmarks) do not inherit them.
    """
    if (config.option.markexpr or "").strip() != "not slow":
        return
    before = os.environ.get("XLA_FLAGS")
    os.environ["XLA_FLAGS"] = (before or "") + (
        " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
        " --xla_cpu_use_fusion_emitters=false")
    jax.devices()
    if before is None:
        del os.environ["XLA_FLAGS"]
    else:
        os.environ["XLA_FLAGS"] = before


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop JAX's compiled programs after each module: every XLA:CPU executable keeps memory
    mappings, and one process running the whole default suite reached the kernel's limit
    (vm.max_map_count, 65,530) and crashed in a compile; modules rarely share programs."""
    yield
    jax.clear_caches()


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace):
    doctest_namespace.update(jax=jax, jnp=jnp, np=np)


@pytest.fixture(autouse=True)
def _no_global_x64_change(request):
    """A test may use float64 only in a scope (``jax.enable_x64``), never switch it on for the process."""
    before = bool(jax.config.jax_enable_x64)
    yield
    if bool(jax.config.jax_enable_x64) != before:
        jax.config.update("jax_enable_x64", before)
        pytest.fail(f"{request.node.nodeid} changed jax_enable_x64 for the whole process")


# ---------------------------------------------------------------------------- the suite split
# The default suite (`-m "not slow"`) must stay within 3 minutes on 2 CPU cores; CI runs both.
# Each entry moves tests to `-m slow` without touching their assertions:
#   "path::test"              → the whole test (every parametrisation);
#   ("path::test", {ids})     → its parametrisations except those ids, which stay in the
#                               default suite as representatives (every estimator, both dtypes,
#                               both model kinds still appear there).
SLOW = [
    # exactness grids: the default suite keeps one representative per estimator / dtype / model
    ("tests/test_influence.py::test_estimators_match_dense_definitions",
     {f"mlp-f64-{m}-dense" for m in ("if", "pif", "fif", "gif")} | {"mlp-f64-if-cg", "mlp-f64-gif-lstsq"}
     | {"cnn-f64-gif-lstsq", "cnn-f32-if-cg", "mlp-f32-gif-lstsq", "mlp-f32-fif-dense"}),
    ("tests/test_influence.py::test_influence_scores_match_dense", {"mlp-f64-pif", "mlp-f32-gif", "cnn-f64-if"}),
    ("tests/test_influence.py::test_slow_solvers_match_dense", {"if", "gif"}),
    ("tests/test_influence.py::test_all_true_mask_makes_the_four_estimators_coincide", {"cnn-f32", "mlp-f64"}),
    ("tests/test_lowrank.py::test_updates_and_scores_match_the_dense_truncation", {"gif-5"}),
    ("tests/test_lowrank.py::test_start_at_rhs_is_the_krylov_solver_of_that_rhs", {"gif-reference1"}),
    ("tests/test_preconditioned.py::test_auto_meets_its_accuracy_target_for_every_estimator",
     {"f64-indefinite"}),
    ("tests/test_preconditioned.py::test_preconditioned_masked_estimators_stay_on_the_mask_and_exact",
     {"gif"}),
    ("tests/test_preconditioned.py::test_minres_and_pcg_match_the_dense_solve_with_every_preconditioner",
     {"indefinite"}),
    ("tests/test_sweep.py::test_stream_equals_dense_matrix", {"gif", "fif", "pif"}),
    ("tests/test_influence.py::test_scores_do_not_depend_on_the_chunk_sizes_when_solves_converge",
     {"minres"}),
    ("tests/test_influence.py::test_influence_preserves_pytree_containers", {"tuple"}),
    ("tests/test_gradients.py::test_jvp_and_grad_match_the_dense_derivative", {"gif-lstsq"}),
    ("tests/test_spectrum.py::test_power_iteration_matches_eigvalsh", {"magnitude-True", "smallest-False"}),
    # second-level properties (jit / vmap / derivatives / multi-device) of the checks above
    ("tests/test_properties.py::test_jit_equals_no_jit", {"minres", "lstsq"}),
    ("tests/test_properties.py::test_vmap_equals_loop", {"minres", "lstsq"}),
    ("tests/test_solvers.py::test_vmap_equals_loop_and_stops_per_rhs", {"lstsq"}),
    "tests/test_solvers.py::test_jit_equals_eager",
    "tests/test_spectrum.py::test_jit_and_key_determinism",
    "tests/test_lowrank.py::test_jit_vmap_and_no_retrace_on_new_factors",
    "tests/test_lowrank.py::test_approximation_error_helper",
    "tests/test_lowrank.py::test_float32_rank_k_matches_dense_truncation",
    "tests/test_parallel.py::test_sharded_modes_equal_single_device",
    "tests/test_influence.py::test_self_influence_is_diagonal_of_scores",
    "tests/test_influence.py::test_stochastic_lissa_approximates_if",
    "tests/test_influence.py::test_vmap_over_test_points_equals_python_loop",
    "tests/test_gradients.py::test_influence_scores_and_self_influence_are_differentiable",
    "tests/test_preconditioned.py::test_preconditioners_cut_steps_on_a_spectrum_with_outliers",
    "tests/test_preconditioned.py::test_preconditioned_scores_are_differentiable",
    "tests/test_preconditioned.py::test_block_scores_are_differentiable",
    "tests/test_preconditioned.py::test_fallback_derivatives_are_the_dense_ones",
    "tests/test_progress.py::test_factorize_counts_its_curvature_products",
    "tests/test_errors.py::test_numpy_integer_scalars_are_accepted_where_ints_are",
    ("tests/test_ggn.py::test_ggn_product_equals_dense_and_is_psd", {"cnn"}),
    "tests/test_preconditioned.py::test_block_cg_needs_fewer_steps_than_vmapped_cg_and_reports_indefinite",
    "tests/test_group.py::test_matches_the_dense_second_order_expansion",
    "tests/test_group.py::test_second_order_beats_first_order_against_retraining",
    "tests/test_group.py::test_frozen_parameters_variant_against_restricted_retraining",
    "tests/test_ggn.py::test_auto_damping_under_jit_takes_a_traced_key",
    "tests/test_ggn.py::test_auto_damping_is_deterministic_given_a_key_and_reported",
    "tests/test_group.py::test_jit",
    "tests/test_lowrank.py::test_save_and_load_roundtrip",
    "tests/test_group.py::test_quadratic_objective_is_the_two_term_neumann_series",
    "tests/test_influence.py::test_ridge_regression_removal_is_exact",
    # the default solver's fallback on indefinite batches stays in the default suite through
    # test_auto_meets_its_accuracy_target_for_every_estimator[f64-indefinite]
    "tests/test_preconditioned.py::test_fallback_keeps_block_cg_answers_and_redoes_indefinite_ones_with_minres",
    "tests/test_lowrank.py::test_generic_lanczos_and_bidiagonalization_on_a_matrix",
    "tests/test_spectrum.py::test_generic_eigsh_on_a_matrix",
    "tests/test_solvers.py::test_pytree_right_hand_sides",
    # end to end: training, retraining, notebooks, the experiments' own examples
    "tests/test_notebooks.py::test_notebook_runs",
    "tests/test_own_model.py::test_the_readme_recipe_finishes_reports_and_agrees_with_a_tight_reference",
    "tests/test_evaluation.py::test_loo_on_logistic_regression_pearson_at_least_098",
    "tests/test_evaluation.py::test_lds_high_for_influence_and_near_zero_for_random_scores",
    "tests/test_evaluation.py::test_lds_from_a_given_init_records_it",
    ("tests/test_train.py::test_loss_goes_down_and_model_learns", {"mlp"}),
    ("tests/test_train.py::test_trained_point_is_stationary_for_make_loss_fn", {"adam-0.05"}),
    "tests/test_train.py::test_batchnorm_statistics_are_trained_and_used_in_eval",
    "tests/test_train.py::test_best_val_checkpoint_keeps_the_best_epoch",
    "tests/test_train.py::test_loss_and_grad_norm_matches_the_full_batch_objective",
    "tests/test_examples.py::test_quickstart_runs",
    "gifjax/experiments/models.py::gifjax.experiments.models",
    "gifjax/experiments/models.py::gifjax.experiments.models.init",
    "gifjax/experiments/models.py::gifjax.experiments.models.make_loss_fn",
    "gifjax/experiments/models.py::gifjax.experiments.models.make_example_loss_fn",
    "gifjax/experiments/train.py::gifjax.experiments.train",
    "gifjax/evaluation/_retrain.py::gifjax.evaluation._retrain.retrain",
    "gifjax/experiments/tasks/class_removal.py::gifjax.experiments.tasks.class_removal",
    "gifjax/evaluation/_ground_truth.py::gifjax.evaluation._ground_truth.leave_one_out",
    "gifjax/evaluation/_ground_truth.py::gifjax.evaluation._ground_truth.linear_datamodeling_score",
]


def pytest_collection_modifyitems(config, items):
    rules = [(rule, None) if isinstance(rule, str) else rule for rule in SLOW]
    for item in items:
        base, _, param = item.nodeid.partition("[")
        for name, keep in rules:
            if base == name and not (keep and param[:-1] in keep):
                item.add_marker(pytest.mark.slow)
    # a renamed test would silently move back into the default suite: fail loudly instead
    modules = {item.nodeid.partition("::")[0]: item.module for item in items if hasattr(item, "module")}
    stale = [name for name, _ in rules if name.partition("::")[0] in modules
             and not hasattr(modules[name.partition("::")[0]], name.partition("::")[2])]
    if stale:
        raise pytest.UsageError(f"conftest.SLOW names tests that do not exist: {stale}")
