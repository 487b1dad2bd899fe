"""NoProp-DT blocks trained in parallel worker processes.

Blocks are split into contiguous groups, one group per worker process. A worker owns its
blocks' nodes (a simulated device lives only there, as an instrument would in a lab) and one
optimizer per node, built from a copy of the controller's optimizer. Per batch:

1. ``train``: the main process sends the encoded inputs, the labels, and each block's noisy
   latent and loss weight. All workers compute their blocks' losses and gradients at the same
   time and keep the gradients. Each returns the losses (and, for a learned embedding, that
   embedding's gradient terms), or an invalid-measurement message.
2. ``infer``: the inference recursion on the batch, for the training accuracy, passes z from
   worker to worker in block order.
3. ``commit``: if the controller accepted the batch, each worker steps its optimizers with the
   learning rate sent along and applies the updates. The commit travels with the next message
   (to save an exchange), and a ``train`` without one discards the pending gradients, so a
   rejected batch changes nothing.

Checkpoints fetch every node's state and every optimizer's state from the workers, and resuming
sends them back. The randomness of training (noise latents) is drawn in the main process, and
each node keeps its own generator, so a run gives the same parameters for any number of
workers, including none (:class:`~pnn.learning.noprop.blocks.LocalBlocks`).

Workers start with the ``spawn`` method and one BLAS thread each, since the parallelism is
across workers.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import multiprocessing
import os
import signal
import traceback
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from ...errors import ConfigError, LimitError, MeasurementError, PnnError
from ..optim import Optimizer
from .blocks import BlockOutcome, denoise_range, train_block
from .denoisers import DenoiserSpec, build_denoiser

__all__ = ["BlockPool"]

log = logging.getLogger(__name__)

_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")

# Exceptions a worker may raise that keep their type in the main process.
_KNOWN_ERRORS = {cls.__name__: cls for cls in (MeasurementError, LimitError, ConfigError)}


@contextlib.contextmanager
def _single_threaded_children() -> Iterator[None]:
    """Set the BLAS and Numba thread counts to 1 in the environment that spawned children copy."""
    saved = {name: os.environ.get(name) for name in _THREAD_VARIABLES}
    os.environ.update({name: "1" for name in _THREAD_VARIABLES})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class _Worker:
    """The blocks of one worker process and the commands the main process sends them."""

    def __init__(self, specs: list[DenoiserSpec]) -> None:
        self.denoisers = [build_denoiser(spec) for spec in specs]
        self.nodes = {node.name: node for d in self.denoisers for node in d.nodes}
        self.optimizers: dict[str, Optimizer] = {}
        self.clip = True
        self.pending: dict[str, dict[str, np.ndarray]] | None = None
        self.features: list[np.ndarray] | None = None

    def describe(self) -> dict[str, Any]:
        return {"names": list(self.nodes), "identities": [node.identity() for node in self.nodes.values()]}

    def setup(self, template: Optimizer, clip: bool) -> None:
        self.optimizers = {name: copy.deepcopy(template) for name, node in self.nodes.items() if node.trainable}
        self.clip = bool(clip)
        self.pending = None

    def train(self, commit_lr, x, labels, z_inputs, embeddings, weights, want_embedding_gradient) -> tuple[int, list[BlockOutcome]]:
        """Commit the previous step's update if ``commit_lr`` is set, then train-step every block.

        Returns (values clipped by that commit, one outcome per block).
        """
        clipped = self.commit(commit_lr) if commit_lr is not None else 0
        self.pending = None
        x = x.astype(np.float64)
        pending, outcomes, features = {}, [], []
        for k, denoiser in enumerate(self.denoisers):
            outcome, feats = train_block(
                denoiser, x, z_inputs[k], labels, embeddings, float(weights[k]), want_embedding_gradient
            )
            for name, grads in outcome.gradients.items():
                for parameter, grad in grads.items():
                    if not np.all(np.isfinite(grad)):
                        raise MeasurementError(f"gradient of node {name!r} parameter {parameter!r} is not finite")
            pending.update(outcome.gradients)
            outcome.gradients = None
            outcomes.append(outcome)
            features.append(feats)
        self.pending = pending
        self.features = features
        return clipped, outcomes

    def infer(self, x, z, noise, coefficients, embeddings, reuse_features) -> np.ndarray:
        if reuse_features and self.features is not None:
            features = self.features
        else:
            features = [denoiser.features(x.astype(np.float64)) for denoiser in self.denoisers]
        return denoise_range(self.denoisers, features, z, noise, coefficients, embeddings)

    def commit(self, lr: float) -> int:
        """Apply the pending gradients, as the controller does for its own nodes; return clips."""
        if self.pending is None:
            raise PnnError("commit without a training step: no gradients are pending")
        clipped = 0
        for name, grads in self.pending.items():
            node, optimizer = self.nodes[name], self.optimizers[name]
            optimizer.lr = lr
            params = node.get_parameters() if optimizer.weight_decay else None
            node.apply_update(optimizer.step(grads, params), clip=self.clip)
            clipped += sum(node.pop_limit_events().values())
        self.pending = None
        self.features = None
        return clipped

    def node_states(self) -> dict[str, Any]:
        return {name: node.state_dict() for name, node in self.nodes.items()}

    def load_node_states(self, states: Mapping[str, Any]) -> None:
        for name, node in self.nodes.items():
            node.load_state_dict(states[name])
        self.features = None

    def optimizer_states(self) -> dict[str, Any]:
        return {name: optimizer.state_dict() for name, optimizer in self.optimizers.items()}

    def load_optimizer_states(self, states: Mapping[str, Any]) -> None:
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(states[name])

    def apply_safe_state(self) -> None:
        for node in self.nodes.values():
            try:
                node.apply_safe_state()
            except Exception:  # noqa: BLE001 - every node must get its chance to go safe
                log.exception("node %r: applying the safe state failed", node.name)

    def close(self) -> None:
        for node in self.nodes.values():
            node.close()


def _worker_main(connection, specs: list[DenoiserSpec]) -> None:
    """Serve commands ``(method name, arguments)`` from the main process until ``close``."""
    # Ctrl-C reaches the whole process group. The main process finishes the step, fetches the
    # checkpoint from the workers and then closes them, so a worker must not stop on its own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        worker = _Worker(specs)
        connection.send(("ok", worker.describe()))
    except Exception as exc:  # noqa: BLE001 - reported to the main process, which raises
        connection.send(("error", (type(exc).__name__, str(exc), traceback.format_exc())))
        return
    while True:
        try:
            command, arguments = connection.recv()
        except EOFError:  # the main process went away
            worker.close()
            return
        try:
            result = getattr(worker, command)(*arguments)
        except Exception as exc:  # noqa: BLE001 - reported to the main process, which raises
            connection.send(("error", (type(exc).__name__, str(exc), traceback.format_exc())))
        else:
            connection.send(("ok", result))
        if command == "close":
            return


class BlockPool:
    """NoProp-DT blocks spread over worker processes, with the interface of ``LocalBlocks``.

    Parameters
    ----------
    specs
        One denoiser recipe per block, block 1 first.
    n_workers
        Number of worker processes, at most the number of blocks. Each worker gets a
        contiguous range of blocks, so the inference recursion crosses each worker once.
    """

    def __init__(self, specs: list[DenoiserSpec], n_workers: int) -> None:
        if isinstance(n_workers, bool) or not isinstance(n_workers, (int, np.integer)) or n_workers < 1:
            raise ConfigError(f"workers must be a positive integer, got {n_workers!r}")
        if n_workers > len(specs):
            raise ConfigError(f"workers = {n_workers} exceeds the {len(specs)} blocks; use at most {len(specs)}")
        self.n_blocks = len(specs)
        self.ranges = [list(r) for r in np.array_split(np.arange(len(specs)), int(n_workers))]

        context = multiprocessing.get_context("spawn")
        self._connections = []
        self._processes = []
        self._closed = False
        # Learning rate of an accepted step whose update the workers have not applied yet.
        self._commit_lr: float | None = None
        self._clipped = 0
        with _single_threaded_children():
            for w, blocks in enumerate(self.ranges):
                parent, child = context.Pipe()
                process = context.Process(
                    target=_worker_main, args=(child, [specs[t] for t in blocks]),
                    name=f"pnn-noprop-worker-{w}", daemon=True,
                )
                process.start()
                child.close()
                self._connections.append(parent)
                self._processes.append(process)

        try:
            described = [self._receive(w) for w in range(len(self.ranges))]
        except BaseException:
            self.close()
            raise

        self.node_names = [name for d in described for name in d["names"]]
        self._identities = [
            dict(identity, worker=w) for w, d in enumerate(described) for identity in d["identities"]
        ]
        log.info("started %d NoProp worker processes for %d blocks", len(self.ranges), self.n_blocks)

    def __len__(self) -> int:
        return self.n_blocks

    @property
    def nodes(self) -> list:
        """No node lives in this process; each worker owns its blocks' nodes."""
        return []

    # ------------------------------------------------------------------------- messaging
    def _receive(self, w: int) -> Any:
        try:
            status, payload = self._connections[w].recv()
        except EOFError:
            raise PnnError(
                f"NoProp worker {w} exited unexpectedly (exit code {self._processes[w].exitcode})"
            ) from None
        if status == "ok":
            return payload
        kind, message, trace = payload
        if kind in _KNOWN_ERRORS:
            raise _KNOWN_ERRORS[kind](message)
        raise PnnError(f"NoProp worker {w} failed with {kind}: {message}\n{trace}")

    def _call(self, w: int, command: str, *arguments: Any) -> Any:
        self._flush_commit()
        self._connections[w].send((command, arguments))
        return self._receive(w)

    def _flush_commit(self) -> None:
        """Have the workers apply an update they still owe, before any command but ``train``."""
        if self._commit_lr is not None:
            lr, self._commit_lr = self._commit_lr, None
            self._clipped += int(sum(self._call_all("commit", [(lr,)] * len(self.ranges))))

    def _call_all(self, command: str, arguments: list[tuple]) -> list[Any]:
        """Send one command to every worker, then collect the replies (workers run in parallel)."""
        if self._closed:
            raise PnnError("the NoProp worker pool is closed")
        if command not in ("train", "commit"):
            self._flush_commit()
        for w, args in enumerate(arguments):
            self._connections[w].send((command, args))
        replies, first_error = [], None
        for w in range(len(arguments)):
            try:
                replies.append(self._receive(w))
            except PnnError as exc:  # read every reply so no stale one waits in a pipe
                first_error = first_error or exc
        if first_error is not None:
            raise first_error
        return replies

    # -------------------------------------------------------------------------- training
    def setup(self, template: Optimizer, clip: bool) -> None:
        """Give every trainable node of every worker a fresh copy of ``template``."""
        self._call_all("setup", [(template, clip)] * len(self.ranges))

    def train(self, x, labels, z_inputs, embeddings, weights, want_embedding_gradient) -> list[BlockOutcome]:
        """Train-step every block in parallel; see :meth:`LocalBlocks.train`. Gradients stay in the workers.

        The update of the previous accepted step travels with this message, which saves one
        exchange per step. ``x`` is sent as float32, which is exact for encoder outputs.
        """
        lr, self._commit_lr = self._commit_lr, None
        x32 = x.astype(np.float32)
        replies = self._call_all(
            "train",
            [(lr, x32, labels, z_inputs[r[0] : r[-1] + 1], embeddings, weights[r[0] : r[-1] + 1], want_embedding_gradient)
             for r in self.ranges],
        )
        self._clipped += sum(clipped for clipped, _ in replies)
        return [outcome for _, outcomes in replies for outcome in outcomes]

    def infer(self, x, z0, noise, coefficients, embeddings, reuse_features: bool = False) -> np.ndarray:
        """Run the recursion from z_0 through the workers in block order and return z_T."""
        z = z0
        x = x.astype(np.float32)
        for w, r in enumerate(self.ranges):
            part = slice(r[0], r[-1] + 1)
            z = self._call(
                w, "infer", x, z, None if noise is None else noise[part],
                tuple(c[part] for c in coefficients), embeddings, reuse_features,
            )
        return z

    def commit(self, lr: float) -> None:
        """Apply every worker's pending update with learning rate ``lr``.

        The workers apply it when the next message reaches them, before anything else.
        """
        self._commit_lr = float(lr)

    @property
    def clipped(self) -> int:
        """Number of parameter values the workers have clipped at their limits so far."""
        return self._clipped

    # ------------------------------------------------------------------------ state
    def node_states(self) -> dict[str, Any]:
        """Return every node's state, by name."""
        states: dict[str, Any] = {}
        for reply in self._call_all("node_states", [()] * len(self.ranges)):
            states.update(reply)
        return states

    def load_node_states(self, states: Mapping[str, Any]) -> None:
        """Restore what :meth:`node_states` returned."""
        missing = [name for name in self.node_names if name not in states]
        if missing:
            raise ConfigError(f"saved network state has no entry for node(s) {missing}")
        arguments = []
        for w in range(len(self.ranges)):
            names = self._names_of(w)
            arguments.append(({name: states[name] for name in names},))
        self._call_all("load_node_states", arguments)

    def _names_of(self, w: int) -> list[str]:
        return [identity["name"] for identity in self._identities if identity["worker"] == w]

    def optimizer_states(self) -> dict[str, Any]:
        """Return every worker optimizer's state, by node name."""
        states: dict[str, Any] = {}
        for reply in self._call_all("optimizer_states", [()] * len(self.ranges)):
            states.update(reply)
        return states

    def load_optimizer_states(self, states: Mapping[str, Any]) -> None:
        """Restore what :meth:`optimizer_states` returned."""
        self._call_all("load_optimizer_states", [(dict(states),)] * len(self.ranges))

    def identities(self) -> list[dict[str, Any]]:
        """Return every node's identity, with the number of the worker that owns the node."""
        return [dict(identity) for identity in self._identities]

    def apply_safe_state(self) -> None:
        """Apply every node's safe state in every worker."""
        if not self._closed:
            self._call_all("apply_safe_state", [()] * len(self.ranges))

    def close(self) -> None:
        """Close every node and stop the workers; closing twice is allowed."""
        if self._closed:
            return
        try:
            self._flush_commit()
        except PnnError as exc:
            log.warning("NoProp workers: the last update was not applied before closing: %s", exc)
        self._closed = True
        for w, connection in enumerate(self._connections):
            try:
                connection.send(("close", ()))
                connection.recv()
            except (EOFError, OSError, BrokenPipeError):
                pass
            connection.close()
        for process in self._processes:
            process.join(timeout=10)
            if process.is_alive():
                log.warning("NoProp worker %s did not stop within 10 s; terminating it", process.name)
                process.terminate()
                process.join(timeout=5)
