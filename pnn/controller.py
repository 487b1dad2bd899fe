"""PhysicalNoProp: the hardware-in-the-loop training loop.

Each step runs node by node: the learning rule sends the batch through the network (each node
measures its state), turns the output error into a local error per node and asks each node for
its local gradient; the controller then checks every gradient, runs each node's optimizer and
pushes the update to the node within its limits. A batch whose measurement or gradient is
invalid is rejected whole: no node gets an update computed from it.

The run is reproducible: batches come from ``epoch_order(n, seed, epoch)``, every random
generator's state is checkpointed, and resuming from a checkpoint continues exactly where the
checkpoint was taken.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
from tqdm.auto import tqdm

from .datasets import epoch_order, iterate_batches
from .errors import ConfigError, MeasurementError, PnnError
from .learning.angles import update_angles
from .learning.base import LearningRule, NodeFactory, RuleContext
from .learning.bp import check_backward_models
from .learning.losses import get_loss
from .learning.optim import LR_SCHEDULES, Optimizer, lr_at_epoch, make_optimizer
from .network import PhysicalNetwork
from .runs import RunDir

__all__ = ["PhysicalNoProp", "TrainingInterrupted", "TrainingStopped"]

log = logging.getLogger(__name__)

#: Examples in the fixed batch on which ``log_alignment`` measures the angles.
ALIGNMENT_BATCH = 256


class TrainingInterrupted(PnnError):
    """Training stopped on Ctrl-C after writing a checkpoint."""


class TrainingStopped(PnnError):
    """Training stopped after too many consecutive rejected batches."""


def _check_data(x: np.ndarray, y: np.ndarray, n_in: int, n_classes: int, label: str) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x)
    y = np.asarray(y)
    if x.ndim != 2 or x.shape[1] != n_in:
        raise ConfigError(f"{label} inputs must have shape (n, {n_in}), got {x.shape}")
    if y.shape != (x.shape[0],):
        raise ConfigError(f"{label} labels must have shape ({x.shape[0]},), got {y.shape}")
    if not np.all(np.isfinite(x)):
        raise ConfigError(f"{label} inputs contain NaN or infinite values; clean the dataset")
    if y.size and (y.min() < 0 or y.max() >= n_classes):
        raise ConfigError(f"{label} labels must lie in 0..{n_classes - 1}, found {y.min()}..{y.max()}")
    return x, y.astype(np.int64)


class PhysicalNoProp:
    """Train a :class:`~pnn.network.PhysicalNetwork` with a local learning rule.

    The constructor only stores settings; :meth:`fit` trains and returns ``self``, and learned
    state ends in ``_`` (``history_``, ``n_steps_``, ``n_rejected_``).

    Parameters
    ----------
    network
        The network to train; its last node's outputs are the logits.
    rule
        The learning rule (see :func:`pnn.learning.make_rule`).
    loss
        ``"cross_entropy"`` or ``"mse"``.
    optimizer
        ``"adam"`` or ``"sgd"``, one instance per trainable node.
    lr
        Base learning rate, in parameter units per unit gradient.
    lr_schedule
        ``"cosine"`` (decay over the epochs) or ``"constant"``.
    epochs, batch_size
        Number of passes over the training data, and examples per update.
    seed
        Seed of the batch order and of the rule's random state.
    clip_updates
        Clip updates that would leave a parameter's limits or exceed its maximum step, instead of
        stopping with a LimitError. Every clip is counted in the metrics log and logged.
    max_consecutive_invalid
        Stop (safe state, checkpoint, message) after this many rejected batches in a row.
    checkpoint_every
        Also write a checkpoint every this many steps (0: only at the end of each epoch).
    run
        Run folder for the configuration, metrics and checkpoints; None keeps nothing on disk.
    progress
        Show a tqdm progress bar per epoch.
    node_factory
        Builds a node of the network's device kind, for rules that need extra physical nodes
        (physical feedback).
    eval_batch_size
        Examples per forward pass when evaluating.
    callbacks
        Functions called as ``callback(controller, epoch_record)`` after each epoch's checkpoint.
    log_alignment
        After each epoch, log for every hidden trainable node the angle in degrees between the
        rule's gradient and the backprop gradient through the nodes' models. Both come from a
        fixed batch of up to :data:`ALIGNMENT_BATCH` training examples, and the angle goes into
        the epoch record as ``alignment_<node name>``. The probe runs the network, so on a noisy
        device it draws noise samples that a run without it would have used elsewhere.
    """

    def __init__(
        self,
        network: PhysicalNetwork,
        rule: LearningRule,
        *,
        loss: str = "cross_entropy",
        optimizer: str = "adam",
        lr: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        lr_schedule: str = "cosine",
        epochs: int = 10,
        batch_size: int = 64,
        seed: int = 0,
        clip_updates: bool = True,
        max_consecutive_invalid: int = 10,
        checkpoint_every: int = 0,
        run: RunDir | None = None,
        progress: bool = True,
        node_factory: NodeFactory | None = None,
        eval_batch_size: int = 1000,
        callbacks: list[Callable[[PhysicalNoProp, dict[str, Any]], None]] | None = None,
        log_alignment: bool = False,
    ) -> None:
        self.network = network
        self.rule = rule
        self.loss = loss
        self.optimizer = optimizer
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.lr_schedule = lr_schedule
        self.epochs = epochs
        self.batch_size = batch_size
        self.seed = seed
        self.clip_updates = clip_updates
        self.max_consecutive_invalid = max_consecutive_invalid
        self.checkpoint_every = checkpoint_every
        self.run = run
        self.progress = progress
        self.node_factory = node_factory
        self.eval_batch_size = eval_batch_size
        self.callbacks = list(callbacks or [])
        self.log_alignment = log_alignment

    # ---------------------------------------------------------------------------- setup
    def _validate_settings(self) -> None:
        if int(self.epochs) != self.epochs or self.epochs < 1:
            raise ConfigError(f"epochs must be a positive integer, got {self.epochs}")
        if int(self.batch_size) != self.batch_size or self.batch_size < 1:
            raise ConfigError(f"batch size must be a positive integer, got {self.batch_size}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"unknown learning-rate schedule {self.lr_schedule!r}; choose one of {', '.join(LR_SCHEDULES)}")
        if self.max_consecutive_invalid < 1:
            raise ConfigError(f"max_consecutive_invalid must be at least 1, got {self.max_consecutive_invalid}")
        if self.checkpoint_every < 0:
            raise ConfigError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")

    def _setup(self, n_classes: int) -> None:
        self._validate_settings()
        self.loss_fn_ = get_loss(self.loss)
        self.rule.check(self.network)
        if self.log_alignment:
            check_backward_models(
                self.network, "alignment metrics (--log-alignment)",
                "the backprop reference needs a model of it; train without --log-alignment",
            )
        self.context_ = RuleContext(
            rng=np.random.default_rng([self.seed, 7919]),
            loss=self.loss_fn_,
            n_classes=n_classes,
            node_factory=self.node_factory,
        )
        self.rule.setup(self.network, self.context_)
        self.optimizers_: dict[int, Optimizer] = {
            i: make_optimizer(self.optimizer, self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
            for i in self.network.trainable_indices
        }
        self.history_: list[dict[str, Any]] = []
        self.n_steps_ = 0
        self.n_rejected_ = 0
        self._position = (0, 0)
        self._epoch_sums = {"loss": 0.0, "correct": 0, "seen": 0, "rejected": 0, "clipped": 0}
        self._last_rejection = ""

    # ---------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Return the whole training state: network, rule, optimizers, position and counters."""
        return {
            "network": self.network.state_dict(),
            "rule": self.rule.state_dict(),
            "optimizers": {str(i): opt.state_dict() for i, opt in self.optimizers_.items()},
            "rule_rng": self.context_.rng.bit_generator.state,
            "position": list(self._position),
            "n_steps": self.n_steps_,
            "n_rejected": self.n_rejected_,
            "epoch_sums": dict(self._epoch_sums),
            "history": list(self.history_),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (after setup)."""
        self.network.load_state_dict(state["network"])
        self.rule.load_state_dict(state["rule"])
        for i, opt in self.optimizers_.items():
            opt.load_state_dict(state["optimizers"][str(i)])
        self.context_.rng.bit_generator.state = state["rule_rng"]
        self._position = (int(state["position"][0]), int(state["position"][1]))
        self.n_steps_ = int(state["n_steps"])
        self.n_rejected_ = int(state["n_rejected"])
        self._epoch_sums = dict(state["epoch_sums"])
        self.history_ = list(state["history"])

    def _checkpoint(self) -> None:
        if self.run is not None:
            self.run.save_checkpoint(self.state_dict())

    # ------------------------------------------------------------------------- training
    def fit(
        self,
        x_train: np.ndarray,
        y_train: np.ndarray,
        x_test: np.ndarray | None = None,
        y_test: np.ndarray | None = None,
        *,
        n_classes: int | None = None,
        resume: bool = False,
    ) -> PhysicalNoProp:
        """Train for ``epochs`` epochs and return ``self``.

        Parameters
        ----------
        x_train, y_train
            Inputs of shape (n, n_in) and integer labels of shape (n,).
        x_test, y_test
            Optional held-out data, evaluated after every epoch.
        n_classes
            Number of classes; defaults to the network's output width.
        resume
            Continue from the run folder's latest checkpoint.
        """
        n_classes = int(n_classes or self.network.n_out)
        x_train, y_train = _check_data(x_train, y_train, self.network.n_in, n_classes, "training")
        if x_test is not None:
            x_test, y_test = _check_data(x_test, y_test, self.network.n_in, n_classes, "test")
        self._setup(n_classes)
        if self.log_alignment:
            # The same examples every epoch, chosen from the seed, so a resumed run probes them too.
            chosen = np.random.default_rng([self.seed, 5381]).permutation(len(x_train))[:ALIGNMENT_BATCH]
            self._alignment_probe = (x_train[np.sort(chosen)], y_train[np.sort(chosen)])
        if resume:
            if self.run is None or not self.run.has_checkpoint():
                raise ConfigError("nothing to resume: the run folder has no checkpoint yet; start the run again")
            self.load_state_dict(self.run.load_checkpoint())
            log.info("resumed at epoch %d, batch %d", self._position[0] + 1, self._position[1])

        started = time.perf_counter()
        try:
            with self._interrupt_guard() as stop_requested:
                self._train_loop(x_train, y_train, x_test, y_test, stop_requested)
        except BaseException:
            self.network.apply_safe_state()
            raise
        finally:
            if self.run is not None:
                self.run.close()
        self.train_seconds_ = time.perf_counter() - started
        return self

    def _train_loop(self, x_train, y_train, x_test, y_test, stop_requested: Callable[[], bool]) -> None:
        n = len(x_train)
        start_epoch, start_batch = self._position
        for epoch in range(start_epoch, self.epochs):
            lr = lr_at_epoch(self.lr, epoch, self.epochs, self.lr_schedule)
            for opt in self.optimizers_.values():
                opt.lr = lr
            batches = list(iterate_batches(n, self.batch_size, epoch_order(n, self.seed, epoch)))
            epoch_started = time.perf_counter()
            first = start_batch if epoch == start_epoch else 0
            if first == 0:
                self._epoch_sums = {"loss": 0.0, "correct": 0, "seen": 0, "rejected": 0, "clipped": 0}
            bar = tqdm(
                total=len(batches), initial=first, desc=f"epoch {epoch + 1}/{self.epochs}",
                unit="batch", disable=not self.progress, leave=False, dynamic_ncols=True,
            )
            consecutive_invalid = 0
            with bar:
                for b in range(first, len(batches)):
                    idx = batches[b]
                    accepted = self._step(epoch, b, x_train[idx], y_train[idx], lr)
                    consecutive_invalid = 0 if accepted else consecutive_invalid + 1
                    self._position = (epoch, b + 1)
                    bar.update(1)
                    sums = self._epoch_sums
                    if sums["seen"]:
                        bar.set_postfix(loss=f"{sums['loss'] / sums['seen']:.4f}", acc=f"{sums['correct'] / sums['seen']:.3f}")
                    if consecutive_invalid >= self.max_consecutive_invalid:
                        self._checkpoint()
                        raise TrainingStopped(
                            f"stopped after {consecutive_invalid} rejected batches in a row "
                            f"(last: {self._last_rejection}); the checkpoint is in "
                            f"{self.run.path if self.run else 'memory only'}; check the device, then resume"
                        )
                    if self.checkpoint_every and self.n_steps_ % self.checkpoint_every == 0:
                        self._checkpoint()
                    if stop_requested():
                        self._checkpoint()
                        where = f"; resume with: pnn train --resume {self.run.path}" if self.run else ""
                        raise TrainingInterrupted(
                            f"interrupted at epoch {epoch + 1}, batch {b + 1} of {len(batches)}; "
                            f"safe state applied and checkpoint written{where}"
                        )
            record = self._end_epoch(epoch, lr, x_test, y_test, time.perf_counter() - epoch_started)
            self._position = (epoch + 1, 0)
            self._checkpoint()
            for callback in self.callbacks:
                callback(self, record)

    def _step(self, epoch: int, batch: int, x: np.ndarray, y: np.ndarray, lr: float) -> bool:
        """Run one batch; return False if it was rejected."""
        try:
            result = self.rule.compute(self.network, x, y, self.context_)
            for i, grads in result.gradients.items():
                for name, grad in grads.items():
                    if not np.all(np.isfinite(grad)):
                        raise MeasurementError(
                            f"gradient of node {self.network[i].name!r} parameter {name!r} is not finite"
                        )
            if not np.isfinite(result.loss):
                raise MeasurementError(f"loss is not finite ({result.loss})")
        except MeasurementError as exc:
            self.n_rejected_ += 1
            self._epoch_sums["rejected"] += 1
            self._last_rejection = str(exc)
            log.warning("epoch %d batch %d rejected: %s", epoch + 1, batch + 1, exc)
            if self.run is not None:
                self.run.log({"kind": "rejected", "epoch": epoch, "batch": batch, "reason": str(exc)})
            return False

        clipped = 0
        for i, grads in result.gradients.items():
            node = self.network[i]
            params = node.get_parameters() if self.weight_decay else None
            updates = self.optimizers_[i].step(grads, params)
            node.apply_update(updates, clip=self.clip_updates)
            clipped += sum(node.pop_limit_events().values())
        self.rule.after_update(self.network, self.context_)

        self.n_steps_ += 1
        correct = int(np.count_nonzero(np.argmax(result.outputs, axis=1) == y))
        sums = self._epoch_sums
        sums["loss"] += result.loss * len(y)
        sums["correct"] += correct
        sums["seen"] += len(y)
        sums["clipped"] += clipped
        if self.run is not None:
            record = {
                "kind": "step", "epoch": epoch, "batch": batch, "step": self.n_steps_,
                "loss": result.loss, "accuracy": correct / len(y), "lr": lr, "clipped": clipped,
            }
            record.update(result.extras)
            self.run.log(record)
        return True

    def _end_epoch(self, epoch: int, lr: float, x_test, y_test, seconds: float) -> dict[str, Any]:
        sums = self._epoch_sums
        record: dict[str, Any] = {
            "kind": "epoch",
            "epoch": epoch,
            "lr": lr,
            "train_loss": sums["loss"] / sums["seen"] if sums["seen"] else float("nan"),
            "train_accuracy": sums["correct"] / sums["seen"] if sums["seen"] else float("nan"),
            "rejected": sums["rejected"],
            "clipped": sums["clipped"],
            "seconds": seconds,
        }
        if x_test is not None:
            test = self.evaluate(x_test, y_test)
            record.update(test_loss=test["loss"], test_accuracy=test["accuracy"], test_invalid=test["invalid"])
        if self.log_alignment:
            record.update(self._alignment_record(epoch))
        if sums["clipped"]:
            log.info("epoch %d: %d parameter value(s) clipped at their limits", epoch + 1, sums["clipped"])
        self.history_.append(record)
        if self.run is not None:
            self.run.log(record)
        message = f"epoch {epoch + 1}/{self.epochs}: train loss {record['train_loss']:.4f}, train accuracy {record['train_accuracy']:.4f}"
        if x_test is not None:
            message += f", test accuracy {record['test_accuracy']:.4f}"
        log.info(message)
        if self.progress:
            tqdm.write(message)
        return record

    def _alignment_record(self, epoch: int) -> dict[str, float]:
        # A context of its own, so that the probe leaves the rule's random stream untouched.
        context = RuleContext(
            rng=np.random.default_rng([self.seed, epoch, 4099]),
            loss=self.loss_fn_,
            n_classes=self.context_.n_classes,
            node_factory=self.node_factory,
        )
        x, y = self._alignment_probe
        angles = update_angles(self.network, self.rule, x, y, context)
        if angles:
            log.info("epoch %d: angle to backprop %s", epoch + 1,
                     ", ".join(f"{name} {angle:.1f} deg" for name, angle in angles.items()))
        return {f"alignment_{name}": angle for name, angle in angles.items()}

    # ------------------------------------------------------------------------ evaluation
    def evaluate(self, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
        """Return mean loss and accuracy on ``x``, ``y``.

        Examples whose outputs are not finite (an overrange reading, say) count as wrong and are
        reported as ``invalid``; they are left out of the loss.
        """
        loss_fn = getattr(self, "loss_fn_", None) or get_loss(self.loss)
        outputs = self.network.predict(np.asarray(x), batch_size=self.eval_batch_size)
        y = np.asarray(y)
        finite = np.all(np.isfinite(outputs), axis=1)
        invalid = int(np.count_nonzero(~finite))
        loss = loss_fn(outputs[finite], y[finite])[0] if finite.any() else float("nan")
        correct = np.argmax(np.where(finite[:, None], outputs, 0.0), axis=1) == y
        accuracy = float(np.count_nonzero(correct & finite)) / len(y)
        return {"loss": float(loss), "accuracy": accuracy, "invalid": invalid}

    # ------------------------------------------------------------------------- Ctrl-C
    @contextmanager
    def _interrupt_guard(self) -> Iterator[Callable[[], bool]]:
        """Turn the first Ctrl-C into a stop request checked between steps.

        A step is never cut in half, so the checkpoint written on stopping is consistent. A
        second Ctrl-C raises KeyboardInterrupt at once (the safe state is still applied).
        """
        flag = {"stop": False}
        if threading.current_thread() is not threading.main_thread():
            yield lambda: flag["stop"]
            return

        def handler(signum, frame):
            if flag["stop"]:
                raise KeyboardInterrupt
            flag["stop"] = True
            log.warning("Ctrl-C: finishing the current step, then writing a checkpoint (press again to abort)")

        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield lambda: flag["stop"]
        finally:
            signal.signal(signal.SIGINT, previous)
