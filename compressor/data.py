"""In-memory datasets for training and evaluation.

A dataset is named by a spec string:

* ``digits`` - scikit-learn's bundled 8x8 digits (no download needed);
* ``mnist[:DIR]``, ``fashion-mnist[:DIR]`` - the four IDX files, gzip-compressed or raw;
* ``cifar10[:DIR]`` - the *binary* CIFAR-10 batches (never the pickled Python version);
* ``npz:FILE`` - arrays ``x``, ``y`` and optionally ``x_test``, ``y_test``.

Everything is loaded into float32 tensors, normalized per channel, and split into
train / val / test. The validation split is drawn from the training set with ``seed``; the
test split never depends on ``seed`` (see :func:`load_dataset`).
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import logging
import math
import shutil
import tarfile
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .atomic import atomic_path
from .errors import CompressError

__all__ = ["Split", "Dataset", "parse_spec", "load_dataset", "describe"]

log = logging.getLogger(__name__)

VALID_FORMS = "digits, mnist[:DIR], fashion-mnist[:DIR], cifar10[:DIR], npz:FILE"
_NAMES = ("digits", "mnist", "fashion-mnist", "cifar10", "npz")
_ALIASES = {"fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist", "cifar-10": "cifar10", "cifar_10": "cifar10"}

_DOWNLOAD_TIMEOUT_S = 60.0
# The test holdout for digits/npz uses a fixed seed so that the test set (and its
# fingerprint) is the same whatever training seed the user picks.
_TEST_HOLDOUT_SEED = 0
_TEST_HOLDOUT_FRACTION = 0.2

_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_IDX_IMAGES_MAGIC = 0x00000803
_IDX_LABELS_MAGIC = 0x00000801

_CIFAR_DIR = "cifar-10-batches-bin"
_CIFAR_TRAIN = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
_CIFAR_TEST = "test_batch.bin"
_CIFAR_FILES = _CIFAR_TRAIN + (_CIFAR_TEST,)
_CIFAR_RECORD = 1 + 3 * 32 * 32
_CIFAR_ARCHIVE = "cifar-10-binary.tar.gz"

_NORMALIZATION = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}

_MIRRORS = {
    "mnist": ("https://ossci-datasets.s3.amazonaws.com/mnist/", "https://storage.googleapis.com/cvdf-datasets/mnist/"),
    "fashion-mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
    "cifar10": ("https://www.cs.toronto.edu/~kriz/",),
}

# Known md5 checksums, keyed by (dataset, file name as downloaded). Two kinds:
# * "content": md5 of the *decompressed* bytes. Preferred, because mirrors recompress the
#   .gz files (so their own md5 differs) while the content stays the same. Known with
#   certainty only for MNIST (verified against the uncompressed reference files).
# * "archive": md5 of the downloaded file exactly as the official host serves it. For
#   Fashion-MNIST (the zalandoresearch / torchvision table) and the CIFAR-10 binary tarball
#   (published on the CIFAR page) we are sure of these but not of the uncompressed md5s,
#   so we check the archive; the IDX / record structure is checked on every load anyway.
_CHECKSUMS: dict[tuple[str, str], tuple[str, str]] = {
    ("mnist", "train-images-idx3-ubyte.gz"): ("content", "6bbc9ace898e44ae57da46a324031adb"),
    ("mnist", "train-labels-idx1-ubyte.gz"): ("content", "a25bea736e30d166cdddb491f175f624"),
    ("mnist", "t10k-images-idx3-ubyte.gz"): ("content", "2646ac647ad5339dbf082846283269ea"),
    ("mnist", "t10k-labels-idx1-ubyte.gz"): ("content", "27ae3e4e09519cfbb04c329615203637"),
    ("fashion-mnist", "train-images-idx3-ubyte.gz"): ("archive", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
    ("fashion-mnist", "train-labels-idx1-ubyte.gz"): ("archive", "25c81989df183df01b3e8a0aad5dffbe"),
    ("fashion-mnist", "t10k-images-idx3-ubyte.gz"): ("archive", "bef4ecab320f06d8554ea6380940ec79"),
    ("fashion-mnist", "t10k-labels-idx1-ubyte.gz"): ("archive", "bb300cfdad3c16e7a12a480ee83cd310"),
    ("cifar10", _CIFAR_ARCHIVE): ("archive", "c32a1d4ab5d03f1284b67883e8d87530"),
}


# --------------------------------------------------------------------------- public types


@dataclass(frozen=True, eq=False)  # eq=False: field-wise == on tensors is ambiguous
class Split:
    """One split of a dataset: normalized float32 inputs ``x`` [N, ...] and int64 labels ``y`` [N]."""

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if self.x.dtype != torch.float32 or self.y.dtype != torch.int64:
            raise ValueError(f"Split needs float32 x and int64 y, got {self.x.dtype} and {self.y.dtype}")
        if self.y.dim() != 1 or self.x.shape[0] != self.y.shape[0]:
            raise ValueError(f"Split x {tuple(self.x.shape)} and y {tuple(self.y.shape)} do not match")

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def fingerprint(self) -> str:
        """Short sha256 (16 hex chars) of the x bytes followed by the y bytes."""
        digest = hashlib.sha256()
        digest.update(np.ascontiguousarray(self.x.detach().cpu().numpy()).data)
        digest.update(np.ascontiguousarray(self.y.detach().cpu().numpy()).data)
        return digest.hexdigest()[:16]


@dataclass(frozen=True, eq=False)
class Dataset:
    """A loaded dataset: three splits plus what a model needs to know about them."""

    name: str
    spec: str
    train: Split
    val: Split
    test: Split
    input_shape: tuple[int, ...]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


# --------------------------------------------------------------------------- public API


def parse_spec(spec: str) -> tuple[str, str | None]:
    """Split a dataset spec into (canonical name, path or None).

    ``"mnist:/some/dir"`` -> ``("mnist", "/some/dir")``, ``"digits"`` -> ``("digits", None)``,
    ``"mnist:"`` -> ``("mnist", None)`` (default directory).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise CompressError(f"empty dataset spec; use one of: {VALID_FORMS}")
    text = spec.strip()
    # Split on the first colon only: the path itself may contain colons.
    raw_name, sep, path = text.partition(":")
    name = raw_name.strip().lower()
    name = _ALIASES.get(name, name)
    path = path.strip()
    if name not in _NAMES:
        hint = f" (did you mean npz:{text}?)" if text.lower().endswith(".npz") and not sep else ""
        raise CompressError(f"unknown dataset {raw_name!r} in spec {spec!r}{hint}; use one of: {VALID_FORMS}")
    if name == "digits":
        if path:
            raise CompressError(f"dataset spec {spec!r}: digits is bundled with scikit-learn and takes no path; use just 'digits'")
        return name, None
    if name == "npz":
        if not path:
            raise CompressError(f"dataset spec {spec!r} names no file; use npz:FILE, e.g. npz:data/train.npz")
        return name, path
    return name, path or None


