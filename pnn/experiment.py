"""From a configuration to a finished run: data, network, rule, controller and run folder.

``pnn train`` calls :func:`train`; scripts and sweeps may call it too.
"""

from __future__ import annotations

import datetime as _dt
import inspect
import itertools
import json
import logging
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .config import TrainConfig, config_from_mapping, resolve_config
from .controller import PhysicalNoProp
from .datasets import Dataset, load_dataset
from .errors import ConfigError
from .learning import RULES, make_rule
from .learning.base import NodeFactory
from .network import Encoder, PhysicalNetwork, Readout
from .nodes import Node
from .runs import RunDir
from .simulators import get_device

__all__ = ["train", "build_network", "make_rule_for", "default_run_dir"]

log = logging.getLogger(__name__)


def default_run_dir(config: TrainConfig) -> Path:
    """Return ``runs/<date>-<time>-<dataset>-<rule>`` under the working directory."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{config.dataset}-{config.rule}"


def _encoder_for(first: Node, config: TrainConfig, x_train: np.ndarray) -> Encoder:
    # Data goes to [-1, 1], or to the first node's input range where that is narrower.
    lower = max(float(np.max(first.input_spec.lower_array)), -1.0)
    upper = min(float(np.min(first.input_spec.upper_array)), 1.0)
    return Encoder(first.n_in, lower=lower, upper=upper, method=config.encoder).fit(x_train)


def build_network(config: TrainConfig, dataset: Dataset) -> tuple[PhysicalNetwork, NodeFactory | None]:
    """Build encoder, physical layers and readout for a resolved configuration.

    Returns the network and a factory for extra nodes of the same device kind (rules with
    physical feedback use it).
    """
    n_features = dataset.x_train.shape[1]
    # Rules whose networks are not a chain of layers (NoProp's blocks, EP's settling networks)
    # build their own, through a ``build_network(config, dataset)`` class method.
    custom = getattr(RULES.get(config.rule), "build_network", None)
    if custom is not None:
        return custom(config, dataset)
    if config.station:
        from .devices.station import build_station_layers  # noqa: PLC0415 - optional part

        layers = build_station_layers(config.station, n_features, dataset.n_classes)
        factory = None
    else:
        device = get_device(config.device)
        device_config = device.config(config.preset, config.device_options)
        preset = config.preset or device.default_preset
        sizes = [n_features, *config.hidden, dataset.n_classes]
        layers = []
        for i in range(len(sizes) - 1):
            last = i == len(sizes) - 2
            layers.append(
                device.build(
                    sizes[i], sizes[i + 1], name=f"layer{i + 1}",
                    activation="linear" if last else config.activation,
                    config=device_config, rng=np.random.default_rng([config.seed, i + 1]), preset=preset,
                )
            )
        counter = itertools.count(1)

        def factory(n_in: int, n_out: int, name: str, activation: str) -> Node:
            seed = np.random.default_rng([config.seed, 1000 + next(counter)])
            return device.build(n_in, n_out, name=name, activation=activation, config=device_config, rng=seed, preset=preset)

    encoder = _encoder_for(layers[0], config, dataset.x_train)
    network = PhysicalNetwork([encoder, *layers, Readout(layers[-1].n_out)])
    if network.n_out != dataset.n_classes:
        raise ConfigError(
            f"the network has {network.n_out} outputs but the dataset has {dataset.n_classes} classes"
        )
    return network, factory


def make_rule_for(config: TrainConfig):
    """Build the configured rule, passing ``feedback`` to rules that take one."""
    if config.rule not in RULES:
        raise ConfigError(f"unknown rule {config.rule!r}; choose one of {', '.join(sorted(RULES))}")
    options = dict(config.rule_options)
    accepted = inspect.signature(RULES[config.rule].__init__).parameters
    if "feedback" in accepted:
        options.setdefault("feedback", config.feedback)
    elif config.feedback != "random":
        raise ConfigError(f"rule {config.rule!r} has no feedback path; remove --feedback {config.feedback}")
    return make_rule(config.rule, **options)


def _plot_curves(run: RunDir) -> None:
    try:
        from .plots import plot_training_curves  # noqa: PLC0415 - matplotlib is optional
    except ImportError:
        log.info("matplotlib is not installed, so no training curves are drawn (pip install 'pnn-lab[plot]')")
        return
    plot_training_curves(run.read_metrics(), run.path / "curves.png")


def _uses_calibrations(config: TrainConfig) -> bool:
    """True when the run looks up or makes calibration records (stations, or when asked)."""
    if config.calibration == "off":
        return False
    return bool(config.station or config.calibrations or config.twin_gradients or config.drift_check)


def _prepare_calibrations(network: PhysicalNetwork, config: TrainConfig, run: RunDir | None) -> Any:
    """Look up and apply the network's calibrations; a resumed run keeps the ones it started with."""
    from .calibration import CalibrationStore  # noqa: PLC0415 - SciPy loads only when needed
    from .calibration.training import CALIBRATION_FILE, prepare_calibrations  # noqa: PLC0415

    if run is None:
        return prepare_calibrations(network, config)
    path = run.path / CALIBRATION_FILE
    pinned = None
    if path.exists():
        used = json.loads(path.read_text(encoding="utf-8"))
        pinned = {name: entry.get("record") for name, entry in used.get("nodes", {}).items()}
    return prepare_calibrations(network, config, pinned=pinned, pinned_store=CalibrationStore(run.path / "calibrations"))


