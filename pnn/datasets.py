"""Datasets for training: the embedded vowel set, MNIST from IDX files, and batching.

Two datasets are available by name (:data:`DATASET_NAMES`):

- ``"vowels"``: 7 vowel classes, 12 formant features, 210 training and 49 test examples. The
  file ships inside the package (``pnn/data/vowels_wright2022.csv``), so it needs no download.
- ``"mnist"``: 60000 training and 10000 test digits of 28 x 28 pixels, read from the four
  original IDX files (gzipped or not) in a folder, or downloaded into a cache with
  ``download=True``.

Every loader returns a :class:`Dataset`, which validates shapes, dtypes, label range and
finiteness once, so the training loop can trust it. :func:`epoch_order` and
:func:`iterate_batches` fix the order in which examples are visited, so a resumed run gets the
same batches as an uninterrupted one.

This module needs only NumPy, tqdm and the standard library.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import http.client
import io
import logging
import math
import os
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .errors import ConfigError, DataError

__all__ = [
    "DATASET_NAMES",
    "Dataset",
    "load_dataset",
    "load_vowels",
    "load_mnist",
    "download_mnist",
    "default_cache_dir",
    "read_idx",
    "epoch_order",
    "iterate_batches",
    "MNIST_FILES",
    "MNIST_SHA256",
    "MNIST_MIRRORS",
    "VOWEL_CLASS_NAMES",
    "VOWELS_SHA256",
]

log = logging.getLogger(__name__)

#: Names accepted by :func:`load_dataset`.
DATASET_NAMES = ("vowels", "mnist")

# ------------------------------------------------------------------------------ the Dataset


@dataclass(frozen=True, eq=False)
class Dataset:
    """A classification dataset split into training and test examples.

    Construction validates every field and raises :class:`~pnn.errors.DataError` on the first
    problem found.
    """

    name: str
    """Short name, one of :data:`DATASET_NAMES` for the built-in loaders."""
    x_train: np.ndarray
    """Training features, float32 array of shape (n_train, n_features), all finite."""
    y_train: np.ndarray
    """Training labels, int64 array of shape (n_train,), each in [0, n_classes)."""
    x_test: np.ndarray
    """Test features, float32 array of shape (n_test, n_features), all finite."""
    y_test: np.ndarray
    """Test labels, int64 array of shape (n_test,), each in [0, n_classes)."""
    n_classes: int
    """Number of classes."""
    class_names: tuple[str, ...]
    """Name of each class, indexed by label."""
    source: str
    """Citation of the data, for run records and reports."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "class_names", tuple(str(c) for c in self.class_names))
        if isinstance(self.n_classes, bool) or not isinstance(self.n_classes, (int, np.integer)):
            raise DataError(f"dataset {self.name!r}: n_classes must be an integer, got {self.n_classes!r}")
        if self.n_classes < 2:
            raise DataError(f"dataset {self.name!r}: n_classes must be at least 2, got {self.n_classes}")
        object.__setattr__(self, "n_classes", int(self.n_classes))
        if len(self.class_names) != self.n_classes:
            raise DataError(
                f"dataset {self.name!r}: {len(self.class_names)} class names given for {self.n_classes} classes"
            )

        for split in ("train", "test"):
            self._check_split(split)
        if self.x_train.shape[1] != self.x_test.shape[1]:
            raise DataError(
                f"dataset {self.name!r}: x_train has {self.x_train.shape[1]} features but x_test has "
                f"{self.x_test.shape[1]}; both splits need the same features"
            )

    def _check_split(self, split: str) -> None:
        x = getattr(self, f"x_{split}")
        y = getattr(self, f"y_{split}")
        if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 2:
            raise DataError(
                f"dataset {self.name!r}: x_{split} must be a 2-D float32 array of shape (n, n_features), "
                f"got {_describe_array(x)}; convert it with np.asarray(x, dtype=np.float32)"
            )
        if not isinstance(y, np.ndarray) or y.dtype != np.int64 or y.ndim != 1:
            raise DataError(
                f"dataset {self.name!r}: y_{split} must be a 1-D int64 array, got {_describe_array(y)}; "
                f"convert it with np.asarray(y, dtype=np.int64)"
            )
        if x.shape[0] != y.shape[0]:
            raise DataError(
                f"dataset {self.name!r}: x_{split} has {x.shape[0]} rows but y_{split} has {y.shape[0]} labels"
            )
        if x.shape[0] == 0 or x.shape[1] == 0:
            raise DataError(f"dataset {self.name!r}: x_{split} is empty (shape {x.shape})")

        finite = np.isfinite(x)
        if not finite.all():
            bad_rows, bad_features = np.nonzero(~finite)
            raise DataError(
                f"dataset {self.name!r}: x_{split} has {bad_rows.size} non-finite values (NaN or infinity) "
                f"in {np.unique(bad_rows).size} rows, the first at row {bad_rows[0]}, feature "
                f"{bad_features[0]}; remove or repair those examples"
            )

        low, high = int(y.min()), int(y.max())
        if low < 0 or high >= self.n_classes:
            bad = int(np.count_nonzero((y < 0) | (y >= self.n_classes)))
            raise DataError(
                f"dataset {self.name!r}: y_{split} has {bad} labels outside 0..{self.n_classes - 1} "
                f"(found min {low}, max {high})"
            )

    @property
    def n_features(self) -> int:
        """Number of input features per example."""
        return int(self.x_train.shape[1])

    @property
    def n_train(self) -> int:
        """Number of training examples."""
        return int(self.x_train.shape[0])

    @property
    def n_test(self) -> int:
        """Number of test examples."""
        return int(self.x_test.shape[0])

    def head(self, n_train: int | None = None, n_test: int | None = None) -> Dataset:
        """Return a copy that keeps only the first ``n_train`` and ``n_test`` examples.

        None keeps a split whole. Each count must lie between 1 and the split's size, else
        :class:`~pnn.errors.ConfigError` is raised. The arrays are copied, so the full arrays
        can be freed.
        """
        n_train = _check_count("n_train", n_train, self.n_train, self.name)
        n_test = _check_count("n_test", n_test, self.n_test, self.name)
        return Dataset(
            name=self.name,
            x_train=self.x_train[:n_train].copy(),
            y_train=self.y_train[:n_train].copy(),
            x_test=self.x_test[:n_test].copy(),
            y_test=self.y_test[:n_test].copy(),
            n_classes=self.n_classes,
            class_names=self.class_names,
            source=self.source,
        )


