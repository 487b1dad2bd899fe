"""Equilibrium propagation and coupled learning against their oracles, end to end, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pnn.config import TrainConfig
from pnn.controller import PhysicalNoProp
from pnn.errors import ConfigError
from pnn.experiment import train
from pnn.learning import CoupledLearning, RuleContext, get_loss, make_rule
from pnn.network import PhysicalNetwork, Readout
from pnn.runs import load_tree
from pnn.simulators.crossbar import CrossbarNode
from pnn.simulators.hopfield import HopfieldNode
from pnn.simulators.resistive import RESISTIVE_PRESETS, ResistiveNode

REPO = Path(__file__).resolve().parents[1]
IDEAL = RESISTIVE_PRESETS["ideal"]


def context(n_classes: int = 3, loss: str = "mse", seed: int = 0) -> RuleContext:
    return RuleContext(rng=np.random.default_rng(seed), loss=get_loss(loss), n_classes=n_classes)


def relative_error(estimate: dict, reference: dict) -> float:
    difference = sum(np.sum((estimate[k] - reference[k]) ** 2) for k in reference)
    return float(np.sqrt(difference / sum(np.sum(reference[k] ** 2) for k in reference)))


def log_log_slope(betas, errors) -> float:
    return float(np.polyfit(np.log(betas), np.log(errors), 1)[0])


def diode_network() -> PhysicalNetwork:
    """A resistive network whose first layer follows +x strongly, so that the diodes conduct."""
    node = ResistiveNode(4, 3, hidden=(5,), diodes="all", config=IDEAL, rng=0)
    params = node.get_parameters()
    params["g_layer1"][:, :4] = 90.0
    params["g_layer1"][:, 4:8] = 2.0
    node.set_parameters(params)
    return PhysicalNetwork([node, Readout(3)])


def interior_hopfield() -> PhysicalNetwork:
    """A Hopfield network whose equilibria lie inside (0, 1): small weights, biases at 0.5."""
    node = HopfieldNode(4, 3, hidden=(5,), rng=0, init_scale=0.15)
    node.set_parameters({k: np.full(s.shape, 0.5) for k, s in node.parameters.items() if k.startswith("bias")})
    return PhysicalNetwork([node, Readout(3)])


def implicit_gradient(network: PhysicalNetwork, x, labels, ctx, **settle) -> dict:
    """The reference: the node's implicit-differentiation gradient at the free equilibrium."""
    node = network[0]
    state = node.settle(x, **settle)
    _, error = ctx.loss(state.outputs, labels)
    return node.local_gradient(state, error)


def ep_gradient(network, x, labels, ctx, **options) -> dict:
    rule = make_rule("ep", **options)
    rule.setup(network, ctx)
    return rule.compute(network, x, labels, ctx).gradients[0]


# ------------------------------------------------------------------------------ oracles
def test_resistive_one_sided_error_is_linear_in_beta():
    network = diode_network()
    x = np.random.default_rng(1).uniform(-1, 1, (6, 4))
    labels = np.array([0, 1, 2, 0, 1, 2])
    ctx = context()
    reference = implicit_gradient(network, x, labels, ctx)
    betas = [1e-5 / 2**k for k in range(6)]
    errors = [relative_error(ep_gradient(network, x, labels, ctx, beta=b, variant="one-sided"), reference) for b in betas]
    assert 0.8 <= log_log_slope(betas, errors) <= 1.2, errors
    assert errors[-1] < 2e-3


def test_resistive_centered_error_is_quadratic_in_beta():
    network = diode_network()
    x = np.random.default_rng(1).uniform(-1, 1, (6, 4))
    labels = np.array([0, 1, 2, 0, 1, 2])
    ctx = context()
    reference = implicit_gradient(network, x, labels, ctx)
    betas = [1e-5 / 2**k for k in range(6)]
    errors = [relative_error(ep_gradient(network, x, labels, ctx, beta=b, variant="centered"), reference) for b in betas]
    assert 1.8 <= log_log_slope(betas, errors) <= 2.2, errors
    assert errors[-1] < 1e-5


