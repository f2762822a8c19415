"""Tests for compressor.data: spec parsing, every loader, splits, normalization, bad input.

All data is synthesized in tmp_path; nothing here touches the network (an autouse fixture
makes any download attempt fail the test). Only the ``mnist``-marked test reads real files.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from compressor import data
from compressor.data import Dataset, describe, load_dataset, parse_spec
from compressor.errors import CompressError

IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
CIFAR_NAMES = tuple(f"data_batch_{i}.bin" for i in range(1, 6)) + ("test_batch.bin",)
REAL_DOWNLOAD = data._download  # kept before the autouse fixture replaces it


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(url: str, dest: Path, **kwargs: object) -> None:
        raise AssertionError(f"test tried to download {url}")

    monkeypatch.setattr(data, "_download", refuse)


# --------------------------------------------------------------------------- file builders


def idx_bytes(array: np.ndarray) -> bytes:
    array = np.asarray(array, dtype=np.uint8)
    magic = 0x00000800 | array.ndim
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.tobytes()


def make_images(n: int, rows: int, cols: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, rows, cols), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)  # every class present
    return images, labels


def write_file(path: Path, payload: bytes, gz: bool) -> Path:
    if gz:
        path = path.with_name(path.name + ".gz")
        payload = gzip.compress(payload)
    path.write_bytes(payload)
    return path


def write_idx(directory: Path, *, gz: bool | tuple[bool, bool, bool, bool], n_train: int = 40, n_test: int = 20,
              rows: int = 4, cols: int = 5) -> dict[str, np.ndarray]:
    directory.mkdir(parents=True, exist_ok=True)
    train_x, train_y = make_images(n_train, rows, cols, 1)
    test_x, test_y = make_images(n_test, rows, cols, 2)
    arrays = dict(zip(IDX_NAMES, (train_x, train_y, test_x, test_y)))
    flags = gz if isinstance(gz, tuple) else (gz,) * 4
    for (name, array), flag in zip(arrays.items(), flags):
        write_file(directory / name, idx_bytes(array), flag)
    return arrays


def cifar_records(n: int, seed: int) -> tuple[bytes, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 10).astype(np.uint8)
    images = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    payload = np.concatenate([labels[:, None], images.reshape(n, -1)], axis=1).tobytes()
    return payload, images, labels


def write_cifar(directory: Path, n: int = 10) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    directory.mkdir(parents=True, exist_ok=True)
    out = {}
    for i, name in enumerate(CIFAR_NAMES):
        payload, images, labels = cifar_records(n, seed=10 + i)
        (directory / name).write_bytes(payload)
        out[name] = (images, labels)
    return out


def raw_pixels(ds: Dataset, x: torch.Tensor) -> torch.Tensor:
    """Undo the dataset's normalization (per channel on axis 1)."""
    view = (1, -1) + (1,) * (x.dim() - 2)
    return x * torch.tensor(ds.std).view(view) + torch.tensor(ds.mean).view(view)


def ids(ds: Dataset, split: str) -> np.ndarray:
    """Sample ids stored in feature 0 of the npz built by ``id_npz``."""
    x = raw_pixels(ds, getattr(ds, split).x)
    return np.rint(x[:, 0].double().numpy()).astype(np.int64)


def id_npz(path: Path, n: int = 200, classes: int = 4, **extra: np.ndarray) -> Path:
    rng = np.random.default_rng(0)
    x = np.stack([np.arange(n, dtype=np.float64), rng.normal(size=n)], axis=1)
    y = np.arange(n) % classes
    np.savez(path, x=x, y=y, **extra)
    return path


# --------------------------------------------------------------------------- parse_spec


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("digits", ("digits", None)),
        ("mnist", ("mnist", None)),
        ("mnist:", ("mnist", None)),
        ("mnist:/some/dir", ("mnist", "/some/dir")),
        ("MNIST:/some/dir", ("mnist", "/some/dir")),
        ("fashion-mnist:rel/dir", ("fashion-mnist", "rel/dir")),
        ("fashion_mnist", ("fashion-mnist", None)),
        ("cifar10:/data/c", ("cifar10", "/data/c")),
        ("cifar-10", ("cifar10", None)),
        ("npz:/a/b.npz", ("npz", "/a/b.npz")),
        ("npz:/odd:path/b.npz", ("npz", "/odd:path/b.npz")),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_parse_spec_valid(spec: str, expected: tuple[str, str | None]) -> None:
    assert parse_spec(spec) == expected


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("imagenet", "unknown dataset 'imagenet'"),
        ("foo:/x", "unknown dataset 'foo'"),
        ("data.npz", "did you mean npz:data.npz"),
        ("", "empty dataset spec"),
        ("   ", "empty dataset spec"),
        ("npz", "names no file"),
        ("npz:", "names no file"),
        ("digits:/some/dir", "takes no path"),
    ],
    ids=["unknown-name", "unknown-with-path", "bare-npz-file", "empty", "blank", "npz-without-file", "npz-empty-file", "digits-with-path"],
)
def test_parse_spec_invalid(spec: str, fragment: str) -> None:
    with pytest.raises(CompressError, match=fragment) as info:
        parse_spec(spec)
    if "unknown" in fragment:
        assert "mnist[:DIR]" in str(info.value) and "npz:FILE" in str(info.value)
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- IDX loaders


