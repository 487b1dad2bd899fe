"""Tests of pnn.datasets: the embedded vowel set, the IDX reader, MNIST, download and batching.

Download tests run against an HTTP server on 127.0.0.1 started by the test. An autouse fixture
points the default mirror list at a closed loopback port, so no test can reach the internet.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import gzip
import hashlib
import http.server
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pnn import datasets
from pnn.datasets import (
    DATASET_NAMES,
    MNIST_SHA256,
    Dataset,
    download_mnist,
    epoch_order,
    iterate_batches,
    load_dataset,
    load_mnist,
    load_vowels,
    read_idx,
)
from pnn.errors import ConfigError, DataError

REPO_ROOT = Path(__file__).resolve().parents[1]
EMBEDDED_VOWELS = REPO_ROOT / "pnn" / "data" / "vowels_wright2022.csv"

# Published SHA-256 of the vowel CSV (Physics-Aware-Training vowel set rendered as text).
VOWELS_PUBLISHED_SHA256 = "f1a33c77767f31ceb06195793430e56686d4b368a7cd858ec539e91b1c1cb326"

# Maxima (Hz) that each raw formant column was divided by to give x0..x11.
VOWEL_FEATURE_MAXIMA = [1163, 3049, 3831, 1152, 3057, 3816, 1117, 3039, 3806, 1046, 3006, 3859]
VOWEL_RAW_COLUMNS = [f"F{f}_{t}" for t in ("ss", "20", "50", "80") for f in (1, 2, 3)]

# Published content checks of the original MNIST files.
MNIST_TEST_LABEL_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
MNIST_TRAIN_LABEL_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]

SMALL_LABELS = "t10k-labels-idx1-ubyte.gz"
LARGE_LABELS = "train-labels-idx1-ubyte.gz"


@pytest.fixture(autouse=True)
def offline_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Keep every test on loopback and out of the user's cache folder."""
    # Port 9 (discard) on loopback is closed, so a forgotten mirrors= fails fast and locally.
    monkeypatch.setattr(datasets, "MNIST_MIRRORS", ("http://127.0.0.1:9/",))
    monkeypatch.setenv("PNN_CACHE_DIR", str(tmp_path / "default-cache"))
    # urllib would send even loopback requests through a configured proxy.
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setenv("NO_PROXY", "*")


# ------------------------------------------------------------------------------ helpers


def idx_bytes(array: np.ndarray, magic: int | None = None, shape: tuple[int, ...] | None = None) -> bytes:
    """Encode a uint8 array as IDX; ``magic`` and ``shape`` override the header."""
    shape = array.shape if shape is None else shape
    magic = (0x08 << 8 | len(shape)) if magic is None else magic
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_file(path: Path, content: bytes, *, compress: bool = False) -> Path:
    path.write_bytes(gzip.compress(content) if compress else content)
    return path