def test_hopfield_one_sided_error_is_linear_in_beta():
    network = interior_hopfield()
    x = np.random.default_rng(1).uniform(0, 1, (6, 4))
    labels = np.array([0, 1, 2, 0, 1, 2])
    ctx = context()
    reference = implicit_gradient(network, x, labels, ctx, iterations=500)
    betas = [0.2 / 2**k for k in range(6)]
    errors = [
        relative_error(
            ep_gradient(network, x, labels, ctx, beta=b, variant="one-sided", free_iterations=500, nudged_iterations=500),
            reference,
        )
        for b in betas
    ]
    assert 0.8 <= log_log_slope(betas, errors) <= 1.2, errors


def test_hopfield_centered_estimate_is_exact():
    # Inside the unit box the hard-sigmoid energy is quadratic, so the nudged state is linear in
    # beta and the centred difference cancels the whole bias, not only its first order.
    network = interior_hopfield()
    x = np.random.default_rng(1).uniform(0, 1, (6, 4))
    labels = np.array([0, 1, 2, 0, 1, 2])
    ctx = context()
    reference = implicit_gradient(network, x, labels, ctx, iterations=500)
    for beta in (0.2, 0.01):
        estimate = ep_gradient(network, x, labels, ctx, beta=beta, variant="centered", free_iterations=500,
                               nudged_iterations=500)
        assert relative_error(estimate, reference) < 1e-9


def test_linear_resistor_network_ep_equals_adjoint():
    node = ResistiveNode(4, 3, hidden=(5,), diodes="none", config=IDEAL, rng=6)
    network = PhysicalNetwork([node, Readout(3)])
    x = np.random.default_rng(2).uniform(-1, 1, (6, 4))
    labels = np.array([2, 1, 0, 2, 1, 0])
    ctx = context()
    reference = implicit_gradient(network, x, labels, ctx)
    # On a linear network the centred estimate is exact for any beta.
    estimate = ep_gradient(network, x, labels, ctx, beta=1e-4, variant="centered")
    for key in reference:
        scale = np.max(np.abs(reference[key]))
        np.testing.assert_allclose(estimate[key], reference[key], rtol=0, atol=1e-8 * scale, err_msg=key)
    one_sided = ep_gradient(network, x, labels, ctx, beta=1e-9, variant="one-sided")
    assert relative_error(one_sided, reference) < 1e-5


def test_random_sign_draws_both_signs():
    network = diode_network()
    x = np.random.default_rng(1).uniform(-1, 1, (6, 4))
    labels = np.array([0, 1, 2, 0, 1, 2])
    ctx = context()
    reference = implicit_gradient(network, x, labels, ctx)
    rule = make_rule("ep", beta=1e-6, variant="random-sign")
    rule.setup(network, ctx)
    signs = []
    for _ in range(12):
        result = rule.compute(network, x, labels, ctx)
        signs.append(np.sign(result.extras["beta"]))
        assert relative_error(result.gradients[0], reference) < 1e-2
    assert set(signs) == {-1.0, 1.0}


def test_coupled_clamps_outputs_to_target():
    network = diode_network()
    node = network[0]
    x = np.random.default_rng(1).uniform(-1, 1, (6, 4))
    labels = np.array([0, 1, 2, 0, 1, 2])
    rule = CoupledLearning(eta=0.05, clamp_tolerance=1e-6)
    rule.setup(network, context())
    free = node.settle(x)
    error = free.outputs - np.eye(3)[labels]
    clamped = rule.perturbed_state(node, x, free, error, rule.eta)
    np.testing.assert_allclose(clamped.outputs, free.outputs - 0.05 * error, rtol=0, atol=1e-6)


def test_coupled_update_follows_gradient():
    network = diode_network()
    x = np.random.default_rng(1).uniform(-1, 1, (6, 4))
    labels = np.array([0, 1, 2, 0, 1, 2])
    ctx = context()
    reference = implicit_gradient(network, x, labels, ctx)
    rule = make_rule("coupled", eta=0.01, variant="centered", clamp_tolerance=1e-7)
    rule.setup(network, ctx)
    estimate = rule.compute(network, x, labels, ctx).gradients[0]
    dot = sum(np.sum(estimate[k] * reference[k]) for k in reference)
    norms = np.sqrt(sum(np.sum(estimate[k] ** 2) for k in reference) * sum(np.sum(reference[k] ** 2) for k in reference))
    # Clamping the outputs by -eta e equals injecting -eta K^-1 e, K the outputs' response to
    # currents, so the update is the gradient for the output error K^-1 e instead of e. Here the
    # cosine with the gradient is 0.999; the bound leaves room for a less uniform K.
    assert dot / norms > 0.9