@pytest.mark.parametrize("name, mean, std", [("mnist", 0.1307, 0.3081), ("fashion-mnist", 0.2860, 0.3530)], ids=["mnist", "fashion"])
@pytest.mark.parametrize("gz", [True, False, (True, False, False, True)], ids=["gz", "raw", "mixed"])
def test_idx_load(tmp_path: Path, name: str, mean: float, std: float, gz: bool | tuple[bool, ...]) -> None:
    arrays = write_idx(tmp_path, gz=gz)
    ds = load_dataset(f"{name}:{tmp_path}", download=False)
    assert ds.name == name and ds.spec == f"{name}:{tmp_path}"
    assert ds.input_shape == (1, 4, 5) and ds.num_classes == 10
    assert ds.mean == (mean,) and ds.std == (std,)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (30, 10, 20)  # >= 1 val sample per class
    assert ds.train.x.dtype == torch.float32 and ds.train.y.dtype == torch.int64
    # The test split keeps file order; normalization is (x/255 - mean) / std.
    expected = torch.from_numpy(arrays["t10k-images-idx3-ubyte"]).float()[:, None] / 255
    torch.testing.assert_close(raw_pixels(ds, ds.test.x), expected, atol=1e-5, rtol=0)
    assert ds.test.y.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    train_labels = sorted(ds.train.y.tolist() + ds.val.y.tolist())
    assert train_labels == sorted(arrays["train-labels-idx1-ubyte"].tolist())


def test_idx_default_dir_from_cache_dir(tmp_path: Path) -> None:
    write_idx(tmp_path / "mnist", gz=True)
    ds = load_dataset("mnist", cache_dir=str(tmp_path), download=False)
    assert len(ds.test) == 20


def test_idx_default_dir_in_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    write_idx(tmp_path / ".cache" / "compress" / "fashion-mnist", gz=False)
    assert len(load_dataset("fashion-mnist:", download=False).test) == 20


def test_idx_raw_preferred_over_gz(tmp_path: Path) -> None:
    write_idx(tmp_path, gz=False)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"garbage")  # would fail if read
    assert len(load_dataset(f"mnist:{tmp_path}", download=False).test) == 20


# --------------------------------------------------------------------------- IDX errors


def corrupt_truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-7])


def corrupt_trailing(path: Path) -> None:
    path.write_bytes(path.read_bytes() + b"\0")


def corrupt_magic(path: Path) -> None:
    blob = bytearray(path.read_bytes())
    blob[2:4] = b"\x0d\x03"  # 0x0d03: float images, not ubyte
    path.write_bytes(bytes(blob))


def corrupt_short_header(path: Path) -> None:
    path.write_bytes(b"\x00\x00\x08")


@pytest.mark.parametrize(
    "target, corrupt, fragment",
    [
        ("train-images-idx3-ubyte", corrupt_truncated, r"train-images-idx3-ubyte is truncated"),
        ("t10k-labels-idx1-ubyte", corrupt_truncated, r"t10k-labels-idx1-ubyte is truncated"),
        ("train-labels-idx1-ubyte", corrupt_trailing, r"trailing bytes"),
        ("t10k-images-idx3-ubyte", corrupt_magic, r"not an IDX image file \(magic number 0x00000d03, expected 0x00000803\)"),
        ("train-labels-idx1-ubyte", corrupt_short_header, r"shorter than the IDX header"),
    ],
    ids=["truncated-images", "truncated-labels", "trailing-bytes", "wrong-magic", "short-header"],
)
def test_idx_corrupt_raw(tmp_path: Path, target: str, corrupt, fragment: str) -> None:
    write_idx(tmp_path, gz=False)
    corrupt(tmp_path / target)
    with pytest.raises(CompressError, match=fragment) as info:
        load_dataset(f"mnist:{tmp_path}", download=False)
    assert str(tmp_path / target) in str(info.value)
    assert "download it again" in str(info.value)