def train(
    config: TrainConfig | None = None,
    *,
    resume: str | Path | None = None,
    progress: bool = True,
    callbacks: list | None = None,
    step_callbacks: list | None = None,
) -> dict[str, Any]:
    """Run one training from a configuration, or resume one from its run folder.

    ``callbacks`` and ``step_callbacks`` are passed to :class:`~pnn.controller.PhysicalNoProp`.
    Returns the summary that is also written to the run folder's ``summary.json``.
    """
    started = time.perf_counter()
    if resume is not None:
        run = RunDir.open(resume)
        stored = run.read_config()
        config = resolve_config(config_from_mapping(stored["config"], source=str(run.path / "config.json")))
        if run.read_summary() is not None:
            raise ConfigError(f"the run in {run.path} has already finished; start a new run instead")
    else:
        config = config or TrainConfig()
        lr_scale = 1.0 if config.station else get_device(config.device).lr_scale
        config = resolve_config(config, lr_scale=lr_scale)
        out = Path(config.out) if config.out else default_run_dir(config)
        config.out = str(out)
        # Check everything that can fail on bad input before creating the run folder.
        make_rule_for(config)
        if not config.station:
            device = get_device(config.device)
            device.config(config.preset, config.device_options)
            config.preset = config.preset or device.default_preset
        run = None

    dataset = load_dataset(
        config.dataset, config.data_dir, download=config.download, n_train=config.n_train, n_test=config.n_test
    )
    network, factory = build_network(config, dataset)
    calibrations = None
    if _uses_calibrations(config):
        try:
            calibrations = _prepare_calibrations(network, config, run)
        except BaseException:
            # A refused record stops the run before it starts; the instruments go safe first.
            network.apply_safe_state()
            network.close()
            raise
        network = calibrations.network
        callbacks = [*(callbacks or []), *calibrations.callbacks]
    rule = make_rule_for(config)
    rule.check(network)
    if run is None:
        run = RunDir.create(
            config.out,
            {
                "config": config.to_dict(),
                "pnn_version": __version__,
                "python": platform.python_version(),
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            },
        )
        if calibrations is not None:
            calibrations.finish_setup(run.path)
    if not run.has_identity():
        # Written at the start; a run killed before that point gets it when resumed.
        identity = {"nodes": network.identity(), "rule": rule.describe()}
        if calibrations is not None:
            identity["calibrations"] = calibrations.hashes()
        run.write_identity(identity)

    controller = PhysicalNoProp(
        network, rule,
        loss=config.loss, optimizer=config.optimizer, lr=config.lr, momentum=config.momentum,
        weight_decay=config.weight_decay, lr_schedule=config.lr_schedule, epochs=config.epochs,
        batch_size=config.batch_size, seed=config.seed, clip_updates=config.clip_updates,
        max_consecutive_invalid=config.max_consecutive_invalid, retry_backoff_s=config.retry_backoff_s,
        retry_backoff_max_s=config.retry_backoff_max_s, checkpoint_every=config.checkpoint_every,
        checkpoint_interval_s=config.checkpoint_interval_s, run=run, progress=progress, node_factory=factory,
        callbacks=callbacks, step_callbacks=step_callbacks,
        log_alignment=config.log_alignment,
    )
    try:
        controller.fit(
            dataset.x_train, dataset.y_train, dataset.x_test, dataset.y_test,
            n_classes=dataset.n_classes, resume=resume is not None,
        )
        train_metrics = controller.evaluate(dataset.x_train, dataset.y_train)
        test_metrics = controller.evaluate(dataset.x_test, dataset.y_test)
    finally:
        network.apply_safe_state()
        network.close()

    summary = {
        "dataset": config.dataset,
        "rule": config.rule,
        "device": "station" if config.station else config.device,
        "preset": config.preset,
        # Widths of the network as built (a station's nodes set them, not the hidden option).
        "widths": [network.nodes[i].n_out for i in network.trainable_indices],
        "epochs": config.epochs,
        "train_accuracy": train_metrics["accuracy"],
        "train_loss": train_metrics["loss"],
        "test_accuracy": test_metrics["accuracy"],
        "test_loss": test_metrics["loss"],
        "test_invalid": test_metrics["invalid"],
        "steps": controller.n_steps_,
        "rejected_batches": controller.n_rejected_,
        "train_seconds": controller.train_seconds_,
        "wall_seconds": time.perf_counter() - started,
        "run_dir": str(run.path),
    }
    if calibrations is not None:
        summary["calibrations"] = calibrations.hashes()
    if config.log_alignment and controller.history_:
        # The last epoch's angles; every epoch's are in metrics.jsonl.
        last = controller.history_[-1]
        summary["alignment_degrees"] = {
            key.removeprefix("alignment_"): value for key, value in last.items() if key.startswith("alignment_")
        }
    # The summary marks the run as finished, so it is written last.
    _plot_curves(run)
    run.write_summary(summary)
    return summary
