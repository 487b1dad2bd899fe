"""Layer-local losses: head and node gradients against finite differences, locality, checkpoints."""

from __future__ import annotations

import numpy as np
import pytest

from pnn.config import TrainConfig
from pnn.controller import PhysicalNoProp
from pnn.errors import ConfigError
from pnn.experiment import train
from pnn.learning import (
    LocalContrast,
    LocalDirect,
    LocalPredict,
    LocalPseudo,
    LocalReconstruction,
    RuleContext,
    get_loss,
    make_rule,
)
from pnn.learning.local_heads import supervised_contrastive
from pnn.learning.losses import one_hot
from pnn.network import DigitalLinear, PhysicalNetwork, Readout
from pnn.nodes import Node, ParameterSpec

LOCAL_RULES = ("local-direct", "local-recon", "local-contrast", "local-predict", "local-pseudo")


def digital_network(sizes, activation="tanh", seed=0):
    layers = [
        DigitalLinear(sizes[i], sizes[i + 1], activation=activation if i < len(sizes) - 2 else "linear",
                      rng=seed + i, name=f"fc{i}", dtype=np.float64)
        for i in range(len(sizes) - 1)
    ]
    return PhysicalNetwork([*layers, Readout(sizes[-1])])


def context(n_classes, seed=0):
    return RuleContext(rng=np.random.default_rng(seed), loss=get_loss("cross_entropy"), n_classes=n_classes)


def prepared(rule, sizes, rng, batch=12, n_classes=3):
    network = digital_network(sizes)
    ctx = context(n_classes)
    rule.setup(network, ctx)
    x = rng.uniform(-1, 1, (batch, sizes[0]))
    # Every class twice or more, so the contrastive loss has positives.
    labels = np.arange(batch) % n_classes
    return network, ctx, x, labels


def local_loss_of(rule, network, ctx, x, labels, node):
    """The local loss of ``node`` from a fresh forward pass, as the rule computes it."""
    outputs = network.forward(x)
    _, error = ctx.loss(outputs, labels)
    last = network.trainable_indices[-1]
    output_error = network.backward_to(last, error)
    return rule.local_errors(network, network.states, labels, output_error, ctx)[node][0]


# ------------------------------------------------------------------------ gradient checks
HEAD_RULES = [
    lambda: LocalDirect(),
    lambda: LocalReconstruction(),
    lambda: LocalContrast(projection_dim=5, temperature=0.3),
    lambda: LocalPredict(target_step=0.7),
]


@pytest.mark.parametrize("make", HEAD_RULES, ids=["direct", "recon", "contrast", "predict"])
def test_head_gradient_matches_finite_differences(make, rng):
    rule = make()
    network, ctx, x, labels = prepared(rule, [4, 6, 5, 3], rng)
    outputs = network.forward(x)
    _, error = ctx.loss(outputs, labels)
    output_error = network.backward_to(network.trainable_indices[-1], error)
    result = rule.local_errors(network, network.states, labels, output_error, ctx)
    eps = 1e-6
    for i in rule.hidden_:
        head = rule.heads_[i]
        for name, array in head.parameters().items():
            numeric = np.zeros_like(array)
            for k in range(array.size):
                saved = array.flat[k]
                values = []
                for sign in (1, -1):
                    array.flat[k] = saved + sign * eps
                    values.append(rule.local_errors(network, network.states, labels, output_error, ctx)[i][0])
                array.flat[k] = saved
                numeric.flat[k] = (values[0] - values[1]) / (2 * eps)
            np.testing.assert_allclose(result[i][2][name], numeric, rtol=1e-5, atol=1e-8, err_msg=f"{i} {name}")


@pytest.mark.parametrize(
    "make",
    [*HEAD_RULES, lambda: LocalContrast(projection_dim=0), lambda: LocalPseudo()],
    ids=["direct", "recon", "contrast", "predict", "contrast-no-head", "pseudo"],
)
def test_node_error_is_gradient_of_local_loss(make, rng):
    # The error a hidden node gets equals batch size times d(local loss)/d(its outputs).
    rule = make()
    network, ctx, x, labels = prepared(rule, [4, 6, 5, 3], rng)
    node = rule.hidden_[0]
    outputs = network.forward(x)
    _, error = ctx.loss(outputs, labels)
    output_error = network.backward_to(network.trainable_indices[-1], error)
    states = network.states
    node_error = rule.local_errors(network, states, labels, output_error, ctx)[node][1]

    h = np.asarray(states[node].outputs, dtype=np.float64)
    numeric = np.zeros_like(h)
    eps = 1e-6
    for k in range(h.size):
        values = []
        for sign in (1, -1):
            trial = h.copy()
            trial.flat[k] += sign * eps
            shifted = list(states)
            shifted[node] = type(states[node])(inputs=states[node].inputs, outputs=trial, probes=states[node].probes)
            values.append(rule.local_errors(network, shifted, labels, output_error, ctx)[node][0])
        numeric.flat[k] = (values[0] - values[1]) / (2 * eps)
    np.testing.assert_allclose(node_error, h.shape[0] * numeric, rtol=1e-5, atol=1e-8)