def test_idx_truncated_gzip(tmp_path: Path) -> None:
    write_idx(tmp_path, gz=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(CompressError, match="train-images-idx3-ubyte.gz is truncated or not a valid gzip file"):
        load_dataset(f"mnist:{tmp_path}", download=False)


def test_idx_gz_with_truncated_content(tmp_path: Path) -> None:
    write_idx(tmp_path, gz=True)
    _, labels = make_images(40, 4, 5, 1)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels)[:-3]))
    with pytest.raises(CompressError, match="train-labels-idx1-ubyte.gz is truncated"):
        load_dataset(f"mnist:{tmp_path}", download=False)


def test_idx_label_count_mismatch(tmp_path: Path) -> None:
    write_idx(tmp_path, gz=False)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.arange(19) % 10))
    with pytest.raises(CompressError, match="t10k-labels-idx1-ubyte has 19 labels but t10k-images-idx3-ubyte has 20 images"):
        load_dataset(f"fashion-mnist:{tmp_path}", download=False)


def test_idx_label_out_of_range(tmp_path: Path) -> None:
    write_idx(tmp_path, gz=False)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.full(40, 12)))
    with pytest.raises(CompressError, match="contains label 12, but mnist has classes 0..9"):
        load_dataset(f"mnist:{tmp_path}", download=False)


def test_idx_image_size_mismatch(tmp_path: Path) -> None:
    write_idx(tmp_path, gz=False)
    images, _ = make_images(20, 6, 6, 3)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(images))
    with pytest.raises(CompressError, match="training images are 4x5 but test images are 6x6"):
        load_dataset(f"mnist:{tmp_path}", download=False)


def test_dir_is_a_file(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(CompressError, match="is a file, not a directory"):
        load_dataset(f"mnist:{path}", download=False)


# --------------------------------------------------------------------------- missing files and downloads


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_idx_missing_download_disabled(tmp_path: Path, name: str) -> None:
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(make_images(4, 2, 2, 0)[0])))
    with pytest.raises(CompressError) as info:
        load_dataset(f"{name}:{tmp_path}", download=False)
    message = str(info.value)
    assert f"{name} files not found in {tmp_path}" in message
    assert "downloading is disabled" in message
    assert "t10k-labels-idx1-ubyte[.gz]" in message and "train-images-idx3-ubyte[.gz]," not in message  # lists only the missing
    assert "put train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz" in message


@pytest.mark.parametrize("name, mirrors", [("mnist", 2), ("fashion-mnist", 1)], ids=["mnist", "fashion"])
def test_idx_download_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, mirrors: int) -> None:
    tried = []

    def offline(url: str, dest: Path, **kwargs: object) -> None:
        tried.append(url)
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(data, "_download", offline)
    target = tmp_path / "new" / "dir"
    with pytest.raises(CompressError) as info:
        load_dataset(f"{name}:{target}")
    message = str(info.value)
    assert message.startswith(f"{name} files not found in {target} and download failed (")
    assert "Name or service not known" in message
    assert f"put train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz into {target}" in message
    assert "\n" not in message
    assert len(tried) == mirrors  # every mirror tried once, then give up
    assert list(target.iterdir()) == []  # no temporary leftovers


def fake_mnist_server(arrays: dict[str, np.ndarray], *, broken_prefix: str | None = None):
    """A stand-in for data._download serving gzip IDX files built from ``arrays``."""
    blobs = {f"{k}.gz": gzip.compress(idx_bytes(v)) for k, v in arrays.items()}

    def serve(url: str, dest: Path, **kwargs: object) -> None:
        if broken_prefix and url.startswith(broken_prefix):
            raise urllib.error.HTTPError(url, 503, "Service Unavailable", {}, None)  # type: ignore[arg-type]
        dest.write_bytes(blobs[url.rsplit("/", 1)[1]])

    return serve


def fake_idx_arrays() -> dict[str, np.ndarray]:
    train_x, train_y = make_images(30, 3, 3, 5)
    test_x, test_y = make_images(10, 3, 3, 6)
    return dict(zip(IDX_NAMES, (train_x, train_y, test_x, test_y)))