def _describe_array(value: object) -> str:
    if isinstance(value, np.ndarray):
        return f"{value.dtype} array of shape {value.shape}"
    return type(value).__name__


def _check_count(name: str, value: int | None, available: int, dataset: str) -> int:
    if value is None:
        return available
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"{name} must be a whole number, got {value!r}")
    if not 1 <= value <= available:
        raise ConfigError(f"{name} must be between 1 and {available} for dataset {dataset!r}, got {value}")
    return int(value)


def load_dataset(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    download: bool = False,
    n_train: int | None = None,
    n_test: int | None = None,
) -> Dataset:
    """Load a dataset by name, optionally keeping only its first examples.

    Parameters
    ----------
    name
        One of :data:`DATASET_NAMES`.
    data_dir
        Folder with the dataset's files (MNIST only, see :func:`load_mnist`). The vowel set is
        embedded in the package and ignores it.
    download
        Fetch missing MNIST files into the cache folder (see :func:`load_mnist`).
    n_train, n_test
        Keep only the first ``n_train`` training and ``n_test`` test examples, for quick runs.
        None keeps all.

    Raises
    ------
    DataError
        For an unknown name, or missing, corrupt or invalid data.
    ConfigError
        For ``n_train`` or ``n_test`` outside 1 to the split's size.
    """
    if name == "vowels":
        if data_dir is not None:
            log.debug("the vowel set is embedded in pnn; ignoring data_dir=%s", data_dir)
        dataset = load_vowels()
    elif name == "mnist":
        dataset = load_mnist(data_dir, download=download)
    else:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")

    if n_train is None and n_test is None:
        return dataset
    return dataset.head(n_train, n_test)


# ------------------------------------------------------------------------------ vowels

#: SHA-256 of ``pnn/data/vowels_wright2022.csv``, checked on every load.
VOWELS_SHA256 = "f1a33c77767f31ceb06195793430e56686d4b368a7cd858ec539e91b1c1cb326"