def slow_supervised_contrastive(z, labels, temperature):
    """Reference: the supervised contrastive loss written as loops over anchors and positives."""
    total, anchors = 0.0, 0
    for i in range(len(z)):
        u_i = z[i] / np.linalg.norm(z[i])
        positives = [p for p in range(len(z)) if p != i and labels[p] == labels[i]]
        if not positives:
            continue
        others = [a for a in range(len(z)) if a != i]
        log_norm = np.log(sum(np.exp(u_i @ (z[a] / np.linalg.norm(z[a])) / temperature) for a in others))
        total += -np.mean([u_i @ (z[p] / np.linalg.norm(z[p])) / temperature - log_norm for p in positives])
        anchors += 1
    return total / anchors if anchors else 0.0


def test_supervised_contrastive_matches_reference(rng):
    z = rng.normal(size=(9, 4))
    labels = np.array([0, 1, 2, 0, 1, 0, 3, 1, 2])
    loss, grad, anchors = supervised_contrastive(z, labels, 0.2)
    assert anchors == 8  # class 3 has a single example
    assert loss == pytest.approx(slow_supervised_contrastive(z, labels, 0.2), rel=1e-12)
    eps = 1e-6
    numeric = np.zeros_like(z)
    for k in range(z.size):
        plus, minus = z.copy(), z.copy()
        plus.flat[k] += eps
        minus.flat[k] -= eps
        numeric.flat[k] = (slow_supervised_contrastive(plus, labels, 0.2)
                           - slow_supervised_contrastive(minus, labels, 0.2)) / (2 * eps)
    np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-9)


def test_supervised_contrastive_without_positives_is_zero(rng):
    loss, grad, anchors = supervised_contrastive(rng.normal(size=(3, 4)), np.array([0, 1, 2]), 0.5)
    assert (loss, anchors) == (0.0, 0)
    assert not np.any(grad)


def test_pseudo_error_is_random_target_projection(rng):
    rule = LocalPseudo(feedback_scale=2.0)
    network, ctx, x, labels = prepared(rule, [4, 6, 3], rng)
    outputs = network.forward(x)
    result = rule.local_errors(network, network.states, labels, None, ctx)
    expected = -one_hot(labels, 3) @ rule.projections_[0].matrix.T
    np.testing.assert_array_equal(result[0][1], expected)


# ------------------------------------------------------------------------------- locality
def test_hidden_updates_ignore_the_rest_of_the_network(rng):
    rule = LocalReconstruction()
    network, ctx, x, labels = prepared(rule, [4, 6, 5, 3], rng)
    first = rule.compute(network, x, labels, ctx).gradients
    # A different output layer and other labels change the output node's gradient only.
    network[2].set_parameters({"weight": 3.0 * network[2].get_parameters()["weight"]})
    second = rule.compute(network, x, (labels + 1) % 3, ctx).gradients
    for i in (0, 1):
        np.testing.assert_array_equal(first[i]["weight"], second[i]["weight"])
    assert not np.allclose(first[2]["weight"], second[2]["weight"])


def test_hidden_update_is_local_gradient_of_local_error(rng):
    rule = LocalDirect()
    network, ctx, x, labels = prepared(rule, [4, 6, 3], rng)
    gradients = rule.compute(network, x, labels, ctx).gradients
    states = network.states
    _, error = ctx.loss(network[2].measure_state().outputs, labels)
    node_error = rule.local_errors(network, states, labels, error, ctx)[0][1]
    expected = network[0].local_gradient(states[0], node_error)
    np.testing.assert_allclose(gradients[0]["weight"], expected["weight"], rtol=1e-12)


# --------------------------------------------------------------------------- heads and state
def test_heads_train_only_after_accepted_batch(rng):
    rule = LocalDirect(head_lr=0.01)
    network, ctx, x, labels = prepared(rule, [4, 6, 3], rng)
    before = rule.heads_[0].weight.copy()
    rule.compute(network, x, labels, ctx)
    np.testing.assert_array_equal(rule.heads_[0].weight, before)
    rule.after_update(network, ctx)
    assert not np.allclose(rule.heads_[0].weight, before)
    # A second after_update without a new batch changes nothing.
    trained = rule.heads_[0].weight.copy()
    rule.after_update(network, ctx)
    np.testing.assert_array_equal(rule.heads_[0].weight, trained)


@pytest.mark.parametrize("name", LOCAL_RULES)
def test_state_dict_round_trip(name, rng):
    rule = make_rule(name)
    network, ctx, x, labels = prepared(rule, [4, 6, 5, 3], rng)
    for _ in range(3):
        rule.compute(network, x, labels, ctx)
        rule.after_update(network, ctx)
    state = rule.state_dict()

    copy = make_rule(name)
    copy.setup(digital_network([4, 6, 5, 3]), context(3, seed=9))
    copy.load_state_dict(state)
    reference = rule.compute(network, x, labels, ctx).gradients
    restored = copy.compute(network, x, labels, ctx).gradients
    for i in reference:
        np.testing.assert_array_equal(reference[i]["weight"], restored[i]["weight"])
    rule.after_update(network, ctx)
    copy.after_update(network, ctx)
    for i, head in rule.heads_.items():
        np.testing.assert_array_equal(head.weight, copy.heads_[i].weight)