def load_dataset(
    spec: str,
    *,
    seed: int = 0,
    val_fraction: float = 0.1,
    download: bool = True,
    cache_dir: str | None = None,
) -> Dataset:
    """Load the dataset named by ``spec`` into memory, normalized and split.

    ``val_fraction`` (in (0, 0.9]) of the training set becomes the validation split,
    class-stratified and drawn with ``seed``. The test split is the official one for
    MNIST / Fashion-MNIST / CIFAR-10 and ``x_test``/``y_test`` for npz; otherwise a
    class-stratified 20 % held out with a fixed seed, so it does not change with ``seed``.
    Files missing from DIR are downloaded when ``download`` is true (default DIR:
    ``cache_dir/<name>``, or ``~/.cache/compress/<name>``).
    """
    name, path = parse_spec(spec)
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction <= 0.9:
        raise CompressError(f"val_fraction must be a number in (0, 0.9], got {val_fraction!r}; e.g. use 0.1")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise CompressError(f"seed must be a non-negative integer, got {seed!r}")

    if name == "digits":
        return _load_digits(spec, int(seed), float(val_fraction))
    if name == "npz":
        assert path is not None
        return _load_npz(spec, Path(path).expanduser(), int(seed), float(val_fraction))

    directory = Path(path).expanduser() if path else _default_dir(name, cache_dir)
    if directory.exists() and not directory.is_dir():
        raise CompressError(f"{name} directory {directory} is a file, not a directory; give the folder that holds the {name} files")
    if name == "cifar10":
        return _load_cifar10(spec, directory, download, int(seed), float(val_fraction))
    return _load_idx_dataset(name, spec, directory, download, int(seed), float(val_fraction))