def test_mnist_download_succeeds_via_fallback_mirror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    arrays = fake_idx_arrays()
    for key, array in arrays.items():
        monkeypatch.setitem(data._CHECKSUMS, ("mnist", f"{key}.gz"), ("content", hashlib.md5(idx_bytes(array)).hexdigest()))
    monkeypatch.setattr(data, "_download", fake_mnist_server(arrays, broken_prefix=data._MIRRORS["mnist"][0]))
    ds = load_dataset(f"mnist:{tmp_path}")
    assert len(ds.test) == 10 and ds.input_shape == (1, 3, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{n}.gz" for n in IDX_NAMES)
    # Second load finds the files and does not download again.
    monkeypatch.setattr(data, "_download", fake_mnist_server({}, broken_prefix="http"))
    assert len(load_dataset(f"mnist:{tmp_path}").test) == 10


def test_mnist_download_checksum_mismatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The real checksum table is in force, so fake content must be rejected.
    monkeypatch.setattr(data, "_download", fake_mnist_server(fake_idx_arrays()))
    with pytest.raises(CompressError, match=r"download failed \(.*checksum mismatch for train-images-idx3-ubyte.gz"):
        load_dataset(f"mnist:{tmp_path}")
    assert list(tmp_path.iterdir()) == []


def test_fashion_download_checks_archive_md5(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    arrays = fake_idx_arrays()
    monkeypatch.setattr(data, "_download", fake_mnist_server(arrays))
    with pytest.raises(CompressError, match="checksum mismatch"):
        load_dataset(f"fashion-mnist:{tmp_path}")
    # With the archive md5s of our fake files the same download passes.
    blobs = {f"{key}.gz": gzip.compress(idx_bytes(array), mtime=0) for key, array in arrays.items()}
    for filename, blob in blobs.items():
        monkeypatch.setitem(data._CHECKSUMS, ("fashion-mnist", filename), ("archive", hashlib.md5(blob).hexdigest()))

    def serve(url: str, dest: Path, **kwargs: object) -> None:
        dest.write_bytes(blobs[url.rsplit("/", 1)[1]])

    monkeypatch.setattr(data, "_download", serve)
    assert len(load_dataset(f"fashion-mnist:{tmp_path}").test) == 10


def test_real_download_function_copies_a_local_url(tmp_path: Path) -> None:
    source = tmp_path / "source.bin"
    source.write_bytes(b"\x01\x02" * 1000)
    dest = tmp_path / "dest.bin"
    REAL_DOWNLOAD(source.as_uri(), dest, timeout=5)  # file:// only: tests never use the network
    assert dest.read_bytes() == source.read_bytes()
    with pytest.raises(urllib.error.URLError):
        REAL_DOWNLOAD((tmp_path / "absent").as_uri(), dest, timeout=5)


def test_known_checksums_are_wellformed() -> None:
    for (name, filename), (kind, md5) in data._CHECKSUMS.items():
        assert name in data._MIRRORS and kind in {"content", "archive"}
        assert len(md5) == 32 and int(md5, 16) >= 0
    assert data._CHECKSUMS[("mnist", "train-images-idx3-ubyte.gz")] == ("content", "6bbc9ace898e44ae57da46a324031adb")


# --------------------------------------------------------------------------- CIFAR-10


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "cifar-10-batches-bin"])
def test_cifar_load(tmp_path: Path, nested: bool) -> None:
    written = write_cifar(tmp_path / "cifar-10-batches-bin" if nested else tmp_path, n=10)
    ds = load_dataset(f"cifar10:{tmp_path}", download=False)
    assert ds.input_shape == (3, 32, 32) and ds.num_classes == 10
    assert (len(ds.train), len(ds.val), len(ds.test)) == (40, 10, 10)
    assert ds.mean == (0.4914, 0.4822, 0.4465) and ds.std == (0.2470, 0.2435, 0.2616)
    images, labels = written["test_batch.bin"]
    torch.testing.assert_close(raw_pixels(ds, ds.test.x), torch.from_numpy(images).float() / 255, atol=1e-5, rtol=0)
    assert ds.test.y.tolist() == labels.tolist()


@pytest.mark.parametrize("extra, fragment", [(-5, "not a whole number of 3073-byte"), (1, "not a whole number of 3073-byte"), (None, "has 0 bytes")],
                         ids=["truncated", "extra-byte", "empty"])
def test_cifar_wrong_length(tmp_path: Path, extra: int | None, fragment: str) -> None:
    write_cifar(tmp_path)
    path = tmp_path / "data_batch_3.bin"
    blob = path.read_bytes()
    path.write_bytes(b"" if extra is None else (blob[:extra] if extra < 0 else blob + b"\0" * extra))
    with pytest.raises(CompressError, match=fragment) as info:
        load_dataset(f"cifar10:{tmp_path}", download=False)
    assert str(path) in str(info.value)