def test_state_with_wrong_head_shape_rejected(rng):
    rule = LocalDirect()
    prepared(rule, [4, 6, 3], rng)
    state = rule.state_dict()
    state["heads"]["0"]["weight"] = np.zeros((2, 2))
    with pytest.raises(ConfigError, match=r"saved head weight has shape \(2, 2\), expected \(3, 6\)"):
        rule.load_state_dict(state)


# ------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("local-direct", {"head_lr": 0}, "head_lr must be a positive number"),
        ("local-contrast", {"temperature": -1}, "temperature must be a positive number"),
        ("local-contrast", {"projection_dim": -2}, "projection_dim must be an integer >= 0"),
        ("local-predict", {"target_step": 0.0}, "target_step must be a positive number"),
        ("local-pseudo", {"feedback_scale": "big"}, "feedback_scale must be a positive number"),
        ("local-pseudo", {"head_lr": 1e-3}, "invalid option"),
        ("local-recon", {"temperature": 0.5}, "invalid option"),
    ],
)
def test_bad_options(name, options, message):
    with pytest.raises(ConfigError, match=message):
        make_rule(name, **options)


@pytest.mark.parametrize("name", LOCAL_RULES)
def test_needs_a_hidden_node(name):
    network = digital_network([4, 3])
    with pytest.raises(ConfigError, match="node 'fc0' is the only trainable node"):
        make_rule(name).check(network)


class ModelFreeLinear(DigitalLinear):
    """A trainable node that offers no local gradient, like an instrument without a model."""

    gradient_method = "none"


@pytest.mark.parametrize("name", LOCAL_RULES)
def test_needs_local_gradient(name):
    network = PhysicalNetwork([ModelFreeLinear(4, 5, rng=0, name="black-box"), DigitalLinear(5, 3, rng=1), Readout(3)])
    with pytest.raises(ConfigError, match="node 'black-box' .* no local gradient"):
        make_rule(name).check(network)


class OpaqueTail(Node):
    """A fixed stage after the last trainable node with no model of itself (no input_gradient)."""

    def __init__(self, n: int) -> None:
        super().__init__("optics", n, n, input_spec=ParameterSpec((n,), -1e3, 1e3, "1"), output_unit="1")

    def _forward(self, x):
        return x.copy(), x, {}


@pytest.mark.parametrize("name", LOCAL_RULES)
def test_needs_model_after_last_trainable_node(name):
    network = PhysicalNetwork([DigitalLinear(4, 5, rng=0, name="h"), DigitalLinear(5, 3, rng=1, name="out"), OpaqueTail(3)])
    with pytest.raises(ConfigError, match="node 'optics' after the last trainable node has no model"):
        make_rule(name).check(network)


# ------------------------------------------------------------------------------- learning
def blobs(rng, n=150):
    x = rng.uniform(-1, 1, (n, 4))
    labels = np.argmax(x[:, :3] + 0.3 * x[:, 3:4], axis=1)
    return x, labels


@pytest.mark.parametrize("name", LOCAL_RULES)
def test_rule_learns_small_task(name, rng):
    x, labels = blobs(rng)
    network = digital_network([4, 16, 16, 3], seed=7)
    controller = PhysicalNoProp(network, make_rule(name), lr=0.01, epochs=40, batch_size=15, progress=False)
    controller.fit(x, labels)
    history = controller.history_
    assert history[-1]["train_loss"] < 0.5 * history[0]["train_loss"]
    assert controller.evaluate(x, labels)["accuracy"] > 0.85


@pytest.mark.parametrize("name", LOCAL_RULES)
def test_vowels_short_run(name, tmp_path):
    config = TrainConfig(rule=name, device="crossbar", epochs=10, seed=1, out=str(tmp_path / "run"))
    summary = train(config, progress=False)
    assert summary["rejected_batches"] == 0
    # Ten epochs reach about 0.8 here; chance is 1/7.
    assert summary["test_accuracy"] > 0.6


def test_resume_restores_heads(tmp_path):
    config = dict(rule="local-direct", device="digital", epochs=2, hidden=[8, 8], seed=2)
    reference = train(TrainConfig(out=str(tmp_path / "full"), **config), progress=False)

    class StopAfterFirstEpoch(Exception):
        pass

    def stop(controller, record):
        raise StopAfterFirstEpoch

    with pytest.raises(StopAfterFirstEpoch):
        train(TrainConfig(out=str(tmp_path / "split"), **config), progress=False, callbacks=[stop])
    resumed = train(resume=tmp_path / "split", progress=False)
    assert resumed["train_loss"] == pytest.approx(reference["train_loss"], rel=1e-12)