def describe(ds: Dataset) -> str:
    """One-line summary: name, split sizes, input shape, classes."""
    label = ds.name if ds.spec == ds.name else f"{ds.name} ({ds.spec})"
    shape = "x".join(str(d) for d in ds.input_shape)
    return (
        f"{label}: {len(ds.train)} train / {len(ds.val)} val / {len(ds.test)} test, "
        f"input {shape}, {ds.num_classes} classes"
    )


# --------------------------------------------------------------------------- splitting and assembly


def _default_dir(name: str, cache_dir: str | None) -> Path:
    base = Path(cache_dir).expanduser() if cache_dir else Path("~/.cache/compress").expanduser()
    return base / name


def _stratified_split(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Return sorted index arrays (kept, held); ``held`` takes ``fraction`` of every class.

    The total held out is exactly round(fraction * N) (largest-remainder allocation over
    classes), except that every class with at least 2 samples gives at least one and keeps
    at least one.
    """
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    exact = counts * fraction
    quota = np.floor(exact).astype(np.int64)
    remainder = int(round(fraction * len(labels))) - int(quota.sum())
    if remainder > 0:
        order = np.argsort(-(exact - quota), kind="stable")
        quota[order[:remainder]] += 1
    quota = np.where(counts >= 2, np.clip(quota, 1, np.maximum(counts - 1, 1)), 0)
    by_class = np.argsort(inverse, kind="stable")
    held_parts = []
    start = 0
    for count, take in zip(counts.tolist(), quota.tolist()):
        members = by_class[start : start + count]
        start += count
        if take:
            held_parts.append(rng.permutation(members)[:take])
    held = np.sort(np.concatenate(held_parts)) if held_parts else np.zeros(0, dtype=np.int64)
    keep_mask = np.ones(len(labels), dtype=bool)
    keep_mask[held] = False
    return np.flatnonzero(keep_mask), held


def _channel_stats(x: np.ndarray, scale: float) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (axis 1) mean and std of ``x * scale``, computed in float64."""
    axes = (0,) + tuple(range(2, x.ndim))
    mean = x.mean(axis=axes, dtype=np.float64) * scale
    std = x.std(axis=axes, dtype=np.float64) * scale
    # A constant channel carries no information; dividing by a tiny std would turn any
    # deviation at test time into an enormous input, so such channels are only centered.
    std = np.where(std < 1e-8, 1.0, std)
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def _to_split(x: np.ndarray, y: np.ndarray, scale: float, mean: tuple[float, ...], std: tuple[float, ...]) -> Split:
    xt = torch.from_numpy(x.astype(np.float32, copy=True))  # copy: never alias (or mutate) the caller's arrays
    if scale != 1.0:
        xt.mul_(scale)
    view = (1, -1) + (1,) * (xt.dim() - 2)
    xt.sub_(torch.tensor(mean, dtype=torch.float32).view(view)).div_(torch.tensor(std, dtype=torch.float32).view(view))
    return Split(xt, torch.from_numpy(y.astype(np.int64, copy=True)))


def _assemble(
    name: str,
    spec: str,
    pool_x: np.ndarray,
    pool_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    *,
    num_classes: int,
    scale: float,
    norm: tuple[tuple[float, ...], tuple[float, ...]] | None,
    seed: int,
    val_fraction: float,
) -> Dataset:
    """Split the training pool into train/val, normalize everything, build the Dataset."""
    train_idx, val_idx = _stratified_split(pool_y, val_fraction, np.random.default_rng(seed))
    if len(val_idx) == 0:
        raise CompressError(
            f"{spec}: val_fraction={val_fraction} leaves no validation sample from {len(pool_y)} training samples; "
            "use more training data or a larger val_fraction"
        )
    if len(test_y) == 0:
        raise CompressError(f"{spec}: the test split is empty; provide test data")
    # Computed statistics use the whole training pool (train + val, never test) so that
    # the normalization, and with it the test fingerprint, does not depend on the seed.
    mean, std = norm if norm is not None else _channel_stats(pool_x, scale)
    return Dataset(
        name=name,
        spec=spec,
        train=_to_split(pool_x[train_idx], pool_y[train_idx], scale, mean, std),
        val=_to_split(pool_x[val_idx], pool_y[val_idx], scale, mean, std),
        test=_to_split(test_x, test_y, scale, mean, std),
        input_shape=tuple(int(d) for d in pool_x.shape[1:]),
        num_classes=num_classes,
        mean=mean,
        std=std,
    )


def _holdout_test(x: np.ndarray, y: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    pool_idx, test_idx = _stratified_split(y, _TEST_HOLDOUT_FRACTION, np.random.default_rng(_TEST_HOLDOUT_SEED))
    if len(test_idx) == 0:
        raise CompressError(f"{what}: too few samples to hold out a test split (every class has one sample); add data or provide x_test and y_test")
    return x[pool_idx], y[pool_idx], x[test_idx], y[test_idx]


# --------------------------------------------------------------------------- digits


def _load_digits(spec: str, seed: int, val_fraction: float) -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = np.asarray(bunch.images, dtype=np.float32)[:, None, :, :]  # [N, 1, 8, 8], values 0..16
    y = np.asarray(bunch.target, dtype=np.int64)
    pool_x, pool_y, test_x, test_y = _holdout_test(x, y, "digits")
    return _assemble(
        "digits", spec, pool_x, pool_y, test_x, test_y,
        num_classes=10, scale=1.0 / 16.0, norm=None, seed=seed, val_fraction=val_fraction,
    )


# --------------------------------------------------------------------------- IDX (MNIST, Fashion-MNIST)


def _read_maybe_gzip(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CompressError(f"cannot read {path}: {exc.strerror or exc}; check the file's permissions") from exc
    if path.suffix != ".gz":
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as exc:
        raise CompressError(f"{path} is truncated or not a valid gzip file ({exc}); delete it and download it again") from exc


def _parse_idx(path: Path, data: bytes, magic: int) -> np.ndarray:
    """Parse IDX bytes (already decompressed) into a uint8 array, checking magic and length."""
    kind = "image" if magic == _IDX_IMAGES_MAGIC else "label"
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise CompressError(f"{path} is truncated ({len(data)} bytes, shorter than the IDX header); delete it and download it again")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise CompressError(
            f"{path} is not an IDX {kind} file (magic number 0x{found:08x}, expected 0x{magic:08x}); "
            "check that the file names match their contents, or delete it and download it again"
        )
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if any(d == 0 for d in dims):
        raise CompressError(f"{path} declares an empty shape {dims}; delete it and download it again")
    expected = header + math.prod(dims)
    if len(data) != expected:
        state = "truncated" if len(data) < expected else "corrupt (trailing bytes)"
        raise CompressError(
            f"{path} is {state}: its header {dims} needs {expected} bytes but it has {len(data)}; delete it and download it again"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _find_idx(directory: Path, base: str) -> Path | None:
    # The raw file wins if both exist: it is what the user unpacked on purpose.
    for candidate in (directory / base, directory / f"{base}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _load_idx_dataset(name: str, spec: str, directory: Path, download: bool, seed: int, val_fraction: float) -> Dataset:
    found = {base: _find_idx(directory, base) for base in _IDX_FILES}
    missing = [base for base, p in found.items() if p is None]
    if missing:
        wanted = ", ".join(f"{base}.gz" for base in _IDX_FILES)
        listing = ", ".join(f"{base}[.gz]" for base in missing)
        if not download:
            raise CompressError(
                f"{name} files not found in {directory} (missing {listing}) and downloading is disabled; "
                f"put {wanted} into {directory} or allow downloading"
            )
        try:
            for base in missing:
                found[base] = _fetch(name, directory, f"{base}.gz")
        except _DownloadFailed as exc:
            raise CompressError(
                f"{name} files not found in {directory} and download failed ({exc}); put {wanted} into {directory}"
            ) from None

    arrays = {}
    for base, file in found.items():
        assert file is not None
        magic = _IDX_IMAGES_MAGIC if "images" in base else _IDX_LABELS_MAGIC
        arrays[base] = (file, _parse_idx(file, _read_maybe_gzip(file), magic))

    def pair(prefix: str) -> tuple[np.ndarray, np.ndarray]:
        (img_path, images), (lbl_path, labels) = arrays[f"{prefix}-images-idx3-ubyte"], arrays[f"{prefix}-labels-idx1-ubyte"]
        if len(images) != len(labels):
            raise CompressError(
                f"{lbl_path.name} has {len(labels)} labels but {img_path.name} has {len(images)} images in {directory}; "
                "the files do not belong together, download them again"
            )
        if labels.max() > 9:
            raise CompressError(f"{lbl_path} contains label {int(labels.max())}, but {name} has classes 0..9; the file is corrupt, download it again")
        return images[:, None, :, :], labels.astype(np.int64)

    train_x, train_y = pair("train")
    test_x, test_y = pair("t10k")
    if train_x.shape[1:] != test_x.shape[1:]:
        raise CompressError(
            f"{name} training images are {train_x.shape[2]}x{train_x.shape[3]} but test images are "
            f"{test_x.shape[2]}x{test_x.shape[3]} in {directory}; the files do not belong together, download them again"
        )
    return _assemble(
        name, spec, train_x, train_y, test_x, test_y,
        num_classes=10, scale=1.0 / 255.0, norm=_NORMALIZATION[name], seed=seed, val_fraction=val_fraction,
    )


# --------------------------------------------------------------------------- CIFAR-10 (binary version)


def _cifar_location(directory: Path) -> Path:
    nested = directory / _CIFAR_DIR
    if not (directory / _CIFAR_TRAIN[0]).is_file() and (nested / _CIFAR_TRAIN[0]).is_file():
        return nested
    if not any((directory / f).is_file() for f in _CIFAR_FILES) and nested.is_dir():
        return nested
    return directory


def _read_cifar_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CompressError(f"cannot read {path}: {exc.strerror or exc}; check the file's permissions") from exc
    if len(data) == 0 or len(data) % _CIFAR_RECORD:
        raise CompressError(
            f"{path} has {len(data)} bytes, not a whole number of {_CIFAR_RECORD}-byte CIFAR-10 records "
            "(1 label byte + 3072 pixel bytes); it is truncated or not from cifar-10-binary.tar.gz, download it again"
        )
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, _CIFAR_RECORD)
    labels = records[:, 0].astype(np.int64)
    if labels.max() > 9:
        raise CompressError(f"{path} contains label {int(labels.max())}, but CIFAR-10 has classes 0..9; it is corrupt or not CIFAR-10, download it again")
    return records[:, 1:].reshape(-1, 3, 32, 32), labels


def _load_cifar10(spec: str, directory: Path, download: bool, seed: int, val_fraction: float) -> Dataset:
    location = _cifar_location(directory)
    missing = [f for f in _CIFAR_FILES if not (location / f).is_file()]
    if missing:
        wanted = f"{', '.join(_CIFAR_FILES)} (or {_CIFAR_ARCHIVE} itself)"
        pickled = (directory / "cifar-10-batches-py").is_dir() or (directory / "data_batch_1").is_file()
        note = (
            "; found the pickled Python version, which is not read because unpickling can run arbitrary code"
            if pickled else ""
        )
        local_archive = directory / _CIFAR_ARCHIVE
        if local_archive.is_file():
            # An archive the user put there is extracted as is (it may be a repack, so no
            # md5); the record structure of every batch file is still checked below.
            try:
                location = _extract_cifar(local_archive, directory)
            except _DownloadFailed as exc:
                raise CompressError(f"{exc}; replace {local_archive} with the official {_CIFAR_ARCHIVE}") from None
        elif not download:
            raise CompressError(
                f"cifar10 files not found in {directory} (missing {', '.join(missing)}){note} and downloading is disabled; "
                f"put {wanted} into {directory} or allow downloading"
            )
        else:
            try:
                location = _download_cifar(directory)
            except _DownloadFailed as exc:
                raise CompressError(
                    f"cifar10 files not found in {directory}{note} and download failed ({exc}); put {wanted} into {directory}"
                ) from None
    train_parts = [_read_cifar_file(location / f) for f in _CIFAR_TRAIN]
    train_x = np.concatenate([p[0] for p in train_parts])
    train_y = np.concatenate([p[1] for p in train_parts])
    del train_parts
    test_x, test_y = _read_cifar_file(location / _CIFAR_TEST)
    return _assemble(
        "cifar10", spec, train_x, train_y, test_x, test_y,
        num_classes=10, scale=1.0 / 255.0, norm=_NORMALIZATION["cifar10"], seed=seed, val_fraction=val_fraction,
    )


# --------------------------------------------------------------------------- npz


def _load_npz(spec: str, path: Path, seed: int, val_fraction: float) -> Dataset:
    if not path.exists():
        raise CompressError(f"npz file {path} not found; check the path in {spec!r}")
    if path.is_dir():
        raise CompressError(f"{path} is a directory; npz:FILE needs an .npz file saved with np.savez(FILE, x=..., y=...)")
    try:
        # allow_pickle=False always: an .npz may come from anywhere, and unpickling runs code.
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise CompressError(f"{path} is a single .npy array, not an .npz archive; save it with np.savez(FILE, x=..., y=...)")
        with loaded as archive:
            keys = set(archive.files)
            for key in ("x", "y"):
                if key not in keys:
                    found = ", ".join(sorted(keys)) or "none"
                    raise CompressError(f"{path} has no array {key!r} (found: {found}); save it with np.savez(FILE, x=..., y=...)")
            if ("x_test" in keys) != ("y_test" in keys):
                raise CompressError(f"{path} has only one of x_test / y_test; save both or neither")
            arrays = {key: _npz_array(archive, key, path) for key in ("x", "y", "x_test", "y_test") if key in keys}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        # np.load raises ValueError/OSError for files that are not numpy data at all.
        # Note: isinstance(ValueError) also covers pickled payloads, which allow_pickle=False refuses.
        raise CompressError(f"cannot read {path} as an .npz archive ({_one_line(exc)}); save it with np.savez(FILE, x=..., y=...)") from exc

    x = _npz_inputs(arrays["x"], "x", path)
    y = _npz_labels(arrays["y"], "y", path)
    if len(x) != len(y):
        raise CompressError(f"{path}: x has {len(x)} samples but y has {len(y)} labels; they must match")
    if "x_test" in arrays:
        x_test = _npz_inputs(arrays["x_test"], "x_test", path)
        y_test = _npz_labels(arrays["y_test"], "y_test", path)
        if len(x_test) != len(y_test):
            raise CompressError(f"{path}: x_test has {len(x_test)} samples but y_test has {len(y_test)} labels; they must match")
        if x_test.shape[1:] != x.shape[1:]:
            raise CompressError(f"{path}: x_test samples have shape {x_test.shape[1:]} but x samples have {x.shape[1:]}; they must match")
    else:
        x_test = y_test = None

    num_classes = int(y.max()) + 1
    present = np.unique(y)
    if len(present) != num_classes:
        absent = int(np.flatnonzero(present != np.arange(len(present)))[0]) if np.any(present != np.arange(len(present))) else len(present)
        raise CompressError(
            f"{path}: labels must be 0..K-1 with every class present in y, but class {absent} has no sample "
            f"(y has {len(present)} distinct labels up to {num_classes - 1}); renumber the labels"
        )
    if y_test is not None and len(y_test) and int(y_test.max()) >= num_classes:
        raise CompressError(
            f"{path}: y_test contains label {int(y_test.max())}, but y has only classes 0..{num_classes - 1}; "
            "every test class needs training samples"
        )
    if num_classes < 2:
        raise CompressError(f"{path}: y has only one class; a classifier needs at least 2")
    if x_test is None:
        x, y, x_test, y_test = _holdout_test(x, y, str(path))
        assert y_test is not None
    return _assemble(
        "npz", spec, x, y, x_test, y_test,
        num_classes=num_classes, scale=1.0, norm=None, seed=seed, val_fraction=val_fraction,
    )


def _npz_array(archive: "np.lib.npyio.NpzFile", key: str, path: Path) -> np.ndarray:
    try:
        return archive[key]
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise CompressError(
                f"{path}: array {key!r} holds Python objects (dtype=object), which are never unpickled; "
                "save plain numeric arrays"
            ) from exc
        raise


def _npz_inputs(x: np.ndarray, key: str, path: Path) -> np.ndarray:
    if x.dtype.kind not in "biuf":
        raise CompressError(f"{path}: {key} has dtype {x.dtype}; it must be a numeric (integer or float) array")
    if x.ndim not in (2, 3, 4):
        raise CompressError(f"{path}: {key} has shape {x.shape}; use [N, D] features, [N, H, W] or [N, C, H, W] images")
    if len(x) == 0 and key == "x":
        raise CompressError(f"{path}: {key} is empty; it needs at least one sample")
    if x.ndim == 4 and x.shape[3] in (1, 3) and x.shape[1] > 4:
        raise CompressError(
            f"{path}: {key} has shape {x.shape}, which looks channels-last [N, H, W, C]; "
            "save it as [N, C, H, W], e.g. x.transpose(0, 3, 1, 2)"
        )
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise CompressError(f"{path}: {key} contains NaN or infinite values; clean the data first")
    return x[:, None] if x.ndim == 3 else x


def _npz_labels(y: np.ndarray, key: str, path: Path) -> np.ndarray:
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise CompressError(
            f"{path}: {key} has shape {y.shape}; it must be 1-D class indices 0..K-1 (for one-hot labels save y.argmax(1))"
        )
    if y.dtype.kind == "f":
        # Whole-number floats are accepted: label columns often come out of pandas as float.
        if not np.isfinite(y).all() or np.any(y != np.round(y)):
            raise CompressError(f"{path}: {key} contains non-integer labels; labels must be integers 0..K-1")
    elif y.dtype.kind not in "iu":
        raise CompressError(f"{path}: {key} has dtype {y.dtype}; labels must be integers 0..K-1")
    if len(y) and y.min() < 0:
        raise CompressError(f"{path}: {key} contains label {int(y.min())}; labels must be integers 0..K-1")
    return y.astype(np.int64)


# --------------------------------------------------------------------------- downloads


class _DownloadFailed(Exception):
    """All mirrors failed; the message says why (one line)."""


class _ChecksumMismatch(Exception):
    pass


def _download(url: str, dest: Path, *, timeout: float = _DOWNLOAD_TIMEOUT_S) -> None:
    """Fetch ``url`` into ``dest`` (overwriting it). Raises OSError / HTTPException on failure.

    Tests replace this function; nothing else in this module touches the network.
    """
    request = urllib.request.Request(url, headers={"User-Agent": "compress-toolchain"})
    with urllib.request.urlopen(request, timeout=timeout) as response, open(dest, "wb") as out:
        expected = response.headers.get("Content-Length")
        shutil.copyfileobj(response, out, 1 << 20)
        written = out.tell()
    if expected is not None and expected.isdigit() and int(expected) != written:
        raise OSError(f"connection closed after {written} of {expected} bytes")


def _md5_file(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _verify(name: str, filename: str, path: Path) -> None:
    entry = _CHECKSUMS.get((name, filename))
    if entry is None:
        return
    kind, want = entry
    if kind == "content":
        try:
            got = hashlib.md5(gzip.decompress(path.read_bytes())).hexdigest()
        except (OSError, EOFError, zlib.error) as exc:
            raise _ChecksumMismatch(f"{filename} is not a valid gzip file ({exc})") from exc
    else:
        got = _md5_file(path)
    if got != want:
        raise _ChecksumMismatch(f"checksum mismatch for {filename} (md5 {got}, expected {want})")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return _one_line(exc.reason)
    return _one_line(exc)


def _one_line(exc: object) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())[:300]


def _fetch_verified(name: str, directory: Path, filename: str, final: Path, check: Callable[[Path], None]) -> Path:
    """Download ``filename`` from the first mirror that works into ``final`` atomically."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _DownloadFailed(f"cannot create {directory}: {exc.strerror or exc}") from None
    reasons = []
    for mirror in _MIRRORS[name]:
        url = mirror + filename
        log.info("downloading %s", url)
        try:
            with atomic_path(final) as tmp:
                _download(url, tmp)
                check(tmp)
            return final
        except (OSError, http.client.HTTPException, ValueError, _ChecksumMismatch) as exc:
            reasons.append(f"{url}: {_reason(exc)}")
    raise _DownloadFailed("; ".join(reasons))


def _fetch(name: str, directory: Path, filename: str) -> Path:
    return _fetch_verified(name, directory, filename, directory / filename, lambda p: _verify(name, filename, p))


def _download_cifar(directory: Path) -> Path:
    """Download the binary CIFAR-10 archive (md5-checked) and extract the six batch files."""
    archive = _fetch_verified("cifar10", directory, _CIFAR_ARCHIVE, directory / _CIFAR_ARCHIVE,
                              lambda p: _verify("cifar10", _CIFAR_ARCHIVE, p))
    target = _extract_cifar(archive, directory)
    archive.unlink(missing_ok=True)
    return target


def _extract_cifar(archive: Path, directory: Path) -> Path:
    """Extract just the six batch files of ``archive`` into ``directory/cifar-10-batches-bin``."""
    target = directory / _CIFAR_DIR
    try:
        target.mkdir(exist_ok=True)
        with tarfile.open(archive, "r:gz") as tar:
            for filename in _CIFAR_FILES:
                # Only the expected member names are read, and we choose the output path
                # ourselves, so a hostile archive cannot write anywhere else (no extractall).
                wanted = f"{_CIFAR_DIR}/{filename}"
                try:
                    member = tar.getmember(wanted)
                except KeyError:
                    raise _DownloadFailed(f"{archive.name} lacks {wanted}") from None
                if not member.isfile():
                    raise _DownloadFailed(f"{archive.name} member {member.name} is not a regular file")
                source = tar.extractfile(member)
                assert source is not None
                with source, atomic_path(target / filename) as tmp, open(tmp, "wb") as out:
                    shutil.copyfileobj(source, out, 1 << 20)
    except (OSError, EOFError, zlib.error, tarfile.TarError) as exc:
        raise _DownloadFailed(f"cannot extract {archive}: {_one_line(exc)}") from None
    return target