def write_synthetic_mnist(
    folder: Path,
    rng: np.random.Generator,
    *,
    n_train: int = 12,
    n_test: int = 7,
    compress: bool = True,
) -> dict[str, np.ndarray]:
    """Write four small MNIST-format files and return the arrays written."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, size=(n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, size=n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, size=(n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, size=n_test, dtype=np.uint8),
    }
    for name, array in arrays.items():
        filename = f"{name}.gz" if compress else name
        write_file(folder / filename, idx_bytes(array), compress=compress)
    return arrays


def read_shared_vowels(path: Path) -> dict[str, list[dict[str, str]]]:
    """Rows of the vowel CSV per split, in split_pos order, parsed independently of pnn."""
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return {
        split: sorted((r for r in rows if r["split"] == split), key=lambda r: int(r["split_pos"]))
        for split in ("train", "test")
    }


def small_dataset(**changes: object) -> Dataset:
    fields = dict(
        name="toy",
        x_train=np.zeros((4, 3), dtype=np.float32),
        y_train=np.array([0, 1, 0, 1], dtype=np.int64),
        x_test=np.ones((2, 3), dtype=np.float32),
        y_test=np.array([1, 0], dtype=np.int64),
        n_classes=2,
        class_names=("a", "b"),
        source="test data",
    )
    fields.update(changes)
    return Dataset(**fields)


# ------------------------------------------------------------------------------ vowels


def test_embedded_vowels_sha256_matches_published() -> None:
    digest = hashlib.sha256(EMBEDDED_VOWELS.read_bytes()).hexdigest()
    assert digest == VOWELS_PUBLISHED_SHA256
    assert datasets.VOWELS_SHA256 == VOWELS_PUBLISHED_SHA256


def test_embedded_vowels_equal_shared_copy(shared_data_dir: Path) -> None:
    shared = shared_data_dir / "hillenbrand1995" / "pat_vowels_wright2022.csv"
    assert EMBEDDED_VOWELS.read_bytes() == shared.read_bytes()


def test_vowels_shapes_and_classes() -> None:
    data = load_vowels()
    assert data.name == "vowels"
    assert data.x_train.shape == (210, 12)
    assert data.x_test.shape == (49, 12)
    assert data.y_train.shape == (210,)
    assert data.y_test.shape == (49,)
    assert data.x_train.dtype == np.float32
    assert data.y_train.dtype == np.int64
    assert data.n_classes == 7
    assert data.class_names == ("ae", "ah", "aw", "uw", "er", "iy", "ih")
    assert set(np.unique(data.y_train)) == set(range(7))
    assert set(np.unique(data.y_test)) == set(range(7))
    # Every vowel has 37 tokens in total.
    assert np.bincount(np.concatenate([data.y_train, data.y_test])).tolist() == [37] * 7
    assert 0.0 < data.x_train.min()
    assert data.x_train.max() <= 1.0
    assert "Hillenbrand" in data.source
    assert "Wright" in data.source


def test_vowels_match_csv_rows() -> None:
    data = load_vowels()
    rows = read_shared_vowels(EMBEDDED_VOWELS)
    for split, x, y in (("train", data.x_train, data.y_train), ("test", data.x_test, data.y_test)):
        expected_labels = [int(r["label"]) for r in rows[split]]
        expected_x = np.array([[float(r[f"x{i}"]) for i in range(12)] for r in rows[split]], dtype=np.float32)
        assert y.tolist() == expected_labels
        np.testing.assert_array_equal(x, expected_x)
        assert [data.class_names[label] for label in y] == [r["vowel"] for r in rows[split]]


def test_vowel_features_are_raw_over_maxima() -> None:
    rows = read_shared_vowels(EMBEDDED_VOWELS)
    data = load_vowels()
    raw = np.array([[float(r[c]) for c in VOWEL_RAW_COLUMNS] for r in rows["train"]])
    expected = (raw / np.array(VOWEL_FEATURE_MAXIMA, dtype=np.float64)).astype(np.float32)
    np.testing.assert_array_equal(data.x_train, expected)


def test_vowels_first_train_rows_in_split_order() -> None:
    data = load_vowels()
    # split_pos 0, 1 and 2 of the training subset are rows 95, 58 and 49 of the original
    # dataset: uw, er and ih, not the file's row order.
    assert data.y_train[:3].tolist() == [3, 4, 6]
    rows = read_shared_vowels(EMBEDDED_VOWELS)
    assert [int(r["idx"]) for r in rows["train"][:3]] == [95, 58, 49]


def test_vowels_damaged_file_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets, "VOWELS_SHA256", "0" * 64)
    with pytest.raises(DataError, match="SHA-256 expected 0{64}, found f1a33c77"):
        load_vowels()


# ------------------------------------------------------------------------------ IDX reader


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gzip"])
def test_read_idx_round_trip(tmp_path: Path, rng: np.random.Generator, compress: bool) -> None:
    images = rng.integers(0, 256, size=(5, 4, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=5, dtype=np.uint8)
    images_path = write_file(tmp_path / "images", idx_bytes(images), compress=compress)
    labels_path = write_file(tmp_path / "labels", idx_bytes(labels), compress=compress)

    read_images = read_idx(images_path)
    read_labels = read_idx(labels_path, expected_magic=2049)
    assert read_images.dtype == np.uint8
    np.testing.assert_array_equal(read_images, images)
    np.testing.assert_array_equal(read_labels, labels)
    assert read_images.flags.writeable


def test_read_idx_detects_gzip_by_content(tmp_path: Path) -> None:
    labels = np.arange(10, dtype=np.uint8)
    gzipped_without_suffix = write_file(tmp_path / "labels-idx1-ubyte", idx_bytes(labels), compress=True)
    raw_with_suffix = write_file(tmp_path / "labels-idx1-ubyte.gz", idx_bytes(labels), compress=False)
    np.testing.assert_array_equal(read_idx(gzipped_without_suffix), labels)
    np.testing.assert_array_equal(read_idx(raw_with_suffix), labels)


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gzip"])
def test_read_idx_wrong_magic(tmp_path: Path, compress: bool) -> None:
    path = write_file(tmp_path / "bad.idx", idx_bytes(np.zeros(4, np.uint8), magic=2052), compress=compress)
    with pytest.raises(DataError) as info:
        read_idx(path)
    message = str(info.value)
    assert str(path) in message
    assert "wrong magic number" in message
    assert "expected 2051" in message
    assert "found 2052" in message
    assert "re-download" in message
    assert "--data-dir" in message
    assert "\n" not in message


def test_read_idx_unexpected_kind(tmp_path: Path) -> None:
    path = write_file(tmp_path / "labels.idx", idx_bytes(np.zeros(4, np.uint8)))
    with pytest.raises(DataError, match=r"expected 2051 \(images, 3 dimensions\), found 2049"):
        read_idx(path, expected_magic=2051)


def test_read_idx_rejects_bad_expected_magic(tmp_path: Path) -> None:
    path = write_file(tmp_path / "labels.idx", idx_bytes(np.zeros(4, np.uint8)))
    with pytest.raises(ConfigError, match="expected_magic"):
        read_idx(path, expected_magic=2050)


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gzip"])
def test_read_idx_truncated_payload(tmp_path: Path, compress: bool) -> None:
    content = idx_bytes(np.zeros((3, 28, 28), np.uint8))[:-1]
    path = write_file(tmp_path / "images.idx", content, compress=compress)
    with pytest.raises(DataError) as info:
        read_idx(path)
    message = str(info.value)
    assert "is truncated" in message
    assert "expected 2352 payload bytes" in message
    assert "found 2351" in message
    assert str(path) in message


def test_read_idx_extra_bytes(tmp_path: Path) -> None:
    path = write_file(tmp_path / "labels.idx", idx_bytes(np.zeros(5, np.uint8)) + b"\x00\x00")
    with pytest.raises(DataError, match="extra bytes after the payload: expected 5 payload bytes .* found 7"):
        read_idx(path)


@pytest.mark.parametrize("length", [0, 3, 9])
def test_read_idx_truncated_header(tmp_path: Path, length: int) -> None:
    content = idx_bytes(np.zeros((2, 2, 2), np.uint8))[:length]
    path = write_file(tmp_path / "short.idx", content)
    with pytest.raises(DataError, match=f"truncated: expected a header of .* found {length}"):
        read_idx(path)


def test_read_idx_dims_disagree_with_payload(tmp_path: Path) -> None:
    # The header declares 28 x 28 images, but the payload contains 28 x 27 ones.
    content = idx_bytes(np.zeros((5, 28, 27), np.uint8), shape=(5, 28, 28))
    path = write_file(tmp_path / "images.idx", content)
    with pytest.raises(DataError, match=r"expected 3920 payload bytes for shape \(5, 28, 28\), found 3780"):
        read_idx(path)


def test_read_idx_zero_dimension(tmp_path: Path) -> None:
    path = write_file(tmp_path / "images.idx", idx_bytes(np.zeros((0, 28, 28), np.uint8)))
    with pytest.raises(DataError, match=r"empty dimension: shape \(0, 28, 28\)"):
        read_idx(path)


def _flip_middle(stream: bytearray) -> bytes:
    middle = len(stream) // 2
    stream[middle : middle + 8] = bytes(255 - b for b in stream[middle : middle + 8])
    return bytes(stream)


def _bad_block_type(stream: bytearray) -> bytes:
    # Byte 10 opens the deflate data (gzip.compress writes a 10-byte header); 0xFF sets the
    # reserved block type 3.
    stream[10] = 0xFF
    return bytes(stream)


def _cut_off(stream: bytearray) -> bytes:
    return bytes(stream[: len(stream) // 2])


@pytest.mark.parametrize(
    ("corrupt", "detail"),
    [
        (_flip_middle, "CRC check failed"),
        (_bad_block_type, "invalid block type"),
        (_cut_off, "Compressed file ended"),
    ],
    ids=["crc", "deflate", "cut-off"],
)
def test_read_idx_corrupt_gzip(
    tmp_path: Path, rng: np.random.Generator, corrupt: Callable[[bytearray], bytes], detail: str
) -> None:
    stream = bytearray(gzip.compress(idx_bytes(rng.integers(0, 256, size=(4, 28, 28), dtype=np.uint8))))
    path = write_file(tmp_path / "images.gz", corrupt(stream))
    with pytest.raises(DataError) as info:
        read_idx(path)
    message = str(info.value)
    assert "not a valid gzip stream" in message
    assert detail in message
    assert str(path) in message
    assert "re-download" in message


def test_read_idx_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found; check --data-dir"):
        read_idx(tmp_path / "absent.idx")


# ------------------------------------------------------------------------------ MNIST, synthetic files


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gzip"])
def test_load_mnist_synthetic(tmp_path: Path, rng: np.random.Generator, compress: bool) -> None:
    arrays = write_synthetic_mnist(tmp_path, rng, compress=compress)
    data = load_mnist(tmp_path)
    assert data.name == "mnist"
    assert data.x_train.shape == (12, 784)
    assert data.x_test.shape == (7, 784)
    assert data.x_train.dtype == np.float32
    assert data.y_train.dtype == np.int64
    expected = arrays["train-images-idx3-ubyte"].reshape(12, 784).astype(np.float32) / np.float32(255)
    np.testing.assert_array_equal(data.x_train, expected)
    np.testing.assert_array_equal(data.y_test, arrays["t10k-labels-idx1-ubyte"])
    assert data.class_names == tuple("0123456789")


def test_load_mnist_finds_mnist_subfolder(tmp_path: Path, rng: np.random.Generator) -> None:
    write_synthetic_mnist(tmp_path / "mnist", rng)
    assert load_mnist(tmp_path).n_train == 12


def test_load_mnist_missing_files(tmp_path: Path, rng: np.random.Generator) -> None:
    write_synthetic_mnist(tmp_path, rng)
    (tmp_path / "train-labels-idx1-ubyte.gz").unlink()
    (tmp_path / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DataError) as info:
        load_mnist(tmp_path)
    message = str(info.value)
    assert "train-labels-idx1-ubyte[.gz]" in message
    assert "t10k-images-idx3-ubyte[.gz]" in message
    assert "train-images" not in message
    assert "--data-dir" in message
    assert "--download" in message
    assert str(tmp_path) in message


def test_load_mnist_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_mnist(tmp_path / "nowhere")


def test_load_mnist_without_data_dir_uses_cache(tmp_path: Path, rng: np.random.Generator) -> None:
    write_synthetic_mnist(tmp_path / "default-cache" / "mnist", rng)
    assert load_mnist().n_test == 7


def test_load_mnist_count_mismatch(tmp_path: Path, rng: np.random.Generator) -> None:
    write_synthetic_mnist(tmp_path, rng)
    write_file(tmp_path / "t10k-labels-idx1-ubyte.gz", idx_bytes(np.zeros(6, np.uint8)), compress=True)
    with pytest.raises(DataError, match="7 images but 6 labels"):
        load_mnist(tmp_path)


def test_load_mnist_label_out_of_range(tmp_path: Path, rng: np.random.Generator) -> None:
    write_synthetic_mnist(tmp_path, rng)
    labels = np.array([1, 2, 10, 3, 11, 0, 0], np.uint8)
    write_file(tmp_path / "t10k-labels-idx1-ubyte.gz", idx_bytes(labels), compress=True)
    with pytest.raises(DataError, match=r"2 labels outside 0-9 \(max 11\)"):
        load_mnist(tmp_path)


def test_load_mnist_wrong_image_size(tmp_path: Path, rng: np.random.Generator) -> None:
    write_synthetic_mnist(tmp_path, rng)
    write_file(tmp_path / "t10k-images-idx3-ubyte.gz", idx_bytes(np.zeros((7, 28, 27), np.uint8)), compress=True)
    with pytest.raises(DataError, match="images of 28 x 27 pixels, expected 28 x 28"):
        load_mnist(tmp_path)


def test_load_mnist_swapped_files(tmp_path: Path, rng: np.random.Generator) -> None:
    arrays = write_synthetic_mnist(tmp_path, rng)
    write_file(tmp_path / "t10k-images-idx3-ubyte.gz", idx_bytes(arrays["t10k-labels-idx1-ubyte"]), compress=True)
    with pytest.raises(DataError, match="expected 2051 .* found 2049"):
        load_mnist(tmp_path)


# ------------------------------------------------------------------------------ MNIST, shared files


@pytest.fixture(scope="module")
def mnist(mnist_dir: Path) -> Dataset:
    return load_mnist(mnist_dir)


def test_mnist_shapes(mnist: Dataset) -> None:
    assert mnist.x_train.shape == (60000, 784)
    assert mnist.x_test.shape == (10000, 784)
    assert mnist.y_train.shape == (60000,)
    assert mnist.y_test.shape == (10000,)
    assert mnist.x_train.dtype == np.float32
    assert mnist.y_train.dtype == np.int64
    assert mnist.n_classes == 10


def test_mnist_published_content(mnist: Dataset) -> None:
    assert mnist.y_train[:5].tolist() == [5, 0, 4, 1, 9]
    assert np.bincount(mnist.y_test, minlength=10).tolist() == MNIST_TEST_LABEL_COUNTS
    assert np.bincount(mnist.y_train, minlength=10).tolist() == MNIST_TRAIN_LABEL_COUNTS
    assert abs(mnist.x_train.mean(dtype=np.float64) - 0.1307) < 1e-4
    assert mnist.x_train.min() == 0.0
    assert mnist.x_train.max() == 1.0


def test_mnist_shared_files_match_published_sha256(mnist_dir: Path) -> None:
    for name, expected in MNIST_SHA256.items():
        assert hashlib.sha256((mnist_dir / name).read_bytes()).hexdigest() == expected, name


def test_load_dataset_mnist_head(mnist_dir: Path, mnist: Dataset) -> None:
    data = load_dataset("mnist", mnist_dir, n_train=100, n_test=50)
    assert data.x_train.shape == (100, 784)
    assert data.x_test.shape == (50, 784)
    np.testing.assert_array_equal(data.x_train, mnist.x_train[:100])
    np.testing.assert_array_equal(data.y_test, mnist.y_test[:50])


# ------------------------------------------------------------------------------ download


class _MirrorHandler(http.server.SimpleHTTPRequestHandler):
    """Static file handler that records each request path and delays paths under /slow/ by 1 s."""

    def __init__(self, *args: object, requests: list[str], **kwargs: object) -> None:
        self._requests = requests
        super().__init__(*args, **kwargs)

    def do_GET(self) -> None:
        self._requests.append(self.path)
        if self.path.startswith("/slow/"):
            time.sleep(1.0)
        super().do_GET()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def mirror_server(tmp_path: Path) -> Iterator[tuple[str, Path, list[str]]]:
    """An HTTP server on 127.0.0.1: (base URL, folder it serves, list of request paths)."""
    root = tmp_path / "served"
    root.mkdir()
    requests: list[str] = []
    handler = functools.partial(_MirrorHandler, directory=str(root), requests=requests)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root, requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def serve(root: Path, mirror: str, name: str, content: bytes) -> None:
    (root / mirror).mkdir(exist_ok=True)
    (root / mirror / name).write_bytes(content)


def test_download_good_and_fallback(
    mirror_server: tuple[str, Path, list[str]], mnist_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, root, requests = mirror_server
    serve(root, "m1", SMALL_LABELS, (mnist_dir / SMALL_LABELS).read_bytes())
    serve(root, "m2", LARGE_LABELS, (mnist_dir / LARGE_LABELS).read_bytes())
    (root / "m2" / SMALL_LABELS).write_bytes(b"never requested")
    cache = tmp_path / "cache"

    result = download_mnist(cache, files=[SMALL_LABELS, LARGE_LABELS], mirrors=(f"{base}/m1/", f"{base}/m2"))

    assert result == cache
    assert (cache / SMALL_LABELS).read_bytes() == (mnist_dir / SMALL_LABELS).read_bytes()
    assert (cache / LARGE_LABELS).read_bytes() == (mnist_dir / LARGE_LABELS).read_bytes()
    # The second file gave 404 on the first mirror and came from the second.
    assert requests == [f"/m1/{SMALL_LABELS}", f"/m1/{LARGE_LABELS}", f"/m2/{LARGE_LABELS}"]
    assert sorted(p.name for p in cache.iterdir()) == sorted([SMALL_LABELS, LARGE_LABELS])
    assert SMALL_LABELS in capsys.readouterr().err  # the tqdm progress bar


def test_download_checksum_mismatch(mirror_server: tuple[str, Path, list[str]], mnist_dir: Path, tmp_path: Path) -> None:
    base, root, requests = mirror_server
    corrupted = bytearray((mnist_dir / SMALL_LABELS).read_bytes())
    corrupted[100] ^= 0xFF
    serve(root, "m1", SMALL_LABELS, bytes(corrupted))
    serve(root, "m2", SMALL_LABELS, (mnist_dir / SMALL_LABELS).read_bytes())
    cache = tmp_path / "cache"

    with pytest.raises(DataError) as info:
        download_mnist(cache, files=[SMALL_LABELS], mirrors=(f"{base}/m1/", f"{base}/m2/"), progress=False)

    message = str(info.value)
    assert SMALL_LABELS in message
    assert MNIST_SHA256[SMALL_LABELS] in message
    assert hashlib.sha256(bytes(corrupted)).hexdigest() in message
    assert f"{base}/m1/" in message
    assert "\n" not in message
    # The temporary file is gone and nothing else was tried.
    assert list(cache.iterdir()) == []
    assert requests == [f"/m1/{SMALL_LABELS}"]


def test_download_all_mirrors_fail(mirror_server: tuple[str, Path, list[str]], tmp_path: Path) -> None:
    base, root, _ = mirror_server
    cache = tmp_path / "cache"
    with pytest.raises(DataError) as info:
        download_mnist(cache, files=[SMALL_LABELS], mirrors=(f"{base}/m1/", f"{base}/m2/"), progress=False)
    message = str(info.value)
    assert f"{base}/m1/{SMALL_LABELS}" in message
    assert f"{base}/m2/{SMALL_LABELS}" in message
    assert "404" in message
    assert list(cache.iterdir()) == []


def test_download_timeout_tries_next_mirror(
    mirror_server: tuple[str, Path, list[str]], mnist_dir: Path, tmp_path: Path
) -> None:
    base, root, requests = mirror_server
    serve(root, "slow", SMALL_LABELS, (mnist_dir / SMALL_LABELS).read_bytes())
    serve(root, "m2", SMALL_LABELS, (mnist_dir / SMALL_LABELS).read_bytes())
    cache = tmp_path / "cache"

    started = time.monotonic()
    download_mnist(cache, files=[SMALL_LABELS], mirrors=(f"{base}/slow/", f"{base}/m2/"), timeout=0.2, progress=False)

    assert time.monotonic() - started < 0.9
    assert requests == [f"/slow/{SMALL_LABELS}", f"/m2/{SMALL_LABELS}"]
    assert hashlib.sha256((cache / SMALL_LABELS).read_bytes()).hexdigest() == MNIST_SHA256[SMALL_LABELS]


def test_download_keeps_existing_files(mirror_server: tuple[str, Path, list[str]], tmp_path: Path) -> None:
    base, _, requests = mirror_server
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / SMALL_LABELS).write_bytes(b"already here")
    download_mnist(cache, files=[SMALL_LABELS], mirrors=(f"{base}/m1/",), progress=False)
    assert requests == []
    assert (cache / SMALL_LABELS).read_bytes() == b"already here"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"files": ["mnist.zip"]}, "unknown MNIST file"),
        ({"mirrors": ()}, "non-empty list of base URLs"),
        ({"timeout": 0}, "positive number of seconds"),
    ],
)
def test_download_rejects_bad_arguments(tmp_path: Path, kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        download_mnist(tmp_path, **kwargs)


def test_load_mnist_downloads_missing_files(
    mirror_server: tuple[str, Path, list[str]], mnist_dir: Path, tmp_path: Path
) -> None:
    base, root, requests = mirror_server
    data_dir = tmp_path / "images-only"
    data_dir.mkdir()
    for name in ("train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz"):
        os.symlink(mnist_dir / name, data_dir / name)
    for name in (SMALL_LABELS, LARGE_LABELS):
        serve(root, "m1", name, (mnist_dir / name).read_bytes())
    cache = tmp_path / "cache"

    data = load_mnist(data_dir, download=True, cache_dir=cache, mirrors=(f"{base}/m1/",))

    assert sorted(requests) == sorted([f"/m1/{LARGE_LABELS}", f"/m1/{SMALL_LABELS}"])
    assert sorted(p.name for p in cache.iterdir()) == sorted([SMALL_LABELS, LARGE_LABELS])
    assert data.x_train.shape == (60000, 784)
    assert data.y_train[:5].tolist() == [5, 0, 4, 1, 9]


def test_load_mnist_download_failure_default_mirrors(tmp_path: Path) -> None:
    # The autouse fixture set the default mirrors to a closed loopback port.
    with pytest.raises(DataError, match="could not download MNIST file .* from any mirror"):
        load_mnist(download=True, cache_dir=tmp_path / "cache", timeout=2.0)


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PNN_CACHE_DIR", str(tmp_path / "root"))
    assert datasets.default_cache_dir() == tmp_path / "root" / "mnist"
    monkeypatch.delenv("PNN_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert datasets.default_cache_dir() == tmp_path / "home" / ".cache" / "pnn" / "mnist"


# ------------------------------------------------------------------------------ Dataset and load_dataset


def test_dataset_rejects_nan_features() -> None:
    x = np.zeros((4, 3), dtype=np.float32)
    x[1, 2] = np.nan
    x[3, 0] = np.nan
    x[3, 1] = np.inf
    with pytest.raises(DataError) as info:
        small_dataset(x_train=x)
    message = str(info.value)
    assert "x_train has 3 non-finite values" in message
    assert "in 2 rows" in message
    assert "first at row 1, feature 2" in message


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"x_train": np.zeros((4, 3), dtype=np.float64)}, "x_train must be a 2-D float32 array"),
        ({"x_test": np.zeros(3, dtype=np.float32)}, "x_test must be a 2-D float32 array"),
        ({"y_train": np.array([0, 1, 0, 1], dtype=np.int32)}, "y_train must be a 1-D int64 array"),
        ({"y_train": np.array([0, 1, 0], dtype=np.int64)}, "x_train has 4 rows but y_train has 3 labels"),
        ({"x_test": np.ones((2, 5), dtype=np.float32)}, "x_train has 3 features but x_test has 5"),
        ({"y_test": np.array([2, -1], dtype=np.int64)}, r"2 labels outside 0..1 \(found min -1, max 2\)"),
        ({"class_names": ("a",)}, "1 class names given for 2 classes"),
        ({"n_classes": 1, "class_names": ("a",)}, "n_classes must be at least 2"),
        ({"x_test": np.ones((0, 3), dtype=np.float32), "y_test": np.zeros(0, np.int64)}, "x_test is empty"),
    ],
)
def test_dataset_validation(changes: dict[str, object], match: str) -> None:
    with pytest.raises(DataError, match=match):
        small_dataset(**changes)


def test_dataset_is_frozen() -> None:
    data = small_dataset()
    with pytest.raises(dataclasses.FrozenInstanceError):
        data.name = "other"  # type: ignore[misc]
    assert (data.n_train, data.n_test, data.n_features) == (4, 2, 3)


def test_load_dataset_unknown_name() -> None:
    with pytest.raises(DataError, match="unknown dataset 'cifar'; choose one of vowels, mnist"):
        load_dataset("cifar")
    assert DATASET_NAMES == ("vowels", "mnist")


def test_load_dataset_vowels_head() -> None:
    full = load_vowels()
    data = load_dataset("vowels", n_train=10, n_test=5)
    assert data.x_train.shape == (10, 12)
    assert data.x_test.shape == (5, 12)
    np.testing.assert_array_equal(data.x_train, full.x_train[:10])
    np.testing.assert_array_equal(data.y_test, full.y_test[:5])
    assert data.x_train.base is None  # copied, not a view of the full arrays


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_train": 0}, "n_train must be between 1 and 210 for dataset 'vowels', got 0"),
        ({"n_train": 211}, "n_train must be between 1 and 210"),
        ({"n_test": 50}, "n_test must be between 1 and 49"),
        ({"n_train": 2.5}, "n_train must be a whole number, got 2.5"),
        ({"n_test": True}, "n_test must be a whole number, got True"),
    ],
)
def test_load_dataset_rejects_bad_counts(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_dataset("vowels", **kwargs)


def test_datasets_module_does_not_import_numba() -> None:
    code = "import sys, pnn.datasets; sys.exit('numba' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# ------------------------------------------------------------------------------ batching


def test_epoch_order_is_deterministic() -> None:
    order = epoch_order(100, seed=7, epoch=3)
    assert order.dtype == np.int64
    np.testing.assert_array_equal(order, epoch_order(100, seed=7, epoch=3))
    np.testing.assert_array_equal(order, np.random.default_rng([7, 3]).permutation(100))
    np.testing.assert_array_equal(np.sort(order), np.arange(100))
    assert not np.array_equal(order, epoch_order(100, seed=7, epoch=4))
    assert not np.array_equal(order, epoch_order(100, seed=8, epoch=3))


@pytest.mark.parametrize(
    ("args", "match"),
    [((0, 1, 0), "n must be a whole number >= 1"), ((5, -1, 0), "seed must"), ((5, 1, 1.5), "epoch must")],
)
def test_epoch_order_rejects_bad_arguments(args: tuple[object, ...], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        epoch_order(*args)


def test_iterate_batches_sizes_and_order() -> None:
    order = epoch_order(10, seed=1, epoch=0)
    batches = list(iterate_batches(10, 4, order))
    assert [len(b) for b in batches] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate(batches), order)
    assert [b.tolist() for b in iterate_batches(5, 2)] == [[0, 1], [2, 3], [4]]


def test_iterate_batches_resume_matches_uninterrupted() -> None:
    seed, n, batch_size = 11, 23, 5
    uninterrupted = [b for epoch in range(3) for b in iterate_batches(n, batch_size, epoch_order(n, seed, epoch))]
    # Resume in epoch 1 at batch 2: the rest of epoch 1, then epoch 2.
    resumed = list(iterate_batches(n, batch_size, epoch_order(n, seed, 1), start_batch=2))
    resumed += list(iterate_batches(n, batch_size, epoch_order(n, seed, 2)))
    assert len(resumed) == len(uninterrupted) - 5 - 2
    for expected, got in zip(uninterrupted[7:], resumed, strict=True):
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("batch_size", [0, -3, 2.5, True])
def test_iterate_batches_rejects_bad_batch_size(batch_size: object) -> None:
    # The error comes at the call, before iteration starts.
    with pytest.raises(ConfigError, match="batch_size must be a whole number >= 1"):
        iterate_batches(10, batch_size)


@pytest.mark.parametrize(
    ("order", "match"),
    [
        (np.arange(9), r"shape \(10,\)"),
        (np.arange(10, dtype=np.float64), "integer array"),
        (np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 8]), "permutation of 0..9"),
        (np.arange(1, 11), "permutation of 0..9"),
    ],
)
def test_iterate_batches_rejects_bad_order(order: np.ndarray, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        iterate_batches(10, 3, order)


def test_iterate_batches_rejects_bad_start() -> None:
    assert list(iterate_batches(10, 4, start_batch=3)) == []
    with pytest.raises(ConfigError, match="start_batch must be at most 3"):
        iterate_batches(10, 4, start_batch=4)


@given(n=st.integers(1, 300), batch_size=st.integers(1, 64), seed=st.integers(0, 2**32), epoch=st.integers(0, 50))
def test_iterate_batches_cover_each_example_once(n: int, batch_size: int, seed: int, epoch: int) -> None:
    order = epoch_order(n, seed, epoch)
    batches = list(iterate_batches(n, batch_size, order))
    assert all(len(b) == batch_size for b in batches[:-1])
    assert 1 <= len(batches[-1]) <= batch_size
    np.testing.assert_array_equal(np.concatenate(batches), order)