#: Vowel code of each label of the vowel set, with its hVd word: ae (had), ah (hod),
#: aw (hawed), uw (who'd), er (heard), iy (heed), ih (hid).
VOWEL_CLASS_NAMES = ("ae", "ah", "aw", "uw", "er", "iy", "ih")

_VOWELS_RESOURCE = "vowels_wright2022.csv"
_VOWEL_FEATURES = tuple(f"x{i}" for i in range(12))
_VOWEL_SPLIT_SIZES = {"train": 210, "test": 49}
_VOWELS_SOURCE = (
    "Hillenbrand, Getty, Clark & Wheeler (1995), Acoustic characteristics of American English "
    "vowels, J. Acoust. Soc. Am. 97(5), 3099-3111; 7-vowel subset, normalisation and split from "
    "the Physics-Aware-Training code (CC BY 4.0) accompanying Wright et al. (2022), Deep physical "
    "neural networks trained with backpropagation, Nature 601, 549-555"
)


def load_vowels() -> Dataset:
    """Load the embedded 7-vowel set: 210 training and 49 test examples of 12 features.

    The features are the first three formants (F1, F2, F3) at the vowel's steady state and at
    20 %, 50 % and 80 % of its duration. Each is divided by its maximum over the 259 tokens,
    so the values lie in (0, 1]. Examples keep the order of the original split (column ``split_pos``).
    The measurements are from Hillenbrand et al. (1995), J. Acoust. Soc. Am. 97(5), 3099-3111,
    and the selection and split from the code accompanying Wright et al. (2022), Nature 601,
    549-555; ``pnn/data/README.md`` describes the file.

    Returns
    -------
    Dataset
        ``x_train`` float32 of shape (210, 12), ``x_test`` float32 of shape (49, 12), int64
        labels 0-6 named by :data:`VOWEL_CLASS_NAMES`.
    """
    raw = resources.files("pnn").joinpath("data", _VOWELS_RESOURCE).read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != VOWELS_SHA256:
        raise DataError(
            f"embedded vowel file pnn/data/{_VOWELS_RESOURCE} is damaged: SHA-256 expected "
            f"{VOWELS_SHA256}, found {digest}; reinstall pnn"
        )

    rows = list(csv.DictReader(io.StringIO(raw.decode("utf-8"))))
    splits = {}
    for split, expected_size in _VOWEL_SPLIT_SIZES.items():
        chosen = sorted((row for row in rows if row["split"] == split), key=lambda row: int(row["split_pos"]))
        if len(chosen) != expected_size:
            raise DataError(
                f"embedded vowel file has {len(chosen)} {split} rows, expected {expected_size}; reinstall pnn"
            )
        # x0..x11 were written with enough digits to parse back to the exact float32 values.
        x = np.array([[float(row[column]) for column in _VOWEL_FEATURES] for row in chosen], dtype=np.float32)
        y = np.array([int(row["label"]) for row in chosen], dtype=np.int64)
        splits[split] = (x, y)

    return Dataset(
        name="vowels",
        x_train=splits["train"][0],
        y_train=splits["train"][1],
        x_test=splits["test"][0],
        y_test=splits["test"][1],
        n_classes=len(VOWEL_CLASS_NAMES),
        class_names=VOWEL_CLASS_NAMES,
        source=_VOWELS_SOURCE,
    )


# ------------------------------------------------------------------------------ IDX files

# IDX magic numbers: two zero bytes, a type code (0x08 = unsigned byte) and the number of
# dimensions, read as one big-endian uint32.
_IDX_MAGIC_NAMES = {2051: "images, 3 dimensions", 2049: "labels, 1 dimension"}
_GZIP_MAGIC = b"\x1f\x8b"
_IDX_ADVICE = "re-download the file or check --data-dir"


