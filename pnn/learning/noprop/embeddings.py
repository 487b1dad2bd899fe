"""Label embeddings u_y, the denoising targets of NoProp.

Three kinds, as in NoProp (Li, Teh and Pascanu 2025, arXiv:2503.24322):

- ``onehot``: u_y is the one-hot vector of y; dimension = number of classes, fixed.
- ``learned``: a matrix of shape (n_classes, dim), trained with the blocks. Rows start as
  random orthonormal vectors (or unit-norm random vectors when dim < n_classes).
- ``prototype``: u_y is the training input of class y nearest the class mean, so the
  dimension is the number of input features. It is fixed unless made trainable.

The embedding is a node whose ``forward`` maps one-hot labels of shape (batch, n_classes) to
embeddings of shape (batch, dim), so the controller trains a learned embedding like any node.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ...errors import ConfigError
from ...nodes import Node, NodeState, ParameterSpec

__all__ = ["LabelEmbedding", "EMBEDDING_KINDS", "prototype_embeddings"]

EMBEDDING_KINDS = ("onehot", "learned", "prototype")

# Bound on learned embedding entries; digital values have no physical range, so this only
# guards against divergence.
_EMBEDDING_LIMIT = 1e3


def prototype_embeddings(x: np.ndarray, y: np.ndarray, n_classes: int) -> np.ndarray:
    """Return, per class, the training input nearest the class mean: array (n_classes, n_features).

    Raises
    ------
    ConfigError
        If a class has no training example.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y)
    rows = []
    for k in range(n_classes):
        members = x[y == k]
        if len(members) == 0:
            raise ConfigError(f"class {k} has no training example, so it has no prototype; use embedding='onehot'")
        distance = np.sum((members - members.mean(axis=0)) ** 2, axis=1)
        rows.append(members[int(np.argmin(distance))])
    return np.stack(rows)


class LabelEmbedding(Node):
    """The label embedding matrix: row y is u_y.

    Parameters
    ----------
    n_classes
        Number of classes.
    kind
        ``"onehot"``, ``"learned"`` or ``"prototype"``.
    dim
        Embedding dimension. Must equal ``n_classes`` for one-hot embeddings and the number of
        features for prototypes; for learned embeddings None means ``n_classes``.
    trainable
        Train the matrix with the blocks; None means True for ``learned`` and False otherwise.
    prototypes
        Array of shape (n_classes, dim) with the prototypes, for ``kind="prototype"``.
    rng
        Generator for the initial learned embedding.
    """

    gradient_method = "exact"

    def __init__(
        self,
        n_classes: int,
        kind: str = "onehot",
        *,
        dim: int | None = None,
        trainable: bool | None = None,
        prototypes: np.ndarray | None = None,
        rng: np.random.Generator | int | None = None,
        name: str = "embedding",
    ) -> None:
        if kind not in EMBEDDING_KINDS:
            raise ConfigError(f"unknown embedding {kind!r}; choose one of {', '.join(EMBEDDING_KINDS)}")
        if kind == "onehot":
            if dim is not None and dim != n_classes:
                raise ConfigError(
                    f"embedding_dim = {dim} does not match the {n_classes} classes of a one-hot "
                    "embedding; leave embedding_dim unset or use embedding='learned'"
                )
            matrix = np.eye(n_classes)
        elif kind == "prototype":
            if prototypes is None:
                raise ConfigError("a prototype embedding needs the prototypes (one training input per class)")
            matrix = np.array(prototypes, dtype=np.float64)
            if matrix.ndim != 2 or matrix.shape[0] != n_classes:
                raise ConfigError(f"prototypes must have shape ({n_classes}, n_features), got {matrix.shape}")
            if dim is not None and dim != matrix.shape[1]:
                raise ConfigError(
                    f"embedding_dim = {dim} does not match the {matrix.shape[1]} input features that "
                    "prototype embeddings have; leave embedding_dim unset"
                )
        else:
            dim = n_classes if dim is None else dim
            if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
                raise ConfigError(f"embedding_dim must be a positive integer, got {dim!r}")
            rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
            matrix = rng.standard_normal((n_classes, int(dim)))
            if dim >= n_classes:
                # Orthonormal rows: the classes start as far apart as one-hot vectors are.
                q, _ = np.linalg.qr(matrix.T)
                matrix = q.T
            else:
                matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
        super().__init__(
            name, n_classes, matrix.shape[1],
            input_spec=ParameterSpec((n_classes,), 0.0, 1.0, "1", description="one-hot label"),
            output_unit="1", dtype=np.float64,
        )
        self.kind = kind
        self.is_trainable = (kind == "learned") if trainable is None else bool(trainable)
        self.weight = np.ascontiguousarray(matrix)
        self._specs = (
            {"weight": ParameterSpec(matrix.shape, -_EMBEDDING_LIMIT, _EMBEDDING_LIMIT, "1", description="u_y, one row per class")}
            if self.is_trainable else {}
        )

    @property
    def dim(self) -> int:
        """Embedding dimension."""
        return self.n_out

    @property
    def matrix(self) -> np.ndarray:
        """The embeddings, array of shape (n_classes, dim); row y is u_y."""
        return self.weight

    @property
    def parameters(self) -> Mapping[str, ParameterSpec]:
        return self._specs

    def _read_parameters(self) -> dict[str, np.ndarray]:
        return {"weight": self.weight} if self.is_trainable else {}

    def _write_parameters(self, values: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if "weight" in values:
            self.weight = np.array(values["weight"], dtype=np.float64)
        return {name: getattr(self, name).copy() for name in values}

    def _forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        return x @ self.weight, x, {}

    def local_gradient(self, state: NodeState, output_error: np.ndarray, *, at: str = "output") -> dict[str, np.ndarray]:
        """Return the batch-mean gradient of the embedding matrix for an error at its outputs."""
        error = self.check_error(state, output_error, at=at)
        return {"weight": state.inputs.T @ error / error.shape[0]}

    def state_dict(self) -> dict[str, Any]:
        # Fixed embeddings (prototypes from the data) are stored too, so a resumed run needs no data.
        return {"weight": self.weight.copy()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        weight = np.asarray(state["weight"], dtype=np.float64)
        if weight.shape != self.weight.shape:
            raise ConfigError(f"{self._where('weight')}: saved shape {weight.shape}, expected {self.weight.shape}")
        self.weight = weight.copy()

    def identity(self) -> dict[str, Any]:
        info = super().identity()
        info.update(embedding=self.kind, trainable=self.is_trainable)
        return info
