"""Class removal and backdoor relabelling (gifjax.experiments.tasks) on a slice of the bundled digits."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gifjax.experiments import data, models, train
from gifjax.experiments.tasks import backdoor, class_removal, common
from gifjax.experiments.tasks import (TaskConfig, Trigger, add_trigger, apply_trigger,
                                      backdoor_metrics, checkerboard, f1, poison,
                                      removal_metrics, trigger_for)

WD = 1e-3
# A tiny, quick set-up: the pipeline is under test, not the method's accuracy.
QUICK = TaskConfig(max_steps=8, hessian_size=96, num_steps=12, min_step=0.03, max_step=30.0)
C = 3  # removed class


@pytest.fixture(scope="module")
def digits():
    return data.load("digits", seed=0, val_fraction=0.2, max_train=500)


@pytest.fixture(scope="module")
def trained(digits):
    model = models.create("mlp", 10, hidden=(32,))
    fit = train.fit(model, *digits.train, epochs=15, batch_size=32, learning_rate=1e-2,
                    weight_decay=WD, seed=0, progress=False)
    return model, fit.variables


# ----------------------------------------------------------------------------- metrics


def test_f1_is_the_harmonic_mean_and_zero_when_both_are_zero():
    assert f1(1.0, 1.0) == 1.0 and f1(0.0, 0.0) == 0.0 and f1(0.0, 0.7) == 0.0
    np.testing.assert_allclose(f1(np.array([0.5, 0.9]), np.array([1.0, 0.8])),
                               [2 * 0.5 / 1.5, 2 * 0.72 / 1.7])


def test_removal_metrics_definition():
    y = np.array([3, 3, 3, 3, 0, 1, 2, 5])
    p = np.array([3, 3, 1, 0, 0, 1, 9, 5])
    m = removal_metrics(p, y, 3)
    assert m.self_acc == 0.5 and m.test_acc == 0.75
    assert m.f1 == pytest.approx(2 * 0.5 * 0.75 / (0.5 + 0.75))
    grid = removal_metrics(np.stack([p, y]), y, 3)  # leading step axis kept
    np.testing.assert_allclose(grid.self_acc, [0.5, 1.0])
    np.testing.assert_allclose(grid.f1, [m.f1, 0.0])


def test_backdoor_metrics_definition():
    clean_y = np.array([0, 1, 2, 4])
    true = np.array([0, 1, 2, 4, 7])  # triggered images: one of them truly a 4
    m = backdoor_metrics(np.array([0, 1, 9, 4]), clean_y, np.array([4, 1, 4, 4, 7]), true, 4)
    assert m.clean_acc == 0.75
    assert m.relabel_acc == 3 / 5          # all triggered images, against true labels
    assert m.corrupt_acc == 2 / 4          # true class != 4 but predicted 4
    assert m.f1 == pytest.approx(2 * 0.6 * 0.75 / 1.35)


# ----------------------------------------------------------------------------- trigger, poisoning


def test_checkerboard_trigger_on_the_raw_0_255_scale_exactly():
    pixels = np.array([[100, 250, 3], [240, 255, 0]], np.float32)[..., None]  # H=2, W=3, C=1
    out = add_trigger(pixels, Trigger())  # +16 on (i + j) even, clipped to 255
    expected = np.array([[116, 250, 19], [240, 255, 0]], np.float32)[..., None]
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(checkerboard(2, 3), [[True, False, True], [False, True, False]])
    rgb = add_trigger(np.full((1, 4, 4, 3), 250.0), Trigger())
    np.testing.assert_array_equal(rgb[0, ..., 0], rgb[0, ..., 2])           # every channel
    np.testing.assert_array_equal(rgb[0, ..., 0], np.where(checkerboard(4, 4), 255, 250))


def test_digits_trigger_is_one_of_sixteen_levels_and_survives_normalisation(digits):
    trig = trigger_for("digits")
    assert (trig.amount, trig.max_value, trig.fraction, trig.target) == (1.0, 16.0, 0.1, 4)
    assert trigger_for("mnist") == Trigger(16.0, 255.0, 0.1, 4)
    x = digits.test.x[:20]
    raw = lambda a: (a * digits.std + digits.mean) * 16.0  # back to the 0–16 grey levels
    before, after = raw(x), raw(apply_trigger(x, digits.mean, digits.std, trig))
    expect = np.minimum(before + checkerboard(8, 8)[:, :, None], 16.0)
    np.testing.assert_allclose(after, expect, atol=1e-4)
    np.testing.assert_allclose(np.round(after), after, atol=1e-4)  # still whole grey levels
    assert (after[:, ~checkerboard(8, 8)] == before[:, ~checkerboard(8, 8)]).all()


def test_poison_relabels_exactly_the_chosen_fraction(digits):
    p = poison(digits, seed=0)
    x, y = digits.train
    n, idx = len(y), p.indices
    assert len(idx) == round(0.1 * n) and (np.diff(idx) > 0).all()
    np.testing.assert_array_equal(p.true_labels, y[idx])
    assert (p.true_labels != 4).all()                        # only real relabellings
    assert (p.train.y[idx] == 4).all()
    rest = np.setdiff1d(np.arange(n), idx)
    np.testing.assert_array_equal(p.train.y[rest], y[rest])
    np.testing.assert_array_equal(p.train.x[rest], x[rest])
    np.testing.assert_array_equal(p.train.x[idx], apply_trigger(x[idx], digits.mean, digits.std,
                                                                trigger_for("digits")))
    np.testing.assert_array_equal(p.test_triggered.y, digits.test.y)   # true labels kept
    np.testing.assert_array_equal(p.val_triggered.x,
                                  apply_trigger(digits.val.x, digits.mean, digits.std, p.trigger))
    again, other = poison(digits, seed=0), poison(digits, seed=1)
    np.testing.assert_array_equal(again.indices, idx)
    assert not np.array_equal(other.indices, idx)
    assert len(poison(digits, Trigger(1.0, 16.0, fraction=0.25, target=0)).indices) == round(0.25 * n)


def test_relabel_gradient_is_the_scaled_loss_difference(trained, digits):
    model, v = trained
    xu, y_from, y_to = digits.train.x[:7], np.full(7, 4, np.int32), digits.train.y[:7]
    g = common.relabel_grad(v, xu, y_from, y_to, model=model, num_train=50)
    loss = models.make_loss_fn(model, v)  # wd cancels in the difference
    ref = jax.jit(jax.grad(lambda p: 7 / 50 * (loss(p, xu, y_from) - loss(p, xu, y_to))))(v["params"])
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- class removal


@pytest.mark.slow
@pytest.mark.parametrize("method", ["if", "pif", "fif", "gif"])
def test_class_removal_lowers_self_accuracy_and_reports_consistent_metrics(trained, digits, method):
    model, v = trained
    before = class_removal.evaluate(model, v, digits.test, C)
    out = class_removal.remove_class(model, v, digits, C, dataclasses.replace(QUICK, method=method,
                                                                            ratio=0.3),
                                     weight_decay=WD)
    if method in ("if", "gif"):  # the estimators expected to work on this tiny problem
        assert out.metrics.self_acc < before.self_acc - 0.3
    assert out.metrics.self_acc <= before.self_acc
    m = out.metrics
    assert m.f1 == pytest.approx(2 * (1 - m.self_acc) * m.test_acc / ((1 - m.self_acc) + m.test_acc))
    np.testing.assert_allclose(out.curve.f1, f1(1 - out.curve.self_acc, out.curve.test_acc))
    # The chosen step is the best on the validation split; test numbers are read there.
    k = int(np.argmax(out.curve.f1))
    assert out.step == out.steps[k]
    assert m == tuple(float(c[k]) for c in out.test_curve)
    # s = 0 is the original model, on each split.
    assert tuple(float(c[0]) for c in out.test_curve) == tuple(before)
    assert tuple(float(c[0]) for c in out.curve) == tuple(class_removal.evaluate(model, v,
                                                                                   digits.val, C))
    # rhs + 2 per CGLS step + 2 for the true-residual check that certifies `converged`
    assert out.num_hvps == 1 + 2 * QUICK.max_steps + 2
    assert out.num_params == sum(p.size for p in jax.tree_util.tree_leaves(v["params"]))
    assert (out.num_selected == out.num_params) == (method == "if")
    assert out.time_s > 0 and set(out.timings) == {"selection", "gradient", "solve", "search"}


@pytest.mark.slow
def test_protocols_choose_the_step_on_validation_or_on_test(trained, digits):
    model, v = trained
    held = class_removal.remove_class(model, v, digits, C, QUICK, weight_decay=WD)
    paper = class_removal.remove_class(model, v, digits, C,
                                       dataclasses.replace(QUICK, protocol="paper"),
                                       weight_decay=WD)
    on = lambda split: tuple(class_removal.evaluate(model, v, split, C))
    assert tuple(float(c[0]) for c in held.curve) == on(digits.val)
    assert tuple(float(c[0]) for c in paper.curve) == on(digits.test)
    assert paper.metrics.f1 == max(paper.curve.f1)          # picked on test itself
    assert paper.test_curve is paper.curve
    # Hessian data: training images without the removed class vs test images.
    hx, hy = class_removal.hessian_data(digits, C, dataclasses.replace(QUICK, hessian_size=None))
    assert len(hy) == int((digits.train.y != C).sum()) and (hy != C).all()
    hx, hy = class_removal.hessian_data(digits, C, dataclasses.replace(QUICK, protocol="paper"))
    assert len(hy) == QUICK.hessian_size and np.isin(hx, digits.test.x).all()


def test_shared_mask_and_selection_rules(trained, digits):
    model, v = trained
    cfg = dataclasses.replace(QUICK, ratio=0.1, scores="gradients", rule="random")
    mask, selected, total = class_removal.removal_mask(model, v, digits, C, cfg)
    assert selected == sum(int(m.sum()) for m in jax.tree_util.tree_leaves(mask)) < total
    out = class_removal.remove_class(model, v, digits, C, cfg, weight_decay=WD, mask=mask)
    assert out.num_selected == selected and out.timings["selection"] < 0.1
    assert class_removal.removal_mask(model, v, digits, C, dataclasses.replace(cfg, method="if"))[0] is None


def test_agreement_with_a_reference_model(trained, digits):
    """With the true labels as the "reference model", agreement is the accuracy at the chosen step."""
    model, v = trained
    out = class_removal.remove_class(model, v, digits, C, QUICK, weight_decay=WD)
    assert out.agreement is None
    ref = class_removal.remove_class(model, v, digits, C, QUICK, weight_decay=WD, reference=digits.test.y)
    assert ref.step == out.step and ref.metrics == out.metrics     # the reference never picks the step
    assert ref.agreement == pytest.approx(out.metrics.test_acc)    # the other classes only
    preds = np.array([[1, 2, 3], [1, 0, 1]])
    np.testing.assert_allclose(class_removal.agreement(preds, np.array([1, 2, 0])), [2 / 3, 1 / 3])
    assert class_removal.agreement(preds[0], np.array([1, 2, 0]), np.array([True, False, True])) == 0.5
    poisoned = poison(digits, seed=0)
    truth = (digits.test.y, poisoned.test_triggered.y)
    bd = backdoor.correct_backdoor(model, v, digits, poisoned, QUICK, weight_decay=WD, reference=truth)
    n_clean, n_trig = len(truth[0]), len(truth[1])
    assert bd.agreement == pytest.approx((bd.metrics.clean_acc * n_clean + bd.metrics.relabel_acc * n_trig)
                                         / (n_clean + n_trig))


def test_paper_protocol_hessian_drops_the_removed_class(digits):
    """The official code estimates H on test images of the remaining classes only."""
    hx, hy = class_removal.hessian_data(digits, C, dataclasses.replace(QUICK, protocol="paper", hessian_size=None))
    keep = digits.test.y != C
    np.testing.assert_array_equal(hy, digits.test.y[keep])
    np.testing.assert_array_equal(hx, digits.test.x[keep])


def test_classifier_controls_and_rows_on_the_task_mask(trained, digits):
    model, v = trained
    cfg = dataclasses.replace(QUICK, ratio=0.05)   # classifier budget 16 < one 33-entry logit row
    x_u = digits.train.x[digits.train.y == C]
    mean_logits = np.asarray(model.apply(v, x_u)).mean(0)
    expected = {"abs_mean": int(np.argmax(np.abs(mean_logits))), "signed_logits": int(np.argmax(mean_logits))}
    for statistic, row in expected.items():
        mask, _, _ = class_removal.removal_mask(model, v, digits, C, dataclasses.replace(cfg, statistic=statistic))
        assert common.classifier_rows(v["params"], mask, C) == ((row,), row == C)
        hidden = mask["Dense_0"]
    assert int(hidden["kernel"].sum() + hidden["bias"].sum()) == int(0.05 * (64 * 32 + 32))
    mask, _, _ = class_removal.removal_mask(model, v, digits, C, dataclasses.replace(cfg, classifier="target_row"))
    assert common.classifier_rows(v["params"], mask, C) == ((C,), True)
    assert int(mask["Dense_1"]["kernel"].sum()) == int(0.05 * 330) and not bool(mask["Dense_1"]["bias"].any())
    mask, _, _ = class_removal.removal_mask(model, v, digits, C, dataclasses.replace(cfg, classifier="exclude"))
    assert common.classifier_rows(v["params"], mask, C) == ((), False)
    assert leaves_equal(mask["Dense_0"], hidden)                  # hidden layers unchanged
    assert common.classifier_rows(v["params"], None, C) == (tuple(range(10)), True)   # IF: all rows
    assert common.rows_text((1,), False, C) == "1 (target 3: no)" and common.rows_text((), None) == "none"


@pytest.mark.slow
def test_official_step_rule_keeps_the_best_f1_among_steps_below_the_self_accuracy_bound(trained, digits):
    model, v = trained
    cfg = dataclasses.replace(QUICK, ratio=0.3)
    free = class_removal.remove_class(model, v, digits, C, cfg, weight_decay=WD)
    bound = class_removal.remove_class(model, v, digits, C, dataclasses.replace(cfg, max_self_acc=0.005),
                                       weight_decay=WD)
    np.testing.assert_array_equal(free.curve.f1, bound.curve.f1)   # same update, another choice
    f1s, ok = np.asarray(bound.curve.f1), np.asarray(bound.curve.self_acc) < 0.005
    k = int(np.flatnonzero(ok)[np.argmax(f1s[ok])]) if ok.any() else 0
    assert bound.step == bound.steps[k] and bound.metrics == tuple(float(c[k]) for c in bound.test_curve)
    assert free.step == free.steps[int(np.argmax(f1s))]
    assert free.classifier_rows == bound.classifier_rows and isinstance(free.target_row, bool)


def leaves_equal(a, b) -> bool:
    return all(bool(jnp.all(x == y)) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def test_predictions_along_matches_moving_the_parameters_by_hand(trained, digits):
    model, v = trained
    d = jax.tree_util.tree_map(lambda p: jnp.full_like(p, 0.01), v["params"])
    x = digits.test.x[:37]
    got = common.predictions_along(model, v, d, np.array([0.0, 2.0]), x, batch_size=16)
    moved = {"params": jax.tree_util.tree_map(lambda p, q: p + 2.0 * q, v["params"], d)}
    np.testing.assert_array_equal(got[0], train.predict(model, v, x).argmax(-1))
    np.testing.assert_array_equal(got[1], train.predict(model, moved, x).argmax(-1))


# ----------------------------------------------------------------------------- backdoor correction


@pytest.mark.slow
def test_backdoor_experiment_pipeline():
    ds = data.load("digits", seed=0, val_fraction=0.2, max_train=400)
    exp = backdoor.run_experiment(ds, model=models.create("mlp", 10, hidden=(32,)),
                                  methods=("if", "gif"), config=QUICK,
                                  training=common.TrainConfig(epochs=8, batch_size=32,
                                                              learning_rate=1e-2))
    assert exp.trigger == trigger_for("digits")
    for r in exp.runs:
        m = r.metrics
        assert m.f1 == pytest.approx(2 * m.relabel_acc * m.clean_acc / (m.relabel_acc + m.clean_acc))
        assert tuple(float(c[0]) for c in r.test_curve) == tuple(exp.original)  # s = 0: poisoned
        assert r.metrics.f1 >= 0 and r.num_hvps == 1 + 2 * QUICK.max_steps + 2
    assert exp.retrained.corrupt_acc < exp.original.corrupt_acc


# ----------------------------------------------------------------------------- input errors


@pytest.mark.parametrize("config, match", [
    (TaskConfig(method="gift"), r"gifjax\.experiments\.tasks\.remove_class: bad `method`: got 'gift'; "
                                r"expected one of \['fif', 'gif', 'if', 'pif'\]"),
    (TaskConfig(ratio=0.0), r"bad `ratio`: got 0\.0; expected a float in \(0, 1\]"),
    (TaskConfig(ratio=1.5), r"bad `ratio`: got 1\.5; expected a float in \(0, 1\]"),
    (TaskConfig(protocol="test"), r"bad `protocol`: got 'test'; expected one of \['heldout', 'paper'\]"),
    (TaskConfig(scores="weights"), r"bad `scores`: got 'weights'"),
    (TaskConfig(max_steps=0), r"bad `max_steps`: got 0; expected an int >= 1"),
    (TaskConfig(min_step=1.0, max_step=0.5), r"bad `max_step`: got 0\.5; expected a finite float >= min_step"),
    (TaskConfig(classifier="none"), r"bad `classifier`: got 'none'; expected one of \['exclude', 'rule', 'target_row'\]"),
    (TaskConfig(statistic="max"), r"bad `statistic`: got 'max'; expected one of"),
    (TaskConfig(scores="gradients", statistic="post_activation"), r"bad `statistic`: got 'post_activation'"),
    (TaskConfig(max_self_acc=0.0), r"bad `max_self_acc`: got 0\.0; expected None or a float in \(0, 1\]"),
])
def test_bad_config_fails_early_with_a_clear_message(trained, digits, config, match):
    model, v = trained
    with pytest.raises(ValueError, match=match):
        class_removal.remove_class(model, v, digits, C, config, weight_decay=WD)


def test_bad_class_and_trigger_fail_with_clear_messages(trained, digits):
    model, v = trained
    with pytest.raises(ValueError, match=r"tasks\.remove_class: bad `removed_class`: got 10; "
                                         r"expected an int in \[0, 10\)"):
        class_removal.remove_class(model, v, digits, 10, QUICK, weight_decay=WD)
    with pytest.raises(ValueError, match=r"bad `fraction`: got 1\.5; expected a float in \(0, 1\)"):
        poison(digits, Trigger(fraction=1.5))
    with pytest.raises(ValueError, match=r"bad `target`: got 10; expected a class label in \[0, 10\)"):
        poison(digits, Trigger(target=10))
    with pytest.raises(ValueError, match=r"bad `amount`: got 300\.0; expected a number in \(0, 255\.0\]"):
        Trigger(amount=300.0).validate()


def test_backdoor_refuses_the_class_removal_step_rule(trained, digits):
    model, v = trained
    poisoned = poison(digits, trigger_for("digits"))
    with pytest.raises(ValueError, match=r"tasks\.correct_backdoor: bad `config\.max_self_acc`: got 0\.005; "
                                         r"expected None for the backdoor task"):
        backdoor.correct_backdoor(model, v, digits, poisoned, dataclasses.replace(QUICK, max_self_acc=0.005),
                                  weight_decay=WD)