def read_idx(path: str | os.PathLike[str], *, expected_magic: int | None = None) -> np.ndarray:
    """Read an IDX file of unsigned bytes (the MNIST format), gzipped or not.

    A file is treated as gzip when it starts with the gzip magic bytes, whatever its suffix.
    The header is a big-endian uint32 magic number (2051 for images, 2049 for labels) followed
    by one big-endian uint32 size per dimension. The payload must contain exactly as many
    bytes as the product of the sizes.

    Parameters
    ----------
    path
        The file to read.
    expected_magic
        2051 or 2049 to accept only images or only labels; None accepts both.

    Returns
    -------
    numpy.ndarray
        uint8 array of shape (count, rows, cols) for images or (count,) for labels.

    Raises
    ------
    DataError
        When the file is missing or unreadable, is a corrupt gzip stream, has an unknown or
        unexpected magic number, a zero dimension, or a payload shorter or longer than its
        header declares. The message names the file, the expected and found values, and what to do.
    """
    if expected_magic is not None and expected_magic not in _IDX_MAGIC_NAMES:
        raise ConfigError(f"expected_magic must be None, 2051 or 2049, got {expected_magic!r}")
    path = Path(path)
    try:
        content = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"IDX file {path} not found; check --data-dir") from None
    except OSError as exc:
        raise DataError(f"cannot read IDX file {path}: {exc.strerror or exc}; check its permissions") from None

    if content[:2] == _GZIP_MAGIC:
        try:
            content = gzip.decompress(content)
        except (OSError, EOFError, zlib.error) as exc:
            # BadGzipFile (an OSError) for a bad header or CRC, EOFError for a cut-off stream,
            # zlib.error for corrupt compressed data.
            raise DataError(f"IDX file {path} is not a valid gzip stream ({exc}); {_IDX_ADVICE}") from None

    if len(content) < 4:
        raise DataError(
            f"IDX file {path} is truncated: expected a header of at least 4 bytes, found {len(content)}; "
            f"{_IDX_ADVICE}"
        )
    magic = int.from_bytes(content[:4], "big")
    if magic not in _IDX_MAGIC_NAMES or (expected_magic is not None and magic != expected_magic):
        accepted = [expected_magic] if expected_magic is not None else list(_IDX_MAGIC_NAMES)
        expected = " or ".join(f"{m} ({_IDX_MAGIC_NAMES[m]})" for m in accepted)
        raise DataError(
            f"IDX file {path} has the wrong magic number: expected {expected}, found {magic}; {_IDX_ADVICE}"
        )

    ndim = magic & 0xFF
    header_size = 4 + 4 * ndim
    if len(content) < header_size:
        raise DataError(
            f"IDX file {path} is truncated: expected a header of {header_size} bytes, found {len(content)}; "
            f"{_IDX_ADVICE}"
        )
    shape = tuple(int.from_bytes(content[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if 0 in shape:
        raise DataError(f"IDX file {path} has an empty dimension: shape {shape}; {_IDX_ADVICE}")

    expected_payload = math.prod(shape)
    found_payload = len(content) - header_size
    if found_payload != expected_payload:
        problem = "is truncated" if found_payload < expected_payload else "has extra bytes after the payload"
        raise DataError(
            f"IDX file {path} {problem}: expected {expected_payload} payload bytes for shape {shape}, "
            f"found {found_payload}; {_IDX_ADVICE}"
        )

    # copy() so the caller gets a writable array that does not pin the file's bytes.
    return np.frombuffer(content, dtype=np.uint8, offset=header_size).reshape(shape).copy()


# ------------------------------------------------------------------------------ MNIST

#: Base names of the four MNIST files; each may also be stored with a ``.gz`` suffix.
MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

#: SHA-256 of the four original gzipped MNIST files, first distributed at
#: http://yann.lecun.com/exdb/mnist/. Many public MNIST loaders list the same sums.
MNIST_SHA256 = {
    "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}

#: Base URLs of public mirrors of the gzipped MNIST files, tried in order by
#: :func:`download_mnist`. Each file is fetched from ``base + name``.
MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)

_MNIST_CLASS_NAMES = tuple(str(digit) for digit in range(10))
_MNIST_SOURCE = (
    "MNIST, Yann LeCun and Corinna Cortes, CC BY-SA 3.0; LeCun, Bottou, Bengio & Haffner (1998), "
    "Gradient-based learning applied to document recognition, Proc. IEEE 86(11), 2278-2324"
)
_MNIST_IMAGE_SIDE = 28
_CACHE_ENV = "PNN_CACHE_DIR"
_DOWNLOAD_CHUNK = 1 << 16


def default_cache_dir() -> Path:
    """Return the folder that MNIST downloads go to: ``$PNN_CACHE_DIR/mnist`` or ``~/.cache/pnn/mnist``."""
    root = os.environ.get(_CACHE_ENV)
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "pnn"
    return base / "mnist"


def _find_mnist_file(folders: Sequence[Path], base_name: str) -> Path | None:
    # The uncompressed file is preferred because it reads faster.
    for folder in folders:
        for candidate in (folder / base_name, folder / f"{base_name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def _mnist_search_folders(data_dir: Path | None, cache_dir: Path, download: bool) -> list[Path]:
    if data_dir is None:
        return [cache_dir]

    if not data_dir.is_dir():
        raise DataError(f"MNIST data folder {data_dir} does not exist; pass --data-dir with the folder of the IDX files")
    folder = data_dir
    # Accept the parent of an mnist/ folder too, such as a shared data folder.
    has_files = any(_find_mnist_file([data_dir], name) for name in MNIST_FILES.values())
    if not has_files and (data_dir / "mnist").is_dir():
        folder = data_dir / "mnist"
    return [folder, cache_dir] if download else [folder]


def load_mnist(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    download: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    mirrors: Sequence[str] | None = None,
    timeout: float = 30.0,
) -> Dataset:
    """Load MNIST from its four IDX files, downloading missing ones when asked.

    Each file (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``) may be gzipped, with or without
    a ``.gz`` suffix. Where a file is found:

    - ``data_dir`` given: in ``data_dir``, or in ``data_dir/mnist`` when ``data_dir`` has none
      of the files. With ``download=True``, also in ``cache_dir``, and files found in neither
      are downloaded there.
    - ``data_dir`` None: in ``cache_dir``, downloading missing files there with ``download=True``.

    Parameters
    ----------
    data_dir
        Folder with the IDX files.
    download
        Download missing files (see :func:`download_mnist`).
    cache_dir
        Download folder; None uses :func:`default_cache_dir`.
    mirrors
        Base URLs to download from, tried in order; None uses :data:`MNIST_MIRRORS`.
    timeout
        Timeout of each connection and read, in seconds.

    Returns
    -------
    Dataset
        Pixels scaled to [0, 1] as float32 of shape (60000, 784) and (10000, 784), row-major
        28 x 28 images; int64 labels 0-9.

    Raises
    ------
    DataError
        For missing files (naming them and the options that fix it), corrupt files, image and
        label counts that disagree, images that are not 28 x 28, labels outside 0-9, or a failed
        download.
    """
    data_dir = Path(data_dir).expanduser() if data_dir is not None else None
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    folders = _mnist_search_folders(data_dir, cache_dir, download)

    paths = {role: _find_mnist_file(folders, name) for role, name in MNIST_FILES.items()}
    missing = [MNIST_FILES[role] for role, path in paths.items() if path is None]
    if missing and download:
        download_mnist(cache_dir, files=[f"{name}.gz" for name in missing], mirrors=mirrors, timeout=timeout)
        paths = {role: _find_mnist_file(folders, name) for role, name in MNIST_FILES.items()}
        missing = [MNIST_FILES[role] for role, path in paths.items() if path is None]
    if missing:
        where = " or ".join(str(folder) for folder in folders)
        raise DataError(
            f"MNIST files not found in {where}: {', '.join(f'{name}[.gz]' for name in missing)}; "
            f"pass --data-dir with a folder that contains them, or --download to fetch them"
        )

    x_train, y_train = _load_mnist_split(paths["train_images"], paths["train_labels"])
    x_test, y_test = _load_mnist_split(paths["test_images"], paths["test_labels"])
    log.info("loaded MNIST: %d training and %d test images", len(y_train), len(y_test))
    return Dataset(
        name="mnist",
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        n_classes=10,
        class_names=_MNIST_CLASS_NAMES,
        source=_MNIST_SOURCE,
    )


def _load_mnist_split(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(images_path, expected_magic=2051)
    labels = read_idx(labels_path, expected_magic=2049)

    side = _MNIST_IMAGE_SIDE
    if images.shape[1:] != (side, side):
        raise DataError(
            f"MNIST file {images_path} contains images of {images.shape[1]} x {images.shape[2]} pixels, "
            f"expected {side} x {side}; {_IDX_ADVICE}"
        )
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"MNIST files {images_path} and {labels_path} disagree: {images.shape[0]} images but "
            f"{labels.shape[0]} labels; {_IDX_ADVICE}"
        )
    if labels.max() > 9:
        bad = int(np.count_nonzero(labels > 9))
        raise DataError(
            f"MNIST file {labels_path} has {bad} labels outside 0-9 (max {labels.max()}); {_IDX_ADVICE}"
        )

    # (count, 28, 28) uint8 -> (count, 784) float32 in [0, 1], divided in place to save memory.
    x = images.reshape(images.shape[0], side * side).astype(np.float32)
    x /= np.float32(255.0)
    return x, labels.astype(np.int64)


# ------------------------------------------------------------------------------ download


def download_mnist(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    files: Sequence[str] | None = None,
    mirrors: Sequence[str] | None = None,
    timeout: float = 30.0,
    progress: bool = True,
) -> Path:
    """Download gzipped MNIST files into ``cache_dir`` and verify their SHA-256.

    Files already in ``cache_dir`` are kept as they are. Each missing file is fetched from the
    mirrors in turn: a mirror that fails to connect, times out, returns an HTTP error or cuts
    the transfer short is logged and the next one is tried. The data goes to a temporary file
    in ``cache_dir``, which is renamed to its final name only after its SHA-256 matches
    :data:`MNIST_SHA256`, so an interrupted or corrupt download never looks like a good file.

    Parameters
    ----------
    cache_dir
        Destination folder, created if needed; None uses :func:`default_cache_dir`.
    files
        Names to fetch, keys of :data:`MNIST_SHA256`; None fetches all four.
    mirrors
        Base URLs, tried in order; None uses :data:`MNIST_MIRRORS`.
    timeout
        Timeout of each connection and read, in seconds.
    progress
        Show a tqdm progress bar per file on stderr.

    Returns
    -------
    pathlib.Path
        The folder that contains the files.

    Raises
    ------
    DataError
        When a download's SHA-256 does not match (the temporary file is deleted and no other
        mirror is tried, because a mirror serving different bytes needs attention), when every
        mirror fails for a file, or when the folder cannot be created.
    ConfigError
        For an unknown file name, an empty mirror list or a timeout that is not positive.
    """
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    names = list(MNIST_SHA256) if files is None else list(files)
    unknown = [name for name in names if name not in MNIST_SHA256]
    if unknown:
        raise ConfigError(f"unknown MNIST file(s) {unknown}; the files are {', '.join(MNIST_SHA256)}")
    mirrors = tuple(MNIST_MIRRORS if mirrors is None else mirrors)
    if not mirrors or not all(isinstance(m, str) and m for m in mirrors):
        raise ConfigError(f"mirrors must be a non-empty list of base URLs, got {mirrors!r}")
    if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
        raise ConfigError(f"download timeout must be a positive number of seconds, got {timeout!r}")

    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(
            f"cannot create the MNIST cache folder {cache_dir}: {exc.strerror or exc}; "
            f"set {_CACHE_ENV} to a writable folder"
        ) from None

    for name in names:
        if (cache_dir / name).is_file():
            log.debug("MNIST file %s already in %s", name, cache_dir)
            continue
        _download_one(name, cache_dir, mirrors, timeout, progress)
    return cache_dir


def _download_one(name: str, cache_dir: Path, mirrors: Sequence[str], timeout: float, progress: bool) -> None:
    failures = []
    for mirror in mirrors:
        url = mirror.rstrip("/") + "/" + name
        log.info("downloading %s from %s", name, url)
        try:
            temp_path, digest = _fetch_to_temp(url, name, cache_dir, timeout, progress)
        except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
            # URLError covers HTTP errors and refused connections; OSError covers timeouts.
            log.warning("download of %s from %s failed: %s; trying the next mirror", name, url, exc)
            failures.append(f"{url}: {exc}")
            continue

        expected = MNIST_SHA256[name]
        if digest != expected:
            temp_path.unlink(missing_ok=True)
            raise DataError(
                f"MNIST file {name} from mirror {mirror} failed its checksum: SHA-256 expected {expected}, "
                f"found {digest}; the download was deleted, try again later or pass mirrors= with another mirror"
            )
        os.replace(temp_path, cache_dir / name)
        log.info("saved %s to %s (SHA-256 verified)", name, cache_dir)
        return

    raise DataError(
        f"could not download MNIST file {name} from any mirror ({'; '.join(failures)}); check the network "
        f"connection, or download the file yourself into {cache_dir} or a folder passed with --data-dir"
    )


def _fetch_to_temp(url: str, name: str, cache_dir: Path, timeout: float, progress: bool) -> tuple[Path, str]:
    """Stream ``url`` into a new temporary file in ``cache_dir``; return its path and SHA-256.

    The temporary file is deleted when the transfer fails.
    """
    request = urllib.request.Request(url, headers={"User-Agent": "pnn-lab"})
    handle, temp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=cache_dir)
    temp_path = Path(temp_name)
    digest = hashlib.sha256()
    received = 0
    try:
        with os.fdopen(handle, "wb") as out, urllib.request.urlopen(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            with tqdm(total=total, unit="B", unit_scale=True, desc=name, disable=not progress) as bar:
                while chunk := response.read(_DOWNLOAD_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            if total is not None and received != total:
                raise http.client.IncompleteRead(b"", total - received)
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise
    return temp_path, digest.hexdigest()


# ------------------------------------------------------------------------------ batching


def _check_whole(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{name} must be a whole number >= {minimum}, got {value!r}")
    return int(value)


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """Return the order in which to visit ``n`` examples in one epoch.

    The permutation depends only on ``(seed, epoch)``, through
    ``np.random.default_rng([seed, epoch])``, so a run resumed at any epoch visits the examples
    in the same order as an uninterrupted run.

    Parameters
    ----------
    n
        Number of examples, at least 1.
    seed
        The run's seed, a whole number >= 0.
    epoch
        Epoch index, a whole number >= 0.

    Returns
    -------
    numpy.ndarray
        int64 array of shape (n,), a permutation of 0..n-1.
    """
    n = _check_whole("n", n, 1)
    seed = _check_whole("seed", seed, 0)
    epoch = _check_whole("epoch", epoch, 0)
    return np.random.default_rng([seed, epoch]).permutation(n).astype(np.int64, copy=False)


def iterate_batches(
    n: int, batch_size: int, order: np.ndarray | None = None, *, start_batch: int = 0
) -> Iterator[np.ndarray]:
    """Return an iterator over the example indices of each batch of one epoch.

    Parameters
    ----------
    n
        Number of examples, at least 1.
    batch_size
        Examples per batch, at least 1. The last batch contains the remainder, so it may be
        smaller.
    order
        A permutation of 0..n-1, usually from :func:`epoch_order`; None visits 0..n-1 in turn.
    start_batch
        Index of the first batch to yield, to continue an epoch after a resume; the batches are
        the same as when iterating from 0.

    Returns
    -------
    Iterator[numpy.ndarray]
        The batches in turn, each an integer array of shape (batch,) that is a view of
        ``order``. Arguments are validated when the function is called, before any batch.

    Raises
    ------
    ConfigError
        For ``batch_size`` < 1, ``order`` that is not a permutation of 0..n-1, or
        ``start_batch`` outside 0 to the number of batches.
    """
    n = _check_whole("n", n, 1)
    batch_size = _check_whole("batch_size", batch_size, 1)
    n_batches = -(-n // batch_size)
    start_batch = _check_whole("start_batch", start_batch, 0)
    if start_batch > n_batches:
        raise ConfigError(f"start_batch must be at most {n_batches} (the number of batches), got {start_batch}")

    if order is None:
        order = np.arange(n, dtype=np.int64)
    else:
        order = np.asarray(order)
        if order.shape != (n,) or not np.issubdtype(order.dtype, np.integer):
            raise ConfigError(
                f"order must be an integer array of shape ({n},), got {_describe_array(order)}; "
                f"use epoch_order(n, seed, epoch)"
            )
        if not np.array_equal(np.sort(order), np.arange(n)):
            raise ConfigError(f"order must be a permutation of 0..{n - 1}; use epoch_order(n, seed, epoch)")

    # Validation above runs at the call; only the slicing is lazy.
    return _slices(order, batch_size, start_batch * batch_size)


def _slices(order: np.ndarray, batch_size: int, first: int) -> Iterator[np.ndarray]:
    for start in range(first, order.shape[0], batch_size):
        yield order[start : start + batch_size]
