"""Encoders, decoders and byte accounting for the sparse formats (see the package docstring)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import numpy as np

FORMATS: tuple[str, ...] = ("dense", "bitmask", "csr", "rel", "relb", "coo")

#: Largest number of elements a tensor may have (encode and decode).
MAX_ELEMENTS: int = 2**31
#: Largest rank accepted (numpy 1.x supports 32 dimensions).
MAX_RANK: int = 32
#: Default cap on the size of a decoded array, so a hostile shape cannot make decode allocate gigabytes.
DEFAULT_MAX_NBYTES: int = 1 << 30
#: Largest gap a single `rel` entry can store; a filler entry (gap 255, value 0) covers 256 positions.
REL_MAX_GAP: int = 255
#: Widths (bits per gap) that `relb` chooses from.
RELB_WIDTHS: tuple[int, ...] = tuple(range(1, 17))

_VALUE_KINDS = "biufc"  # bool, signed, unsigned, float, complex
_BUFFERS: dict[str, tuple[str, ...]] = {
    "dense": ("values",),
    "bitmask": ("mask", "values"),
    "csr": ("row_ptr", "col_idx", "values"),
    "rel": ("gaps", "values"),
    "relb": ("width", "packed_gaps", "values"),
    "coo": ("indices", "values"),
}
_UINTS = tuple(np.dtype(t) for t in (np.uint8, np.uint16, np.uint32, np.uint64))
_U8 = np.dtype(np.uint8)


def index_dtype(max_value: int) -> np.dtype:
    """Narrowest unsigned integer dtype that holds ``max_value`` (uint8 when ``max_value < 0``)."""
    for dt in _UINTS:
        if max_value <= np.iinfo(dt).max:
            return dt
    raise ValueError(f"index value {max_value} does not fit in uint64")


@dataclass(frozen=True, eq=False)
class Encoded:
    """One encoded tensor: the original shape and dtype plus the named raw buffers an exporter stores.

    Buffers are 1-D, C-contiguous, read-only arrays when produced by :func:`encode`.
    Equality compares format, shape, dtype and the buffers bit for bit (the dataclass default
    would compare numpy arrays element-wise and fail), so instances are unhashable.
    """

    format: str
    shape: tuple[int, ...]
    dtype: np.dtype
    buffers: dict[str, np.ndarray]

    @property
    def nbytes(self) -> int:
        """Exact storage cost: the sum of the buffers' ``nbytes``. Shape, dtype and names are not counted."""
        return int(sum(int(b.nbytes) for b in self.buffers.values()))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Encoded):
            return NotImplemented
        return (
            self.format == other.format
            and tuple(self.shape) == tuple(other.shape)
            and np.dtype(self.dtype) == np.dtype(other.dtype)
            and self.buffers.keys() == other.buffers.keys()
            and all(
                a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
                for a, b in ((self.buffers[k], other.buffers[k]) for k in self.buffers)
            )
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        bufs = ", ".join(
            f"{k}={getattr(v, 'dtype', type(v).__name__)}[{getattr(v, 'size', '?')}]"
            for k, v in self.buffers.items()
        )
        return (
            f"Encoded(format={self.format!r}, shape={self.shape}, dtype={self.dtype}, "
            f"buffers={{{bufs}}}, nbytes={self.nbytes})"
        )


# ---------------------------------------------------------------------------------------------
# Encoding


class _Stats:
    """The facts about one input array that every format's encoder and size formula needs."""

    def __init__(self, array: np.ndarray) -> None:
        a = np.asarray(array)
        if a.dtype.kind not in _VALUE_KINDS:
            raise ValueError(f"unsupported dtype {a.dtype}: only bool, integer, float and complex arrays")
        if a.ndim > MAX_RANK:
            raise ValueError(f"rank {a.ndim} is over the limit of {MAX_RANK}")
        if a.size > MAX_ELEMENTS:
            raise ValueError(f"array has {a.size} elements, over the limit of {MAX_ELEMENTS}")
        self.shape: tuple[int, ...] = tuple(int(d) for d in a.shape)
        self.dtype = a.dtype
        self.itemsize = a.dtype.itemsize
        self.flat = a.reshape(-1)  # C order; copies only when the input is not C-contiguous
        self.n = int(self.flat.size)
        # flatnonzero uses truthiness, i.e. x != 0: -0.0 counts as zero, NaN as non-zero.
        self.nz = np.flatnonzero(self.flat)
        self.nnz = int(self.nz.size)
        self._zero_runs: np.ndarray | None = None
        self._relb_width: int | None = None

    @property
    def zero_runs(self) -> np.ndarray:
        """Number of zeros just before each non-zero (the Deep-Compression gap before fillers)."""
        if self._zero_runs is None:
            prev = np.empty_like(self.nz)
            prev[:1] = -1
            prev[1:] = self.nz[:-1]
            self._zero_runs = self.nz - prev - 1
        return self._zero_runs

    def rel_fillers(self, width: int = 8) -> int:
        """Filler entries of relative indexing with ``width``-bit gaps."""
        return int(np.sum(self.zero_runs >> width))

    def relb_width(self) -> int:
        """The gap width (bits) that makes ``relb`` smallest; the narrowest on ties."""
        if self._relb_width is None:
            self._relb_width = min(RELB_WIDTHS, key=lambda w: (_relb_nbytes(self, w), w))
        return self._relb_width


def _relb_nbytes(st: _Stats, width: int) -> int:
    entries = st.nnz + st.rel_fillers(width)
    return 1 + (entries * width + 7) // 8 + entries * st.itemsize


def _csr_dims(shape: tuple[int, ...], n: int) -> tuple[int, int]:
    """Rows and columns of the 2-D view csr uses: [shape[0], prod(rest)], rank 0/1 as [1, N]."""
    if len(shape) >= 2:
        return shape[0], math.prod(shape[1:])
    return 1, n


def _nbytes(st: _Stats, fmt: str) -> int:
    v, n, nnz = st.itemsize, st.n, st.nnz
    if fmt == "dense":
        return n * v
    if fmt == "bitmask":
        return (n + 7) // 8 + nnz * v
    if fmt == "csr":
        rows, cols = _csr_dims(st.shape, n)
        return (rows + 1) * index_dtype(nnz).itemsize + nnz * (index_dtype(cols - 1).itemsize + v)
    if fmt == "rel":
        return (nnz + st.rel_fillers()) * (1 + v)
    if fmt == "relb":
        return _relb_nbytes(st, st.relb_width())
    if fmt == "coo":
        return nnz * (index_dtype(n - 1).itemsize + v)
    raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")


def _encode(st: _Stats, fmt: str) -> Encoded:
    flat, nz = st.flat, st.nz
    if fmt == "dense":
        bufs = {"values": flat.copy()}
    elif fmt == "bitmask":
        # np.packbits default bit order is "big": element 0 is the most significant bit of byte 0.
        bufs = {"mask": np.packbits(flat != 0), "values": flat[nz]}
    elif fmt == "csr":
        rows, cols = _csr_dims(st.shape, st.n)
        row_ptr = np.zeros(rows + 1, index_dtype(st.nnz))
        if st.nnz:
            row_of = nz // cols
            row_ptr[1:] = np.cumsum(np.bincount(row_of, minlength=rows))
            col_idx = (nz - row_of * cols).astype(index_dtype(cols - 1))
        else:
            col_idx = np.zeros(0, index_dtype(cols - 1))
        bufs = {"row_ptr": row_ptr, "col_idx": col_idx, "values": flat[nz]}
    elif fmt == "rel":
        runs = st.zero_runs
        fillers = runs // (REL_MAX_GAP + 1)
        length = st.nnz + int(fillers.sum())
        gaps = np.full(length, REL_MAX_GAP, _U8)
        values = np.zeros(length, st.dtype)
        real = np.cumsum(fillers + 1) - 1  # slot of each real entry after its fillers
        gaps[real] = runs % (REL_MAX_GAP + 1)
        values[real] = flat[nz]
        bufs = {"gaps": gaps, "values": values}
    elif fmt == "relb":
        width = st.relb_width()
        runs = st.zero_runs
        fillers = runs >> width
        length = st.nnz + int(fillers.sum())
        gaps = np.full(length, (1 << width) - 1, np.int64)
        values = np.zeros(length, st.dtype)
        real = np.cumsum(fillers + 1) - 1
        gaps[real] = runs & ((1 << width) - 1)
        values[real] = flat[nz]
        # Each gap as 16 little-endian bits (a uint8 per bit, not an int64), its low `width` kept.
        bits = np.unpackbits(gaps.astype("<u2").view(_U8).reshape(length, 2), axis=1, bitorder="little")[:, :width]
        bufs = {"width": np.array([width], _U8), "packed_gaps": np.packbits(bits.reshape(-1), bitorder="little"),
                "values": values}
    elif fmt == "coo":
        bufs = {"indices": nz.astype(index_dtype(st.n - 1)), "values": flat[nz]}
    else:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    for b in bufs.values():
        b.flags.writeable = False
    return Encoded(fmt, st.shape, st.dtype, bufs)


def encode(array: np.ndarray, format: str) -> Encoded:
    """Encode ``array`` (any rank; bool/int/float/complex) in ``format``; entries equal to 0 are zeros."""
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; expected one of {', '.join(FORMATS)}")
    return _encode(_Stats(array), format)


def encoded_nbytes(array: np.ndarray, format: str) -> int:
    """Exact ``encode(array, format).nbytes`` from the closed-form size, without building the buffers."""
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; expected one of {', '.join(FORMATS)}")
    return _nbytes(_Stats(array), format)


def _check_candidates(candidates: Iterable[str]) -> set[str]:
    if isinstance(candidates, str):
        raise ValueError(f"candidates must be an iterable of format names, not the string {candidates!r}")
    cands = set(candidates)
    unknown = sorted(map(repr, cands - set(FORMATS)))
    if unknown:
        raise ValueError(f"unknown candidate format(s) {', '.join(unknown)}; expected some of {', '.join(FORMATS)}")
    if not cands:
        raise ValueError("candidates is empty")
    return cands


def all_nbytes(array: np.ndarray, candidates: Iterable[str] = FORMATS) -> dict[str, int]:
    """Exact encoded size of ``array`` in each candidate format, in FORMATS order."""
    cands = _check_candidates(candidates)
    st = _Stats(array)
    return {f: _nbytes(st, f) for f in FORMATS if f in cands}


def best(array: np.ndarray, candidates: Iterable[str] = FORMATS) -> Encoded:
    """Encoding with the fewest bytes among ``candidates``; ties go to the format earlier in FORMATS."""
    cands = _check_candidates(candidates)
    st = _Stats(array)
    sizes = {f: _nbytes(st, f) for f in FORMATS if f in cands}
    return _encode(st, min(sizes, key=sizes.__getitem__))  # min keeps the first of equal sizes


def size_bound(array: np.ndarray) -> float:
    """Information-theoretic size in bytes: N*H(s)/8 for the i.i.d. zero mask plus itemsize*nnz for the values.

    H is the binary entropy of the non-zero fraction. A mask with structure (zero rows, runs)
    can be stored below this bound; for i.i.d. masks it is a floor.
    """
    st = _Stats(array)
    n, nnz = st.n, st.nnz
    if n == 0:
        return 0.0
    p = nnz / n
    h = 0.0 if p in (0.0, 1.0) else -(p * math.log2(p) + (1 - p) * math.log2(1 - p))
    return n * h / 8 + st.itemsize * nnz


def coo_int64_nbytes(array: np.ndarray) -> int:
    """Bytes of the ONNX-standard COO layout (int64 linear indices + values), for comparisons."""
    st = _Stats(array)
    return st.nnz * (8 + st.itemsize)


# ---------------------------------------------------------------------------------------------
# Decoding: every check raises a one-line ValueError before anything proportional to the
# declared shape is allocated.


def _fail(fmt: str, msg: str) -> ValueError:
    return ValueError(f"{fmt}: {msg}")


def _check_dtype(dtype: object) -> np.dtype:
    if not isinstance(dtype, (np.dtype, str, type)):
        raise ValueError(f"invalid dtype {dtype!r:.80}: expected a numpy dtype")
    try:
        dt = np.dtype(dtype)  # type: ignore[call-overload]
    except Exception:  # np.dtype raises TypeError/ValueError/... on junk; all mean "not a dtype"
        raise ValueError(f"invalid dtype {dtype!r:.80}") from None
    if dt.kind not in _VALUE_KINDS or dt.hasobject or dt.subdtype is not None:
        raise ValueError(f"unsupported dtype {dt}: only bool, integer, float and complex arrays")
    return dt


def _check_shape(shape: object) -> tuple[tuple[int, ...], int]:
    if not isinstance(shape, tuple):
        raise ValueError(f"shape must be a tuple of ints, got {type(shape).__name__}")
    if len(shape) > MAX_RANK:
        raise ValueError(f"shape has rank {len(shape)}, over the limit of {MAX_RANK}")
    dims = []
    for d in shape:
        if isinstance(d, (bool, np.bool_)) or not isinstance(d, (int, np.integer)):
            raise ValueError(f"shape {shape!r:.120} has a non-integer dimension")
        d = int(d)
        if d < 0:
            raise ValueError(f"shape {shape!r:.120} has a negative dimension")
        if d > MAX_ELEMENTS:
            raise ValueError(f"shape {shape!r:.120} has a dimension over {MAX_ELEMENTS}")
        dims.append(d)
    n = math.prod(dims)
    if n > MAX_ELEMENTS:
        raise ValueError(f"shape {tuple(dims)} has {n} elements, over the limit of {MAX_ELEMENTS}")
    return tuple(dims), n


def _check_buffers(fmt: str, buffers: object, dtype: np.dtype) -> dict[str, np.ndarray]:
    if not isinstance(buffers, dict):
        raise _fail(fmt, f"buffers must be a dict, got {type(buffers).__name__}")
    expected = _BUFFERS[fmt]
    missing = [k for k in expected if k not in buffers]
    if missing:
        raise _fail(fmt, f"missing buffer(s) {', '.join(missing)}")
    extra = sorted(repr(k)[:40] for k in buffers if k not in expected)
    if extra:
        raise _fail(fmt, f"unexpected buffer(s) {', '.join(extra)}")
    out = {}
    for k in expected:
        b = buffers[k]
        if type(b) is not np.ndarray:
            raise _fail(fmt, f"buffer {k!r} must be a numpy ndarray, got {type(b).__name__}")
        if b.dtype.hasobject:
            raise _fail(fmt, f"buffer {k!r} is an object array")
        if b.ndim != 1:
            raise _fail(fmt, f"buffer {k!r} must be 1-D, got shape {b.shape}")
        if not b.flags.c_contiguous:
            raise _fail(fmt, f"buffer {k!r} is not C-contiguous")
        out[k] = b
    if out["values"].dtype != dtype:
        raise _fail(fmt, f"buffer 'values' has dtype {out['values'].dtype}, expected {dtype}")
    return out


def _check_index_dtype(fmt: str, name: str, buf: np.ndarray, max_value: int, what: str) -> None:
    want = index_dtype(max_value)
    if buf.dtype != want:
        raise _fail(fmt, f"buffer {name!r} has dtype {buf.dtype}, expected {want} (narrowest for {what} {max_value})")


def _check_len(fmt: str, name: str, buf: np.ndarray, want: int, why: str) -> None:
    if buf.size != want:
        raise _fail(fmt, f"buffer {name!r} has {buf.size} entries, expected {want} ({why})")


def _decode_dense(b: dict[str, np.ndarray], shape: tuple[int, ...], n: int, dtype: np.dtype) -> np.ndarray:
    _check_len("dense", "values", b["values"], n, "one per element")
    return b["values"].copy()


def _decode_bitmask(b: dict[str, np.ndarray], shape: tuple[int, ...], n: int, dtype: np.dtype) -> np.ndarray:
    mask, values = b["mask"], b["values"]
    if mask.dtype != _U8:
        raise _fail("bitmask", f"buffer 'mask' has dtype {mask.dtype}, expected uint8")
    _check_len("bitmask", "mask", mask, (n + 7) // 8, f"ceil({n}/8) bytes")
    bits = np.unpackbits(mask)
    if bits[n:].any():
        raise _fail("bitmask", f"mask has set bits beyond element {n}")
    keep = bits[:n].view(bool)
    nnz = int(np.count_nonzero(keep))
    if nnz != values.size:
        raise _fail("bitmask", f"mask has {nnz} set bits but 'values' has {values.size} entries")
    out = np.zeros(n, dtype)
    out[keep] = values
    return out


def _decode_csr(b: dict[str, np.ndarray], shape: tuple[int, ...], n: int, dtype: np.dtype) -> np.ndarray:
    row_ptr, col_idx, values = b["row_ptr"], b["col_idx"], b["values"]
    rows, cols = _csr_dims(shape, n)
    nnz = values.size
    _check_index_dtype("csr", "row_ptr", row_ptr, nnz, "nnz")
    _check_index_dtype("csr", "col_idx", col_idx, cols - 1, "last column")
    _check_len("csr", "row_ptr", row_ptr, rows + 1, "rows + 1")
    _check_len("csr", "col_idx", col_idx, nnz, "one per value")
    rp = row_ptr.astype(np.int64)  # uint64 beyond int64 turns negative and fails the checks below
    if rp[0] != 0:
        raise _fail("csr", f"row_ptr starts at {rp[0]}, expected 0")
    counts = np.diff(rp)
    if (counts < 0).any():
        raise _fail("csr", "row_ptr is not monotone")
    if rp[-1] != nnz:
        raise _fail("csr", f"row_ptr ends at {rp[-1]}, expected nnz = {nnz}")
    out = np.zeros(n, dtype)
    if nnz:
        col = col_idx.astype(np.int64)
        if int(col.max()) >= cols:
            raise _fail("csr", f"col_idx has column {int(col.max())}, out of range for {cols} columns")
        lin = np.repeat(np.arange(rows, dtype=np.int64), counts) * cols + col
        if (lin[1:] <= lin[:-1]).any():
            raise _fail("csr", "col_idx is not strictly increasing within a row")
        out[lin] = values
    return out


def _decode_rel(b: dict[str, np.ndarray], shape: tuple[int, ...], n: int, dtype: np.dtype) -> np.ndarray:
    gaps, values = b["gaps"], b["values"]
    if gaps.dtype != _U8:
        raise _fail("rel", f"buffer 'gaps' has dtype {gaps.dtype}, expected uint8")
    _check_len("rel", "values", values, gaps.size, "one per gap")
    out = np.zeros(n, dtype)
    if gaps.size:
        pos = np.cumsum(gaps, dtype=np.int64)
        pos += np.arange(gaps.size, dtype=np.int64)  # entry k sits at sum_{j<=k}(gap_j + 1) - 1
        if int(pos[-1]) >= n:
            raise _fail("rel", f"gaps run past the end: last entry at position {int(pos[-1])} of {n}")
        out[pos] = values
    return out


def _decode_relb(b: dict[str, np.ndarray], shape: tuple[int, ...], n: int, dtype: np.dtype) -> np.ndarray:
    width_buf, packed, values = b["width"], b["packed_gaps"], b["values"]
    for name, buf in (("width", width_buf), ("packed_gaps", packed)):
        if buf.dtype != _U8:
            raise _fail("relb", f"buffer {name!r} has dtype {buf.dtype}, expected uint8")
    _check_len("relb", "width", width_buf, 1, "one gap width")
    width = int(width_buf[0])
    if width not in RELB_WIDTHS:
        raise _fail("relb", f"gap width {width} is outside {RELB_WIDTHS[0]}..{RELB_WIDTHS[-1]} bits")
    _check_len("relb", "packed_gaps", packed, (values.size * width + 7) // 8, f"{width} bits per value, packed")
    out = np.zeros(n, dtype)
    if values.size:
        bits = np.unpackbits(packed, bitorder="little")
        if bits[values.size * width:].any():
            raise _fail("relb", "packed_gaps has non-zero padding bits")
        wide = np.zeros((values.size, 16), _U8)  # back to 16-bit little-endian words
        wide[:, :width] = bits[: values.size * width].reshape(values.size, width)
        gaps = np.packbits(wide, axis=1, bitorder="little").view("<u2").reshape(-1)
        pos = np.cumsum(gaps, dtype=np.int64) + np.arange(1, values.size + 1, dtype=np.int64) - 1
        if int(pos[-1]) >= n:
            raise _fail("relb", f"gaps run past the end: last entry at position {int(pos[-1])} of {n}")
        out[pos] = values
    return out


def _decode_coo(b: dict[str, np.ndarray], shape: tuple[int, ...], n: int, dtype: np.dtype) -> np.ndarray:
    indices, values = b["indices"], b["values"]
    _check_index_dtype("coo", "indices", indices, n - 1, "last index")
    _check_len("coo", "indices", indices, values.size, "one per value")
    out = np.zeros(n, dtype)
    if indices.size:
        idx = indices.astype(np.int64)  # canonical dtype is at most uint32 since n <= 2**31
        if (idx[1:] <= idx[:-1]).any():
            raise _fail("coo", "indices are not strictly increasing")
        if int(idx[-1]) >= n:
            raise _fail("coo", f"index {int(idx[-1])} is out of range for {n} elements")
        out[idx] = values
    return out


_DECODERS = {
    "dense": _decode_dense,
    "bitmask": _decode_bitmask,
    "csr": _decode_csr,
    "rel": _decode_rel,
    "relb": _decode_relb,
    "coo": _decode_coo,
}


def decode(encoded: Encoded, *, max_nbytes: int = DEFAULT_MAX_NBYTES) -> np.ndarray:
    """Rebuild the array from ``encoded``, validating everything first.

    Returns a new writable array of ``encoded.shape`` and ``encoded.dtype``. Raises a one-line
    ValueError for any malformed input, including a decoded size over ``max_nbytes`` bytes.
    """
    if not isinstance(encoded, Encoded):
        raise ValueError(f"expected an Encoded, got {type(encoded).__name__}")
    fmt = encoded.format
    if not isinstance(fmt, str) or fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r:.80}; expected one of {', '.join(FORMATS)}")
    dtype = _check_dtype(encoded.dtype)
    shape, n = _check_shape(encoded.shape)
    if n * dtype.itemsize > max_nbytes:
        raise _fail(
            fmt, f"decoded array {shape} {dtype} would take {n * dtype.itemsize} bytes, over max_nbytes={max_nbytes}"
        )
    bufs = _check_buffers(fmt, encoded.buffers, dtype)
    return _DECODERS[fmt](bufs, shape, n, dtype).reshape(shape)
