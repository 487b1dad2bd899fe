"""PhysicalNoProp: the hardware-in-the-loop training loop.

Each step runs node by node: the learning rule sends the batch through the network (each node
measures its state), turns the output error into a local error per node and asks each node for
its local gradient; the controller then checks every gradient, runs each node's optimizer and
pushes the update to the node within its limits. A batch whose measurement or gradient is
invalid is rejected whole: no node gets an update computed from it.

Instrument faults (a timeout, a lost connection, a garbled protocol reply) during the measurement
are retried: the controller waits (a bounded exponential backoff) and runs the same batch again,
while the instrument driver resynchronises or reconnects its link. A fault while the update is
being written leaves that update partly applied, so the controller moves on to the next batch
instead of applying it twice. After ``max_consecutive_invalid`` batches in a row without an
update, the run stops: the safe state is applied, a checkpoint is written, and the message names
the instrument and the fault.

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

from ._allocator import keep_freed_memory
from .datasets import epoch_order, iterate_batches
from .errors import ConfigError, InstrumentError, MeasurementError, PnnError
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
    """Training stopped on Ctrl-C (or SIGTERM) after writing a checkpoint."""


class TrainingStopped(PnnError):
    """Training stopped after too many batches in a row without an update."""


# Outcomes of one training step.
_ACCEPTED = "accepted"
_REJECTED = "rejected"
"""The measurement or gradient was invalid; the batch is skipped."""
_RETRY = "retry"
"""An instrument fault during the measurement; the same batch runs again after a pause."""
_UPDATE_FAILED = "update failed"
"""An instrument fault while writing the update; the update may be partly applied."""

# A backoff pause is slept in slices of this many seconds, so Ctrl-C is seen promptly.
_POLL_S = 0.05


def _new_epoch_sums() -> dict[str, Any]:
    return {"loss": 0.0, "correct": 0, "seen": 0, "rejected": 0, "faults": 0, "clipped": 0}


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
        Stop (safe state, checkpoint, message) after this many batches in a row without an
        update, whether their measurement was invalid or an instrument failed.
    retry_backoff_s
        Pause after the first instrument fault in a row, in seconds; doubled after each further
        fault in a row, up to ``retry_backoff_max_s``.
    retry_backoff_max_s
        Maximum pause between two tries, in seconds.
    checkpoint_every
        Also write a checkpoint every this many steps (0: only at the end of each epoch).
    checkpoint_interval_s
        Also write a checkpoint after a step when this many seconds have passed since the last
        one (0: never), so a long epoch on slow hardware loses little when the run is killed.
    run
        Run folder for the configuration, metrics and checkpoints; None keeps nothing on disk.
    progress
        Show a tqdm progress bar for the run, and a line per epoch for epochs of 2 s or more.
    node_factory
        Builds a node of the network's device kind, for rules that need extra physical nodes
        (physical feedback).
    eval_batch_size
        Examples per forward pass when evaluating.
    callbacks
        Functions called as ``callback(controller, epoch_record)`` after each epoch's checkpoint.
    step_callbacks
        Functions called as ``callback(controller, step_record)`` after each try of a batch,
        once its checkpoint (if one is due) is written; ``step_record`` has the keys ``epoch``,
        ``batch`` and ``outcome`` (``"accepted"``, ``"rejected"``, ``"retry"`` or
        ``"update failed"``). Tests use them to inject faults or stop a run at a chosen step.
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
        retry_backoff_s: float = 0.5,
        retry_backoff_max_s: float = 30.0,
        checkpoint_every: int = 0,
        checkpoint_interval_s: float = 60.0,
        run: RunDir | None = None,
        progress: bool = True,
        node_factory: NodeFactory | None = None,
        eval_batch_size: int = 1000,
        callbacks: list[Callable[[PhysicalNoProp, dict[str, Any]], None]] | None = None,
        step_callbacks: list[Callable[[PhysicalNoProp, dict[str, Any]], None]] | None = None,
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
        self.retry_backoff_s = retry_backoff_s
        self.retry_backoff_max_s = retry_backoff_max_s
        self.checkpoint_every = checkpoint_every
        self.checkpoint_interval_s = checkpoint_interval_s
        self.run = run
        self.progress = progress
        self.node_factory = node_factory
        self.eval_batch_size = eval_batch_size
        self.callbacks = list(callbacks or [])
        self.step_callbacks = list(step_callbacks or [])
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
        for name in ("retry_backoff_s", "retry_backoff_max_s", "checkpoint_interval_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (np.isfinite(value) and value >= 0):
                raise ConfigError(f"{name} must be a number of seconds >= 0, got {value!r}")

    def _setup(self, n_classes: int) -> None:
        self._validate_settings()
        self.loss_fn_ = get_loss(self.loss)
        self.rule.check(self.network)
        self.optimizers_: dict[int, Optimizer] = {
            i: make_optimizer(self.optimizer, self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
            for i in self.network.trainable_indices
        }
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
            optimizers=self.optimizers_,
            clip_updates=self.clip_updates,
        )
        self.rule.setup(self.network, self.context_)
        self.history_: list[dict[str, Any]] = []
        self.n_steps_ = 0
        self.n_rejected_ = 0
        self.n_faults_ = 0
        self._position = (0, 0)
        self._epoch_sums = _new_epoch_sums()
        self._last_failure = ""
        self._consecutive = 0
        self._consecutive_faults = 0
        self._last_checkpoint_time = time.monotonic()

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
            "n_faults": self.n_faults_,
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
        # Checkpoints written before instrument faults were counted have no such entry.
        self.n_faults_ = int(state.get("n_faults", 0))
        self._epoch_sums = {**_new_epoch_sums(), **state["epoch_sums"]}
        self.history_ = list(state["history"])

    def _checkpoint(self) -> None:
        if self.run is not None:
            self.run.save_checkpoint(self.state_dict())
        self._last_checkpoint_time = time.monotonic()

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
            Continue from the run folder's latest checkpoint; a run killed before its first
            checkpoint starts again from the beginning.
        """
        keep_freed_memory()
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
            if self.run is None:
                raise ConfigError("nothing to resume: this training has no run folder; pass run=RunDir(...)")
            if self.run.has_checkpoint():
                self.load_state_dict(self.run.load_checkpoint())
                log.info("resumed at epoch %d, batch %d", self._position[0] + 1, self._position[1])
            else:
                # Killed before the first checkpoint: the seed makes starting over give the
                # same run, once the steps logged so far are dropped.
                self.run.truncate_metrics(0)
                log.info("the run folder has no checkpoint yet; starting from the first batch")

        started = time.perf_counter()
        try:
            with self._interrupt_guard() as stop_requested:
                self._train_loop(x_train, y_train, x_test, y_test, stop_requested)
        except (TrainingStopped, TrainingInterrupted) as exc:
            failures = self.network.apply_safe_state()
            raise type(exc)(f"{exc}; {_safe_state_note(failures)}") from None
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
        n_batches = -(-n // self.batch_size)
        start_epoch, start_batch = self._position
        # One bar for the whole run: short epochs (the vowels) would otherwise flood the terminal.
        bar = tqdm(
            total=self.epochs * n_batches, initial=start_epoch * n_batches + start_batch, unit="batch",
            disable=not self.progress, leave=False, dynamic_ncols=True,
        )
        last_test = self.history_[-1].get("test_accuracy") if self.history_ else None
        self._last_checkpoint_time = time.monotonic()
        with bar:
            for epoch in range(start_epoch, self.epochs):
                bar.set_description(f"epoch {epoch + 1}/{self.epochs}")
                lr = lr_at_epoch(self.lr, epoch, self.epochs, self.lr_schedule)
                for opt in self.optimizers_.values():
                    opt.lr = lr
                batches = list(iterate_batches(n, self.batch_size, epoch_order(n, self.seed, epoch)))
                epoch_started = time.perf_counter()
                b = start_batch if epoch == start_epoch else 0
                if b == 0:
                    self._epoch_sums = _new_epoch_sums()
                while b < len(batches):
                    idx = batches[b]
                    outcome = self._step(epoch, b, x_train[idx], y_train[idx], lr, idx)
                    if outcome != _RETRY:
                        b += 1
                        self._position = (epoch, b)
                        bar.update(1)
                    self._after_step(epoch, b, len(batches), outcome, bar, last_test, stop_requested)
                record = self._end_epoch(epoch, lr, x_test, y_test, time.perf_counter() - epoch_started)
                last_test = record.get("test_accuracy", last_test)
                self._position = (epoch + 1, 0)
                self._checkpoint()
                for callback in self.callbacks:
                    callback(self, record)

    def _after_step(self, epoch: int, b: int, n_batches: int, outcome: str, bar: Any, last_test: float | None,
                    stop_requested: Callable[[], bool]) -> None:
        """Count the outcome, stop or pause when due, checkpoint, and run the step callbacks."""
        sums = self._epoch_sums
        if sums["seen"]:
            postfix = {"loss": f"{sums['loss'] / sums['seen']:.4f}", "acc": f"{sums['correct'] / sums['seen']:.3f}"}
            if last_test is not None:
                postfix["test"] = f"{last_test:.3f}"
            bar.set_postfix(postfix, refresh=False)

        self._consecutive = 0 if outcome == _ACCEPTED else self._consecutive + 1
        faulted = outcome in (_RETRY, _UPDATE_FAILED)
        self._consecutive_faults = self._consecutive_faults + 1 if faulted else 0
        if self._consecutive >= self.max_consecutive_invalid:
            checkpoint_note = self._checkpoint_for_stop()
            resume = f"pnn train --resume {self.run.path}" if self.run else "fit(..., resume=True)"
            raise TrainingStopped(
                f"training stopped after {self._consecutive} batches in a row without an update; "
                f"last failure: {self._last_failure}; {checkpoint_note}; check the instrument, then "
                f"continue with {resume}"
            )
        if faulted:
            self._backoff(stop_requested)

        due_by_steps = outcome == _ACCEPTED and self.checkpoint_every and self.n_steps_ % self.checkpoint_every == 0
        due_by_time = self.checkpoint_interval_s and time.monotonic() - self._last_checkpoint_time >= self.checkpoint_interval_s
        if due_by_steps or due_by_time:
            self._checkpoint()
        for callback in self.step_callbacks:
            callback(self, {"epoch": epoch, "batch": b, "outcome": outcome})
        if stop_requested():
            self._checkpoint()
            where = f"; resume with: pnn train --resume {self.run.path}" if self.run else ""
            raise TrainingInterrupted(
                f"interrupted at epoch {epoch + 1}, batch {b} of {n_batches}; checkpoint written{where}"
            )

    def _checkpoint_for_stop(self) -> str:
        """Write a checkpoint before stopping; return a phrase saying where it is."""
        if self.run is None:
            return "no run folder, so no checkpoint was written"
        try:
            self._checkpoint()
        except PnnError as exc:
            # The instrument may be too broken even to read its levels back; the previous
            # checkpoint is still whole.
            log.error("writing the checkpoint before stopping failed: %s", exc)
            return f"the checkpoint could not be updated ({exc}), the previous one in {self.run.path} is kept"
        return f"checkpoint written in {self.run.path}"

    def _backoff(self, stop_requested: Callable[[], bool]) -> None:
        """Pause before the next try: ``retry_backoff_s``, doubled per fault in a row, capped."""
        delay = min(self.retry_backoff_s * 2.0 ** (self._consecutive_faults - 1), self.retry_backoff_max_s)
        if delay <= 0:
            return
        log.warning("waiting %.3g s before the next try (%d instrument fault(s) in a row)", delay, self._consecutive_faults)
        until = time.monotonic() + delay
        while not stop_requested():
            remaining = until - time.monotonic()
            if remaining <= 0:
                break
            time.sleep(min(remaining, _POLL_S))

    def _reject(self, epoch: int, batch: int, kind: str, exc: PnnError) -> None:
        """Count and log a batch that produced no update."""
        instrument = getattr(exc, "instrument", None)
        if isinstance(exc, InstrumentError):
            self.n_faults_ += 1
            self._epoch_sums["faults"] += 1
            self._last_failure = f"instrument {instrument!r} failed: {exc}" if instrument else f"instrument failure: {exc}"
        else:
            self.n_rejected_ += 1
            self._epoch_sums["rejected"] += 1
            self._last_failure = str(exc) if "invalid" in str(exc) else f"invalid measurement: {exc}"
        log.warning("epoch %d batch %d %s: %s", epoch + 1, batch + 1, kind, exc)
        if self.run is not None:
            record = {"kind": "rejected" if kind == _REJECTED else "fault", "epoch": epoch, "batch": batch,
                      "outcome": kind, "reason": str(exc)}
            if instrument:
                record["instrument"] = instrument
            self.run.log(record)

    def _step(
        self, epoch: int, batch: int, x: np.ndarray, y: np.ndarray, lr: float, indices: np.ndarray | None = None
    ) -> str:
        """Run one batch and return its outcome (see the outcome names at the top of the module).

        ``indices`` are the batch's positions in the training set, for rules that keep state per
        example.
        """
        try:
            self.context_.batch_indices = indices
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
            self._reject(epoch, batch, _REJECTED, exc)
            return _REJECTED
        except InstrumentError as exc:
            if not exc.retryable:
                raise
            self._reject(epoch, batch, _RETRY, exc)
            return _RETRY

        clipped = 0
        try:
            for i, grads in result.gradients.items():
                node = self.network[i]
                params = node.get_parameters() if self.weight_decay else None
                updates = self.optimizers_[i].step(grads, params)
                node.apply_update(updates, clip=self.clip_updates)
                clipped += sum(node.pop_limit_events().values())
        except InstrumentError as exc:
            if not exc.retryable:
                raise
            self._reject(epoch, batch, _UPDATE_FAILED, exc)
            return _UPDATE_FAILED
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
                "kind": "step", "epoch": epoch, "batch": batch, "step": self.n_steps_, "time": time.time(),
                "loss": result.loss, "accuracy": correct / len(y), "lr": lr, "clipped": clipped,
            }
            record.update(result.extras)
            self.run.log(record)
        return _ACCEPTED

    def _end_epoch(self, epoch: int, lr: float, x_test, y_test, seconds: float) -> dict[str, Any]:
        sums = self._epoch_sums
        record: dict[str, Any] = {
            "kind": "epoch",
            "epoch": epoch,
            "lr": lr,
            "train_loss": sums["loss"] / sums["seen"] if sums["seen"] else float("nan"),
            "train_accuracy": sums["correct"] / sums["seen"] if sums["seen"] else float("nan"),
            "rejected": sums["rejected"],
            "faults": sums["faults"],
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
        # Epochs of a few seconds or more get a line each; faster ones only update the bar.
        if self.progress and seconds >= 2.0:
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
        outputs = self._predict(np.asarray(x))
        y = np.asarray(y)
        finite = np.all(np.isfinite(outputs), axis=1)
        invalid = int(np.count_nonzero(~finite))
        loss = loss_fn(outputs[finite], y[finite])[0] if finite.any() else float("nan")
        correct = np.argmax(np.where(finite[:, None], outputs, 0.0), axis=1) == y
        accuracy = float(np.count_nonzero(correct & finite)) / len(y)
        return {"loss": float(loss), "accuracy": accuracy, "invalid": invalid}

    def _predict(self, x: np.ndarray) -> np.ndarray:
        """Return the network's outputs in chunks, trying a chunk again after a failed measurement.

        A chunk is tried at most ``max_consecutive_invalid`` times, and the last failure is raised
        after that. An instrument fault waits with the same backoff as training steps. A reply
        that arrived but was invalid (corrupted, incomplete) is measured again at once.
        """
        chunks = []
        for start in range(0, len(x), self.eval_batch_size):
            chunk = x[start : start + self.eval_batch_size]
            faults = 0
            while True:
                try:
                    chunks.append(self.network.predict(chunk, batch_size=len(chunk)))
                    break
                except InstrumentError as exc:
                    faults += 1
                    if not exc.retryable or faults >= self.max_consecutive_invalid:
                        raise
                    log.warning("evaluation: instrument fault (%d in a row), trying again: %s", faults, exc)
                    self._consecutive_faults = faults
                    self._backoff(lambda: False)
                except MeasurementError as exc:
                    faults += 1
                    if faults >= self.max_consecutive_invalid:
                        raise
                    log.warning("evaluation: invalid measurement (%d in a row), measuring again: %s", faults, exc)
        self._consecutive_faults = 0
        return np.concatenate(chunks, axis=0)

    # ------------------------------------------------------------------------- Ctrl-C
    @contextmanager
    def _interrupt_guard(self) -> Iterator[Callable[[], bool]]:
        """Turn the first Ctrl-C (SIGINT) or SIGTERM into a stop request checked between steps.

        A step is never cut in half, so the checkpoint written on stopping is consistent. A
        second signal raises KeyboardInterrupt at once (the safe state is still applied).
        """
        flag = {"stop": False}
        if threading.current_thread() is not threading.main_thread():
            yield lambda: flag["stop"]
            return

        def handler(signum, frame):
            if flag["stop"]:
                raise KeyboardInterrupt
            flag["stop"] = True
            name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            log.warning("%s: finishing the current step, then writing a checkpoint (press Ctrl-C again to abort)", name)

        previous = {number: signal.signal(number, handler) for number in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield lambda: flag["stop"]
        finally:
            for number, old in previous.items():
                signal.signal(number, old)


def _safe_state_note(failures: list[tuple[str, BaseException]]) -> str:
    """Return a phrase saying whether the safe state was applied, naming the nodes where it failed."""
    if not failures:
        return "safe state applied"
    listed = "; ".join(f"node {name!r}: {exc}" for name, exc in failures)
    return f"WARNING: applying the safe state failed ({listed}); check those outputs by hand"