# ------------------------------------------------------------------------- persistent states
def test_persistent_states_start_from_last_free_state():
    node = HopfieldNode(4, 3, hidden=(5,), rng=0, init_scale=3.0)
    network = PhysicalNetwork([node, Readout(3)])
    x = np.random.default_rng(1).uniform(0, 1, (6, 4))
    labels = np.array([0, 1, 2, 0, 1, 2])
    ctx = context()
    rule = make_rule("ep", persistent=True, free_iterations=3)
    rule.setup(network, ctx)
    ctx.batch_indices = np.array([10, 11, 12, 13, 14, 15])
    rule.compute(network, x, labels, ctx)
    first = rule.states_[10:16].copy()
    np.testing.assert_allclose(first, node.settle(x, iterations=3).probes["state"], rtol=1e-6)
    assert not rule.seen_[:10].any()

    # No update was applied, so the second free phase continues the first: 3 + 3 iterations.
    rule.compute(network, x, labels, ctx)
    continued = node.settle(x, iterations=6).probes["state"]
    np.testing.assert_allclose(rule.states_[10:16], continued, rtol=1e-5, atol=1e-6)
    assert not np.allclose(continued, first)

    ctx.batch_indices = None
    with pytest.raises(ConfigError, match="example indices"):
        rule.compute(network, x, labels, ctx)


# -------------------------------------------------------------------------- end to end
def test_hopfield_learns_toy_task():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (200, 6))
    labels = np.argmax(x[:, :3] - x[:, 3:], axis=1)
    node = HopfieldNode(6, 3, hidden=(20,), rng=1)
    network = PhysicalNetwork([node, Readout(3)])
    rule = make_rule("ep")
    controller = PhysicalNoProp(network, rule, loss="mse", optimizer="sgd", momentum=0.0, lr=0.5,
                                lr_schedule="constant", epochs=30, batch_size=10, progress=False)
    before = controller.evaluate(x, labels)["accuracy"]
    controller.fit(x, labels)
    after = controller.evaluate(x, labels)["accuracy"]
    assert before < 0.6
    assert after > 0.9


def test_resistive_learns_vowels_subset(tmp_path):
    config = TrainConfig(rule="ep", device="resistive", hidden=[16], epochs=15, seed=0, out=str(tmp_path / "run"),
                         rule_options={"variant": "centered"})
    summary = train(config, progress=False)
    # Chance is 1/7; the full run in docs/learning-rules.md reaches more.
    assert summary["test_accuracy"] > 0.6
    assert summary["rejected_batches"] == 0


class StopAfterFirstEpoch(Exception):
    pass


def stop_after_first_epoch(controller, record):
    raise StopAfterFirstEpoch


def _flat(tree, prefix=""):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _flat(value, f"{prefix}/{key}")
    elif isinstance(tree, np.ndarray):
        yield prefix, tree


@pytest.mark.parametrize("device", ["digital", "resistive"])
def test_resume_matches_uninterrupted_run(tmp_path, device):
    options = {"variant": "random-sign", "persistent": True}
    config = dict(rule="ep", device=device, hidden=[8], epochs=3, seed=2, rule_options=options, n_train=64)
    reference = train(TrainConfig(out=str(tmp_path / "full"), **config), progress=False)
    with pytest.raises(StopAfterFirstEpoch):
        train(TrainConfig(out=str(tmp_path / "cut"), **config), progress=False, callbacks=[stop_after_first_epoch])
    resumed = train(resume=tmp_path / "cut", progress=False)

    assert resumed["test_accuracy"] == reference["test_accuracy"]
    full = dict(_flat(load_tree(tmp_path / "full" / "checkpoint.npz")))
    cut = dict(_flat(load_tree(tmp_path / "cut" / "checkpoint.npz")))
    assert any(key.startswith("/rule/states") for key in full)
    assert full.keys() == cut.keys()
    for key in full:
        np.testing.assert_array_equal(cut[key], full[key], err_msg=key)


# ---------------------------------------------------------------------------- bad input
def test_node_that_cannot_settle_is_named():
    network = PhysicalNetwork([CrossbarNode(4, 3, rng=0, name="xbar"), Readout(3)])
    for name in ("ep", "coupled"):
        with pytest.raises(ConfigError, match="node 'xbar' \\(CrossbarNode\\) cannot settle"):
            make_rule(name).setup(network, context())