def test_cifar_bad_label(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    path = tmp_path / "test_batch.bin"
    blob = bytearray(path.read_bytes())
    blob[0] = 42
    path.write_bytes(bytes(blob))
    with pytest.raises(CompressError, match="contains label 42, but CIFAR-10 has classes 0..9"):
        load_dataset(f"cifar10:{tmp_path}", download=False)


def test_cifar_missing_download_disabled(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    (tmp_path / "data_batch_4.bin").unlink()
    with pytest.raises(CompressError, match=rf"cifar10 files not found in {tmp_path} \(missing data_batch_4.bin\)") as info:
        load_dataset(f"cifar10:{tmp_path}", download=False)
    assert "cifar-10-binary.tar.gz" in str(info.value)


def test_cifar_python_version_is_refused(tmp_path: Path) -> None:
    (tmp_path / "cifar-10-batches-py").mkdir()
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"\x80\x04pickle")
    with pytest.raises(CompressError, match="pickled Python version"):
        load_dataset(f"cifar10:{tmp_path}", download=False)


def test_cifar_download_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(url: str, dest: Path, **kwargs: object) -> None:
        raise TimeoutError("timed out")

    monkeypatch.setattr(data, "_download", offline)
    with pytest.raises(CompressError, match=rf"cifar10 files not found in {tmp_path} and download failed \(.*timed out\); put data_batch_1.bin"):
        load_dataset(f"cifar10:{tmp_path}")
    assert list(tmp_path.iterdir()) == []


def cifar_archive(members: tuple[str, ...] = CIFAR_NAMES) -> bytes:
    """A tiny cifar-10-binary.tar.gz, plus a metadata file and two path-escaping members."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        def add(name: str, payload: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))

        for i, name in enumerate(members):
            add(f"cifar-10-batches-bin/{name}", cifar_records(10, seed=i)[0])
        add("cifar-10-batches-bin/batches.meta.txt", b"airplane\n")
        add("../escaped.txt", b"evil")
        add("/tmp/absolute-escape.txt", b"evil")
    return buffer.getvalue()


def test_cifar_download_extracts_only_expected_members(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = cifar_archive()
    monkeypatch.setitem(data._CHECKSUMS, ("cifar10", "cifar-10-binary.tar.gz"), ("archive", hashlib.md5(archive).hexdigest()))
    urls = []

    def serve(url: str, dest: Path, **kwargs: object) -> None:
        urls.append(url)
        dest.write_bytes(archive)

    monkeypatch.setattr(data, "_download", serve)
    root = tmp_path / "cache"
    ds = load_dataset(f"cifar10:{root}")
    assert urls == ["https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"]
    assert len(ds.test) == 10
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-batches-bin"]  # archive removed
    assert sorted(p.name for p in (root / "cifar-10-batches-bin").iterdir()) == sorted(CIFAR_NAMES)
    assert not (tmp_path / "escaped.txt").exists()


def test_cifar_local_archive_is_extracted(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    root.mkdir()
    (root / "cifar-10-binary.tar.gz").write_bytes(cifar_archive())
    ds = load_dataset(f"cifar10:{root}", download=False)
    assert len(ds.train) + len(ds.val) == 50 and len(ds.test) == 10
    assert not (tmp_path / "escaped.txt").exists()


def test_cifar_local_archive_incomplete(tmp_path: Path) -> None:
    (tmp_path / "cifar-10-binary.tar.gz").write_bytes(cifar_archive(CIFAR_NAMES[:3]))
    with pytest.raises(CompressError, match="lacks cifar-10-batches-bin/data_batch_4.bin; replace .* with the official"):
        load_dataset(f"cifar10:{tmp_path}", download=False)


def test_cifar_download_checksum_mismatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "_download", lambda url, dest, **kw: dest.write_bytes(b"not the archive"))
    with pytest.raises(CompressError, match="checksum mismatch for cifar-10-binary.tar.gz"):
        load_dataset(f"cifar10:{tmp_path}")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- npz


@pytest.mark.parametrize(
    "shape, input_shape",
    [((60, 6, 7), (1, 6, 7)), ((60, 3, 5, 5), (3, 5, 5)), ((60, 11), (11,))],
    ids=["NHW", "NCHW", "ND"],
)
@pytest.mark.parametrize("with_test", [False, True], ids=["holdout", "x_test"])
def test_npz_shapes(tmp_path: Path, shape: tuple[int, ...], input_shape: tuple[int, ...], with_test: bool) -> None:
    rng = np.random.default_rng(0)
    arrays = {"x": rng.normal(3.0, 2.0, size=shape).astype(np.float32), "y": np.arange(60) % 3}
    if with_test:
        arrays["x_test"] = rng.normal(size=(9,) + shape[1:])
        arrays["y_test"] = np.arange(9) % 3
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    ds = load_dataset(f"npz:{path}")
    assert ds.name == "npz" and ds.input_shape == input_shape and ds.num_classes == 3
    assert ds.train.x.shape[1:] == input_shape and ds.test.x.shape[1:] == input_shape
    assert len(ds.mean) == len(ds.std) == input_shape[0]
    if with_test:
        assert (len(ds.train) + len(ds.val), len(ds.test)) == (60, 9)
        assert ds.test.y.tolist() == arrays["y_test"].tolist()
    else:
        assert (len(ds.train) + len(ds.val), len(ds.test)) == (48, 12)
        assert torch.bincount(ds.test.y).tolist() == [4, 4, 4]  # stratified


def test_npz_uint8_images_and_column_labels(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.random.default_rng(0).integers(0, 256, (50, 4, 4), dtype=np.uint8), y=(np.arange(50) % 2).reshape(-1, 1).astype(np.float64))
    ds = load_dataset(f"npz:{path}")
    assert ds.num_classes == 2 and ds.train.y.dtype == torch.int64 and ds.input_shape == (1, 4, 4)


def test_npz_normalization(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 3, 4, 4)) * np.array([1.0, 50.0, 0.01])[None, :, None, None] + np.array([5.0, -100.0, 0.5])[None, :, None, None]
    x[:, 2] = 0.5  # a constant channel
    path = tmp_path / "d.npz"
    np.savez(path, x=x, y=np.arange(300) % 5)
    ds = load_dataset(f"npz:{path}", seed=3)
    pool = torch.cat([ds.train.x, ds.val.x]).double()
    mean, std = pool.mean(dim=(0, 2, 3)), pool.std(dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(mean, torch.zeros(3, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(std[:2], torch.ones(2, dtype=torch.float64), atol=1e-4, rtol=0)
    assert ds.std[2] == 1.0 and std[2] == 0  # constant channel: centered, not blown up
    train_mean = ds.train.x.double().mean(dim=(0, 2, 3))
    assert train_mean.abs().max() < 0.1 and (ds.train.x.double().std(dim=(0, 2, 3)) - 1)[:2].abs().max() < 0.1


def _mark_unpickled() -> object:
    UNPICKLED.append(True)
    return object()


UNPICKLED: list[bool] = []


class Booby:
    def __reduce__(self):
        return (_mark_unpickled, ())


def npz_case(tmp_path: Path, **arrays: object) -> str:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    return f"npz:{path}"


X20 = np.zeros((20, 3), dtype=np.float32)
Y20 = np.arange(20) % 2


@pytest.mark.parametrize(
    "arrays, fragment",
    [
        ({"x": X20}, r"has no array 'y' \(found: x\)"),
        ({"y": Y20}, r"has no array 'x'"),
        ({"x": X20, "y": Y20, "x_test": X20}, "only one of x_test / y_test"),
        ({"x": X20, "y": np.arange(20) % 2 + 1}, "class 0 has no sample"),
        ({"x": X20, "y": np.where(np.arange(20) % 2, 3, 0)}, "class 1 has no sample"),
        ({"x": X20, "y": np.arange(20) % 2 - 1}, "contains label -1"),
        ({"x": X20, "y": (np.arange(20) % 2) + 0.5}, "non-integer labels"),
        ({"x": X20, "y": np.array(["a", "b"] * 10)}, "labels must be integers"),
        ({"x": X20, "y": np.zeros(20, dtype=np.int64)}, "only one class"),
        ({"x": X20, "y": np.arange(19) % 2}, "x has 20 samples but y has 19 labels"),
        ({"x": X20, "y": np.eye(2)[Y20]}, r"y.argmax\(1\)"),
        ({"x": X20, "y": Y20, "x_test": X20, "y_test": np.arange(20) % 3}, "y_test contains label 2"),
        ({"x": X20, "y": Y20, "x_test": np.zeros((5, 4)), "y_test": np.zeros(5, int)}, "x_test samples have shape"),
        ({"x": np.zeros(20), "y": Y20}, r"has shape \(20,\)"),
        ({"x": np.zeros((20, 32, 32, 3)), "y": Y20}, "channels-last"),
        ({"x": np.full((20, 3), np.nan), "y": Y20}, "NaN or infinite"),
        ({"x": np.array(["a"] * 20), "y": Y20}, "must be a numeric"),
        ({"x": np.zeros((0, 3)), "y": np.zeros(0, int)}, "is empty"),
        ({"x": np.zeros((2, 3)), "y": np.arange(2)}, "too few samples to hold out a test split"),
    ],
    ids=[
        "missing-y", "missing-x", "x_test-without-y_test", "labels-start-at-1", "labels-with-gap", "negative-label",
        "fractional-labels", "string-labels", "single-class", "length-mismatch", "one-hot-labels", "unseen-test-label",
        "test-shape-mismatch", "1d-x", "channels-last", "nan", "string-x", "empty", "too-small-for-holdout",
    ],
)
def test_npz_bad(tmp_path: Path, arrays: dict[str, np.ndarray], fragment: str) -> None:
    spec = npz_case(tmp_path, **arrays)
    with pytest.raises(CompressError, match=fragment) as info:
        load_dataset(spec)
    assert str(tmp_path / "bad.npz") in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("key", ["x", "y"])
def test_npz_object_arrays_are_not_unpickled(tmp_path: Path, key: str) -> None:
    UNPICKLED.clear()
    arrays = {"x": X20, "y": Y20}
    arrays[key] = np.array([Booby()] * 20, dtype=object)
    spec = npz_case(tmp_path, **arrays)
    with pytest.raises(CompressError, match=rf"array '{key}' holds Python objects \(dtype=object\), which are never unpickled"):
        load_dataset(spec)
    assert UNPICKLED == []


@pytest.mark.parametrize(
    "content, fragment",
    [(b"hello, not a zip", "cannot read .* as an .npz archive"), (None, "single .npy array")],
    ids=["garbage", "npy-not-npz"],
)
def test_npz_not_an_archive(tmp_path: Path, content: bytes | None, fragment: str) -> None:
    path = tmp_path / "d.npz"
    if content is None:
        with open(path, "wb") as handle:
            np.save(handle, np.zeros(3))
    else:
        path.write_bytes(content)
    with pytest.raises(CompressError, match=fragment):
        load_dataset(f"npz:{path}")


def test_npz_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CompressError, match=rf"npz file {tmp_path}/nope.npz not found"):
        load_dataset(f"npz:{tmp_path}/nope.npz")
    with pytest.raises(CompressError, match="is a directory"):
        load_dataset(f"npz:{tmp_path}")


# --------------------------------------------------------------------------- digits


def test_digits() -> None:
    ds = load_dataset("digits")
    assert ds.name == "digits" and ds.input_shape == (1, 8, 8) and ds.num_classes == 10
    assert len(ds.train) + len(ds.val) + len(ds.test) == 1797
    assert len(ds.test) == round(0.2 * 1797)
    assert set(ds.test.y.tolist()) == set(range(10)) and set(ds.val.y.tolist()) == set(range(10))
    raw = raw_pixels(ds, torch.cat([ds.train.x, ds.val.x, ds.test.x]))
    assert raw.min() > -1e-5 and raw.max() < 1 + 1e-5  # 0..16 scaled to [0, 1]
    # The test split (and normalization) does not move with the seed; the val split does.
    other = load_dataset("digits", seed=1)
    assert other.test.fingerprint() == ds.test.fingerprint() and other.mean == ds.mean
    assert other.val.fingerprint() != ds.val.fingerprint()


# --------------------------------------------------------------------------- splits


def test_split_disjoint_and_covering(tmp_path: Path) -> None:
    ds = load_dataset(f"npz:{id_npz(tmp_path / 'd.npz')}", val_fraction=0.25)
    train, val, test = ids(ds, "train"), ids(ds, "val"), ids(ds, "test")
    assert len(set(train)) == len(train) and len(set(val)) == len(val)
    assert not set(train) & set(val) and not (set(train) | set(val)) & set(test)
    assert sorted(np.concatenate([train, val, test]).tolist()) == list(range(200))
    assert len(val) == 40 and len(test) == 40
    assert torch.bincount(ds.val.y).tolist() == [10, 10, 10, 10]
    # Labels still belong to their samples (y = id % 4).
    assert (ds.train.y.numpy() == train % 4).all() and (ds.val.y.numpy() == val % 4).all()


def test_split_determinism(tmp_path: Path) -> None:
    spec = f"npz:{id_npz(tmp_path / 'd.npz')}"
    a, b, c = load_dataset(spec, seed=7), load_dataset(spec, seed=7), load_dataset(spec, seed=8)
    assert ids(a, "val").tolist() == ids(b, "val").tolist()
    assert a.train.fingerprint() == b.train.fingerprint() and a.val.fingerprint() == b.val.fingerprint()
    assert ids(a, "val").tolist() != ids(c, "val").tolist()
    assert a.test.fingerprint() == c.test.fingerprint()  # the test set is seed-independent


@pytest.mark.parametrize("fraction, n_val", [(0.1, 10), (0.05, 10), (0.5, 50), (0.9, 90)], ids=["10pc", "min-one-per-class", "half", "max"])
def test_split_sizes(tmp_path: Path, fraction: float, n_val: int) -> None:
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.normal(size=(100, 2)), y=np.arange(100) % 10, x_test=rng.normal(size=(5, 2)), y_test=np.arange(5))
    ds = load_dataset(f"npz:{tmp_path / 'd.npz'}", val_fraction=fraction)
    assert (len(ds.train), len(ds.val)) == (100 - n_val, n_val)
    assert set(ds.train.y.tolist()) == set(range(10))  # every class keeps training samples


def test_split_exact_total_with_uneven_classes() -> None:
    labels = np.repeat(np.arange(3), [5923, 6742, 5958])
    kept, held = data._stratified_split(labels, 0.1, np.random.default_rng(0))
    assert len(held) == round(0.1 * len(labels)) and len(kept) + len(held) == len(labels)
    assert np.bincount(labels[held]).tolist() == [592, 674, 596]


@pytest.mark.parametrize("fraction", [0, 0.0, -0.1, 0.95, 1, True, "0.1", float("nan")], ids=repr)
def test_bad_val_fraction(fraction: object) -> None:
    with pytest.raises(CompressError, match=r"val_fraction must be a number in \(0, 0.9\]"):
        load_dataset("digits", val_fraction=fraction)  # type: ignore[arg-type]


@pytest.mark.parametrize("seed", [-1, 1.5, "0"], ids=repr)
def test_bad_seed(seed: object) -> None:
    with pytest.raises(CompressError, match="seed must be a non-negative integer"):
        load_dataset("digits", seed=seed)  # type: ignore[arg-type]


def test_val_split_needs_samples(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", x=np.zeros((3, 2)), y=np.arange(3), x_test=np.zeros((3, 2)), y_test=np.arange(3))
    with pytest.raises(CompressError, match="leaves no validation sample from 3 training samples"):
        load_dataset(f"npz:{tmp_path / 'd.npz'}")


# --------------------------------------------------------------------------- Split, describe


def test_fingerprint() -> None:
    x, y = torch.arange(12, dtype=torch.float32).view(3, 4), torch.tensor([0, 1, 0])
    fp = data.Split(x, y).fingerprint()
    assert len(fp) == 16 and int(fp, 16) >= 0
    expected = hashlib.sha256(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest()[:16]
    assert fp == expected == data.Split(x.clone(), y.clone()).fingerprint()
    assert data.Split(x, torch.tensor([0, 1, 1])).fingerprint() != fp
    assert len(data.Split(x, y)) == 3


def test_split_rejects_wrong_dtypes() -> None:
    with pytest.raises(ValueError):
        data.Split(torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError):
        data.Split(torch.zeros(2, 3), torch.zeros(3, dtype=torch.int64))


def test_describe(tmp_path: Path) -> None:
    write_idx(tmp_path, gz=True)
    line = describe(load_dataset(f"mnist:{tmp_path}", download=False))
    assert line == f"mnist (mnist:{tmp_path}): 30 train / 10 val / 20 test, input 1x4x5, 10 classes"
    assert describe(load_dataset("digits")).startswith("digits: ")


# --------------------------------------------------------------------------- real MNIST


MNIST_DIR = Path(os.environ.get("COMPRESS_MNIST_DIR", Path(__file__).resolve().parents[2] / "shared" / "datasets" / "mnist"))


@pytest.mark.mnist
@pytest.mark.skipif(not MNIST_DIR.is_dir(), reason=f"real MNIST not available in {MNIST_DIR}")
def test_real_mnist() -> None:
    ds = load_dataset(f"mnist:{MNIST_DIR}", download=False)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (54000, 6000, 10000)
    assert ds.input_shape == (1, 28, 28)
    assert torch.bincount(ds.test.y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    train_counts = torch.bincount(torch.cat([ds.train.y, ds.val.y])).tolist()
    assert train_counts == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    pool = torch.cat([ds.train.x, ds.val.x]).double()
    assert abs((pool * 0.3081 + 0.1307).mean().item() - 0.1307) < 0.0005