def test_non_positive_strength_raises():
    for value in (0.0, -0.5, float("nan"), True):
        with pytest.raises(ConfigError, match="beta must be a positive number"):
            make_rule("ep", beta=value)
        with pytest.raises(ConfigError, match="eta must be a positive number"):
            make_rule("coupled", eta=value)


def test_unknown_options_raise():
    with pytest.raises(ConfigError, match="rule 'ep': invalid option"):
        make_rule("ep", betta=0.5)
    with pytest.raises(ConfigError, match="unknown variant 'symmetric'"):
        make_rule("ep", variant="symmetric")
    with pytest.raises(ConfigError, match="free_iterations must be a positive integer"):
        make_rule("ep", free_iterations=0)
    with pytest.raises(ConfigError, match="layer_lr must be a list"):
        make_rule("ep", layer_lr="0.1")
    with pytest.raises(ConfigError, match="persistent must be true or false"):
        make_rule("ep", persistent="yes")


def test_options_that_do_not_fit_the_node_raise():
    resistive = PhysicalNetwork([ResistiveNode(4, 3, rng=0, name="res"), Readout(3)])
    with pytest.raises(ConfigError, match="node 'res' settles to convergence.*free_iterations"):
        make_rule("ep", free_iterations=10).setup(resistive, context())
    hopfield = PhysicalNetwork([HopfieldNode(4, 3, hidden=(5,), name="hop"), Readout(3)])
    with pytest.raises(ConfigError, match="layer_lr has 3 entries but node 'hop' has 2 layers"):
        make_rule("ep", layer_lr=[0.1, 0.1, 0.1]).setup(hopfield, context())
    with pytest.raises(ConfigError, match="clamps output voltages, but node 'hop'"):
        make_rule("coupled").setup(hopfield, context())


def test_two_trainable_nodes_raise():
    network = PhysicalNetwork([
        ResistiveNode(4, 3, rng=0, name="first"), ResistiveNode(3, 2, rng=1, name="second"), Readout(2),
    ])
    with pytest.raises(ConfigError, match="2 trainable nodes \\['first', 'second'\\]"):
        make_rule("ep").setup(network, context())


def test_layer_lr_scales_each_layer():
    network = interior_hopfield()
    x = np.random.default_rng(1).uniform(0, 1, (6, 4))
    labels = np.array([0, 1, 2, 0, 1, 2])
    plain = ep_gradient(network, x, labels, context())
    scaled = ep_gradient(network, x, labels, context(), layer_lr=[0.1, 0.05])
    for key, factor in (("weight1", 0.1), ("bias1", 0.1), ("weight2", 0.05), ("bias2", 0.05)):
        np.testing.assert_allclose(scaled[key], factor * plain[key], rtol=1e-12, err_msg=key)


def run_pnn(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "pnn", *args], capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rule", "ep"], "rule 'ep' needs a network that settles; use --device digital"),
        (["--rule", "coupled", "--device", "digital"], "rule 'coupled' needs a network that settles; use --device resistive"),
        (["--rule", "ep", "--device", "resistive", "--rule-option", "beta=-1"], "beta must be a positive number, got -1"),
        (["--rule", "ep", "--device", "digital", "--rule-option", "bta=1"], "rule 'ep': invalid option"),
    ],
)
def test_cli_bad_input_gives_one_line(tmp_path, args, message):
    out = tmp_path / "run"
    result = run_pnn("train", "--quiet", "--out", str(out), *args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert message in lines[0]
    assert not (out / "checkpoint.npz").exists()


def test_cli_trains_hopfield_with_rule_options(tmp_path):
    out = tmp_path / "run"
    result = run_pnn(
        "train", "--quiet", "--rule", "ep", "--device", "digital", "--hidden", "16", "--epochs", "2", "--loss", "mse",
        "--rule-option", "variant=centered", "--rule-option", "beta=0.3", "--rule-option", "free_iterations=15",
        "--out", str(out),
    )
    assert result.returncode == 0, result.stderr
    identity = json.loads((out / "identity.json").read_text())
    assert identity["rule"]["variant"] == "centered"
    assert identity["rule"]["beta"] == 0.3
    hopfield = next(node for node in identity["nodes"] if node["name"] == "hopfield")
    assert hopfield["iterations"] == 15
    assert float(result.stdout.split(": ")[1]) > 1 / 7
