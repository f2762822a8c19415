"""Tests for formats/: round trips, exact byte counts, best/size_bound, rel fillers, hostile input."""

from __future__ import annotations

import dataclasses
import math
import time
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from formats import (
    DEFAULT_MAX_NBYTES,
    FORMATS,
    MAX_ELEMENTS,
    Encoded,
    all_nbytes,
    best,
    coo_int64_nbytes,
    decode,
    encode,
    encoded_nbytes,
    size_bound,
)

DTYPES = ["float32", "float16", "float64", "int8", "int32", "uint16", "bool", "complex64"]
SPARSITIES = [0.0, 0.5, 0.9, 0.99, 1.0, "random", "drawn"]
SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def make_array(shape: tuple[int, ...], dtype: str, sparsity: float, seed: int) -> np.ndarray:
    """Random array with about `sparsity` zeros; floats get NaN/inf/-0.0/subnormals mixed in."""
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)
    n = math.prod(shape)
    keep = rng.random(n) >= sparsity
    if dt.kind == "f":
        vals = (rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 3)).astype(dt)
        special = rng.random(n)
        vals[special < 0.03] = np.nan
        vals[(special >= 0.03) & (special < 0.05)] = np.inf
        vals[(special >= 0.05) & (special < 0.07)] = np.finfo(dt).smallest_subnormal
        zeros = np.where(rng.random(n) < 0.5, -0.0, 0.0).astype(dt)  # -0.0 must count as zero
    elif dt.kind == "c":
        vals = (rng.standard_normal(n) + 1j * rng.standard_normal(n)).astype(dt)
        zeros = np.zeros(n, dt)
    elif dt.kind == "b":
        vals, zeros = np.ones(n, dt), np.zeros(n, dt)
    else:
        info = np.iinfo(dt)
        vals = rng.integers(info.min, info.max, n, dtype=dt, endpoint=True)
        zeros = np.zeros(n, dt)
    return np.where(keep, vals, zeros).astype(dt).reshape(shape)


SMALL_SHAPES = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6)
# Long enough for rel fillers (zero runs over 256) and multi-byte indices.
LARGE_SHAPES = st.one_of(
    st.tuples(st.integers(0, 70000)),
    st.tuples(st.integers(0, 40), st.integers(0, 3000)),
    st.tuples(st.integers(0, 300), st.integers(0, 300)),
)


@st.composite
def arrays(draw: st.DrawFn, shapes: st.SearchStrategy = SMALL_SHAPES) -> np.ndarray:
    shape = draw(shapes)
    dtype = draw(st.sampled_from(DTYPES))
    sparsity = draw(st.sampled_from(SPARSITIES))
    seed = draw(st.integers(0, 2**32 - 1))
    if sparsity == "random":
        sparsity = np.random.default_rng(seed).random()
    a = make_array(shape, dtype, 0.0 if sparsity == "drawn" else sparsity, seed)
    if sparsity == "drawn":
        a[~draw(hnp.arrays(np.bool_, shape))] = 0
    return a


def w(max_value: int) -> int:
    """Bytes of the narrowest unsigned type holding max_value."""
    return next(b for b in (1, 2, 4, 8) if max_value < 256**b)


def ref_rel(a: np.ndarray, width: int = 8) -> tuple[list[int], list]:
    """Deep-Compression relative indexing with ``width``-bit gaps, written as a plain loop."""
    top = (1 << width) - 1
    gaps, values, run = [], [], 0
    for x in a.reshape(-1):
        if x == 0:
            run += 1
            continue
        while run > top:
            gaps.append(top)
            values.append(0)
            run -= top + 1
        gaps.append(run)
        values.append(x)
        run = 0
    return gaps, values


def ref_relb(a: np.ndarray) -> tuple[int, list[int], list]:
    """relb by brute force: every width tried, the smallest total (narrowest on ties)."""
    def size(width: int) -> int:
        gaps, _ = ref_rel(a, width)
        return 1 + -(-len(gaps) * width // 8) + len(gaps) * a.dtype.itemsize

    width = min(range(1, 17), key=lambda w_: (size(w_), w_))
    gaps, values = ref_rel(a, width)
    return width, gaps, values


def ref_csr(a: np.ndarray) -> tuple[list[int], list[int]]:
    m = a.reshape(a.shape[0], math.prod(a.shape[1:])) if a.ndim >= 2 else a.reshape(1, a.size)
    row_ptr, cols = [0], []
    for row in m:
        cols += [j for j, x in enumerate(row) if x != 0]
        row_ptr.append(len(cols))
    return row_ptr, cols


def expected_nbytes(a: np.ndarray, fmt: str) -> int:
    n, nnz, v = a.size, int(np.count_nonzero(a)), a.dtype.itemsize
    if fmt == "dense":
        return n * v
    if fmt == "bitmask":
        return -(-n // 8) + nnz * v
    if fmt == "csr":
        rows, cols = (a.shape[0], math.prod(a.shape[1:])) if a.ndim >= 2 else (1, n)
        return (rows + 1) * w(nnz) + nnz * (w(cols - 1) + v)
    if fmt == "rel":
        runs = np.diff(np.flatnonzero(a.reshape(-1)), prepend=-1) - 1
        return (nnz + int((runs // 256).sum())) * (1 + v)
    if fmt == "relb":
        width, gaps, _ = ref_relb(a)
        return 1 + -(-len(gaps) * width // 8) + len(gaps) * v
    return nnz * (w(n - 1) + v)


def as_bytes(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8).reshape(a.size, a.dtype.itemsize)


def check_roundtrip(a: np.ndarray, enc: Encoded) -> None:
    out = decode(enc)
    assert out.shape == a.shape and out.dtype == a.dtype
    assert np.array_equal(out, a, equal_nan=True)
    # Bit level: non-zeros (NaN payloads included) keep their bits; sparse formats write +0 for zeros.
    got, want = as_bytes(out), as_bytes(a)
    nonzero = (a != 0).reshape(-1)
    assert np.array_equal(got[nonzero], want[nonzero])
    if enc.format == "dense":
        assert np.array_equal(got, want)
    else:
        assert not got[~nonzero].any()


# ---------------------------------------------------------------------------------------------
# Round trips and byte accounting


@pytest.mark.parametrize("fmt", FORMATS)
@SETTINGS
@given(a=arrays())
def test_roundtrip_and_nbytes(fmt: str, a: np.ndarray) -> None:
    enc = encode(a, fmt)
    assert enc.format == fmt and enc.shape == a.shape and enc.dtype == a.dtype
    assert all(type(d) is int for d in enc.shape)
    for b in enc.buffers.values():
        assert b.ndim == 1 and b.flags.c_contiguous and not b.flags.writeable
    assert enc.buffers["values"].dtype == a.dtype
    check_roundtrip(a, enc)
    assert enc.nbytes == sum(b.nbytes for b in enc.buffers.values())
    assert enc.nbytes == expected_nbytes(a, fmt) == encoded_nbytes(a, fmt) == all_nbytes(a)[fmt]
    assert encode(a, fmt) == enc  # deterministic


@SETTINGS
@given(a=arrays())
def test_buffers_match_reference_encoders(a: np.ndarray) -> None:
    flat = a.reshape(-1)
    nz = flat != 0
    vals = flat[nz]

    gaps, rvals = ref_rel(a)
    rel = encode(a, "rel").buffers
    assert rel["gaps"].dtype == np.uint8 and rel["gaps"].tolist() == gaps
    assert rel["values"].tobytes() == np.array(rvals, dtype=a.dtype).tobytes()

    row_ptr, cols = ref_csr(a)
    csr = encode(a, "csr").buffers
    assert csr["row_ptr"].tolist() == row_ptr and csr["col_idx"].tolist() == cols
    assert csr["row_ptr"].itemsize == w(len(cols))
    assert csr["values"].tobytes() == vals.tobytes()

    width, gaps, rvals = ref_relb(a)
    relb = encode(a, "relb").buffers
    assert relb["width"].tolist() == [width]
    # gap k occupies bits [k*width, (k+1)*width) of the little-endian bit stream
    stream = int.from_bytes(relb["packed_gaps"].tobytes(), "little")
    assert [(stream >> (k * width)) & ((1 << width) - 1) for k in range(len(gaps))] == gaps
    assert stream >> (len(gaps) * width) == 0 and relb["packed_gaps"].size == -(-len(gaps) * width // 8)
    assert relb["values"].tobytes() == np.array(rvals, dtype=a.dtype).tobytes()

    coo = encode(a, "coo").buffers
    assert coo["indices"].tolist() == np.flatnonzero(nz).tolist()
    assert coo["indices"].itemsize == w(a.size - 1)

    bm = encode(a, "bitmask").buffers
    assert bm["mask"].dtype == np.uint8 and bm["mask"].size == -(-a.size // 8)
    # Big bit order: element i is bit 7 - i % 8 of byte i // 8.
    assert [bool(bm["mask"][i // 8] >> (7 - i % 8) & 1) for i in range(a.size)] == nz.tolist()
    assert bm["values"].tobytes() == vals.tobytes()

    assert encode(a, "dense").buffers["values"].tobytes() == np.ascontiguousarray(a).tobytes()


@pytest.mark.parametrize("fmt", FORMATS)
@settings(max_examples=25, deadline=None)
@given(a=arrays(LARGE_SHAPES))
def test_roundtrip_larger(fmt: str, a: np.ndarray) -> None:
    enc = encode(a, fmt)
    check_roundtrip(a, enc)
    assert enc.nbytes == expected_nbytes(a, fmt)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    "a",
    [
        np.array([], np.float32),
        np.zeros((0, 7), np.float64),
        np.zeros((7, 0, 3), np.float16),
        np.array(3.5, np.float32),
        np.array(-0.0, np.float32),
        np.array([np.nan, -0.0, 0.0, np.inf, -np.inf], np.float64),
        np.array([[1, 0], [0, -128]], np.int8),
        np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4)),
        np.arange(24, dtype=np.float32).reshape(4, 6)[:, ::2],
        np.array([0, 1.5, 0], dtype=">f4"),
        np.array([0, 2**62, 0], dtype=np.uint64),
    ],
    ids=["empty", "0x7", "7x0x3", "scalar", "neg-zero-scalar", "specials", "int8", "fortran", "strided", "big-endian", "uint64"],
)
def test_roundtrip_edge_cases(fmt: str, a: np.ndarray) -> None:
    check_roundtrip(a, encode(a, fmt))


def test_negative_zero_and_nan_semantics() -> None:
    a = np.array([-0.0, np.nan, 0.0, 1.0], np.float32)
    for fmt in ("bitmask", "csr", "rel", "coo"):
        enc = encode(a, fmt)
        assert enc.buffers["values"].size == 2  # -0.0 is a zero, NaN is not
        out = decode(enc)
        assert not np.signbit(out[0]) and np.isnan(out[1])
    assert np.signbit(decode(encode(a, "dense"))[0])


def test_encode_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="unknown format"):
        encode(np.zeros(3), "zip")
    with pytest.raises(ValueError, match="unsupported dtype"):
        encode(np.array(["a"]), "dense")
    with pytest.raises(ValueError, match="unsupported dtype"):
        encode(np.array([None]), "coo")


# ---------------------------------------------------------------------------------------------
# best / size_bound


@SETTINGS
@given(a=arrays(), subset=st.sets(st.sampled_from(FORMATS), min_size=1))
def test_best_is_smallest(a: np.ndarray, subset: set[str]) -> None:
    sizes = {f: encode(a, f).nbytes for f in FORMATS}
    b = best(a)
    assert b.nbytes == min(sizes.values()) <= sizes["dense"]
    assert b.format == next(f for f in FORMATS if sizes[f] == b.nbytes)
    check_roundtrip(a, b)
    sub = best(a, subset)
    assert sub.format in subset and sub.nbytes == min(sizes[f] for f in subset)
    assert b.nbytes >= 0 and size_bound(a) >= 0


def test_best_tie_goes_to_earlier_format() -> None:
    a = np.zeros(100, np.float32)
    a[[3, 50, 99]] = 1.0
    assert all_nbytes(a)["rel"] == all_nbytes(a)["coo"] == 15
    assert best(a).format == "rel"
    assert best(a, ["coo", "rel"]).format == "rel"
    assert best(np.zeros((10, 10), np.float32)).nbytes == 0


@pytest.mark.parametrize("candidates", [[], ["zip"], "csr"], ids=["empty", "unknown", "string"])
def test_best_rejects_bad_candidates(candidates: object) -> None:
    with pytest.raises(ValueError):
        best(np.zeros(4), candidates)  # type: ignore[arg-type]


@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99], ids=lambda s: f"s{s}")
def test_best_near_bound_784x300(sparsity: float) -> None:
    rng = np.random.default_rng(1234)
    a = rng.standard_normal((784, 300)).astype(np.float32)
    a[rng.random(a.shape) < sparsity] = 0
    b = best(a)
    assert b.nbytes <= 1.10 * size_bound(a)
    assert b.nbytes < coo_int64_nbytes(a)
    assert b.nbytes <= a.nbytes


def test_size_bound_closed_form() -> None:
    a = np.zeros(1000, np.float64)
    a[:250] = 1.0
    h = -(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75))
    assert size_bound(a) == pytest.approx(1000 * h / 8 + 8 * 250)
    assert size_bound(np.zeros(0, np.float32)) == 0.0
    assert size_bound(np.zeros(64, np.float32)) == 0.0
    assert size_bound(np.ones(64, np.float32)) == 256.0
    assert coo_int64_nbytes(a) == 250 * 16


# ---------------------------------------------------------------------------------------------
# rel fillers


@pytest.mark.parametrize("run", [0, 1, 254, 255, 256, 257, 511, 512, 513, 65536], ids=lambda r: f"run{r}")
def test_rel_filler_boundaries(run: int) -> None:
    a = np.zeros(run + 2, np.float32)
    a[0] = 1.0
    a[-1] = 2.0
    enc = encode(a, "rel")
    fillers = run // 256
    assert enc.buffers["gaps"].tolist() == [0] + [255] * fillers + [run % 256]
    assert enc.buffers["values"].tolist() == [1.0] + [0.0] * fillers + [2.0]
    check_roundtrip(a, enc)


def test_rel_zero_row_uses_fillers() -> None:
    rng = np.random.default_rng(7)
    a = rng.standard_normal((3, 1000)).astype(np.float32)
    a[rng.random(a.shape) < 0.5] = 0
    a[1] = 0
    a[0, -1] = a[2, 0] = 1.0  # the zero run is exactly the 1000 entries of row 1
    enc = encode(a, "rel")
    gaps, values = enc.buffers["gaps"], enc.buffers["values"]
    filler = (values == 0) & (gaps == 255)
    assert int(filler.sum()) >= 1000 // 256
    assert len(gaps) == len(ref_rel(a)[0])
    check_roundtrip(a, enc)
    # only the last element set: 9999 zeros before it = 39 fillers, then a gap of 9999 % 256
    b = np.zeros(10000, np.float16)
    b[-1] = 1
    e = encode(b, "rel")
    assert e.buffers["gaps"].size == 40 and e.buffers["gaps"][-1] == 9999 % 256
    check_roundtrip(b, e)


# ---------------------------------------------------------------------------------------------
# Hostile input: targeted cases


def _enc(fmt: str, a: np.ndarray | None = None) -> Encoded:
    if a is None:
        a = np.zeros((4, 70), np.float32)
        a[0, 3] = a[0, 9] = a[2, 0] = a[3, 69] = 1.5
    return encode(a, fmt)


def _with(enc: Encoded, **bufs: object) -> Encoded:
    return dataclasses.replace(enc, buffers={**enc.buffers, **bufs})


def _without(enc: Encoded, key: str) -> Encoded:
    return dataclasses.replace(enc, buffers={k: v for k, v in enc.buffers.items() if k != key})


E = {f: _enc(f) for f in FORMATS}
F32 = np.float32

BAD_CASES = {
    "unknown-format": (dataclasses.replace(E["coo"], format="zip"), "unknown format"),
    "format-not-str": (dataclasses.replace(E["coo"], format=3), "unknown format"),
    "format-mismatch": (dataclasses.replace(E["coo"], format="csr"), "missing buffer"),
    "missing-buffer": (_without(E["csr"], "col_idx"), "missing buffer"),
    "extra-buffer": (_with(E["dense"], extra=np.zeros(1, np.uint8)), "unexpected buffer"),
    "buffers-not-dict": (dataclasses.replace(E["dense"], buffers=[E["dense"].buffers["values"]]), "must be a dict"),
    "values-dtype": (_with(E["rel"], values=E["rel"].buffers["values"].astype(np.float64)), "values"),
    "index-dtype": (_with(E["csr"], col_idx=E["csr"].buffers["col_idx"].astype(np.uint32)), "col_idx"),
    "signed-index": (_with(E["coo"], indices=E["coo"].buffers["indices"].astype(np.int16)), "indices"),
    "truncated-values": (_with(E["dense"], values=E["dense"].buffers["values"][:-1]), "entries"),
    "truncated-mask": (_with(E["bitmask"], mask=E["bitmask"].buffers["mask"][:-1]), "mask"),
    "len-mismatch": (_with(E["csr"], col_idx=E["csr"].buffers["col_idx"][:-1]), "col_idx"),
    "col-out-of-range": (_with(E["csr"], col_idx=np.array([3, 9, 0, 70], np.uint8)), "out of range"),
    "col-unsorted": (_with(E["csr"], col_idx=np.array([9, 3, 0, 69], np.uint8)), "strictly increasing"),
    "col-duplicate": (_with(E["csr"], col_idx=np.array([3, 3, 0, 69], np.uint8)), "strictly increasing"),
    "row-ptr-not-monotone": (_with(E["csr"], row_ptr=np.array([0, 2, 1, 3, 4], np.uint8)), "monotone"),
    "row-ptr-end": (_with(E["csr"], row_ptr=np.array([0, 2, 2, 3, 3], np.uint8)), "ends at"),
    "row-ptr-start": (_with(E["csr"], row_ptr=np.array([1, 2, 2, 3, 4], np.uint8)), "starts at"),
    "coo-out-of-range": (_with(E["coo"], indices=np.array([3, 9, 140, 280], np.uint16)), "out of range"),
    "coo-unsorted": (_with(E["coo"], indices=np.array([9, 3, 140, 279], np.uint16)), "strictly increasing"),
    "coo-duplicate": (_with(E["coo"], indices=np.array([3, 3, 140, 279], np.uint16)), "strictly increasing"),
    "rel-past-end": (_with(E["rel"], gaps=np.array([3, 5, 255, 255], np.uint8)), "past the end"),
    "rel-len-mismatch": (_with(E["rel"], gaps=E["rel"].buffers["gaps"][:-1]), "values"),
    "relb-width-zero": (_with(E["relb"], width=np.array([0], np.uint8)), "gap width"),
    "relb-width-17": (_with(E["relb"], width=np.array([17], np.uint8)), "gap width"),
    "relb-width-two-bytes": (_with(E["relb"], width=np.array([8, 8], np.uint8)), "width"),
    "relb-truncated": (_with(E["relb"], packed_gaps=E["relb"].buffers["packed_gaps"][:-1]), "packed_gaps"),
    "relb-padding-bits": (
        _with(_enc("relb", np.ones(3, F32)), packed_gaps=np.array([0b10000000], np.uint8)),
        "padding",
    ),
    "relb-past-end": (_with(E["relb"], packed_gaps=np.full_like(E["relb"].buffers["packed_gaps"], 0xFF)), "past the end|padding"),
    "mask-padding-bits": (
        _with(_enc("bitmask", np.ones(5, F32)), mask=np.array([0b11111100], np.uint8)),
        "beyond",
    ),
    "mask-popcount": (_with(E["bitmask"], values=E["bitmask"].buffers["values"][:-1]), "set bits"),
    "negative-dim": (dataclasses.replace(E["coo"], shape=(-4, -70)), "negative"),
    "float-dim": (dataclasses.replace(E["coo"], shape=(4.0, 70)), "non-integer"),
    "bool-dim": (dataclasses.replace(E["coo"], shape=(True, 280)), "non-integer"),
    "shape-list": (dataclasses.replace(E["coo"], shape=[4, 70]), "tuple"),
    "too-many-elements": (dataclasses.replace(E["rel"], shape=(2**16, 2**16)), "over the limit"),
    "huge-dim-zero-size": (dataclasses.replace(E["rel"], shape=(0, 2**40)), "dimension over"),
    "over-max-nbytes": (dataclasses.replace(E["rel"], shape=(2**15, 2**15)), "max_nbytes"),
    "rank-33": (dataclasses.replace(E["rel"], shape=(1,) * 33), "rank"),
    "non-contiguous": (_with(E["dense"], values=np.repeat(E["dense"].buffers["values"], 2)[::2]), "contiguous"),
    "2d-buffer": (_with(E["dense"], values=E["dense"].buffers["values"].reshape(4, 70)), "1-D"),
    "object-buffer": (_with(E["coo"], indices=E["coo"].buffers["indices"].astype(object)), "object"),
    "list-buffer": (_with(E["coo"], indices=E["coo"].buffers["indices"].tolist()), "ndarray"),
    "byteswapped-index": (
        _with(E["coo"], indices=E["coo"].buffers["indices"].astype(">u2")),
        "indices",
    ),
    "dtype-object": (dataclasses.replace(E["dense"], dtype=np.dtype(object)), "unsupported dtype"),
    "dtype-str": (dataclasses.replace(E["dense"], dtype=np.dtype("U3")), "unsupported dtype"),
    "dtype-none": (dataclasses.replace(E["dense"], dtype=None), "dtype"),
    "dtype-junk": (dataclasses.replace(E["dense"], dtype="not-a-dtype"), "dtype"),
    "dtype-mismatch": (dataclasses.replace(E["dense"], dtype=np.dtype(np.float64)), "values"),
    "not-encoded": ("hello", "expected an Encoded"),
}


@pytest.mark.parametrize("enc,match", list(BAD_CASES.values()), ids=list(BAD_CASES))
def test_decode_rejects(enc: Encoded, match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        decode(enc)
    assert "\n" not in str(info.value)


def test_max_nbytes_is_adjustable() -> None:
    enc = dataclasses.replace(E["coo"], shape=(2**13, 2**15))  # 1 GiB of float32: exactly the default
    assert 2**28 * 4 == DEFAULT_MAX_NBYTES
    with pytest.raises(ValueError, match="max_nbytes"):
        decode(enc, max_nbytes=2**20)
    small = encode(np.ones(10, F32), "dense")
    with pytest.raises(ValueError, match="max_nbytes"):
        decode(small, max_nbytes=39)
    assert decode(small, max_nbytes=40).shape == (10,)
    assert MAX_ELEMENTS == 2**31


# ---------------------------------------------------------------------------------------------
# Hostile input: fuzzing with mutated valid encodings

FUZZ_DTYPES = [np.dtype(t) for t in ("u1", "u2", "u4", "u8", "i1", "i2", "i4", "i8", "f2", "f4", "f8", "?", "c8")]
ABSURD_SHAPES = [
    (-1,), (2**31,), (2**31 + 1,), (2**16, 2**16), (2**15, 2**15, 4), (0, 2**31), (2**62, 2**62),
    (1,) * 40, (), (0,), (1,), (3, 0), (7, 11), (2**12, 2**12), (2**20,), (255,), (256,), (257,),
]


def _mutate_buffer(b: object, rng: np.random.Generator) -> object:
    if type(b) is not np.ndarray or b.dtype.hasobject or b.ndim != 1:
        return b
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lossy casts are the point here
        return _mutate_array(np.array(b), rng)  # writable copy


def _mutate_array(b: np.ndarray, rng: np.random.Generator) -> object:
    kind = rng.integers(12)
    if kind == 0 and b.size:  # truncate
        return b[: rng.integers(b.size)].copy()
    if kind == 1:  # extend with junk of the same dtype
        junk = rng.integers(0, 256, rng.integers(1, 9) * b.itemsize, dtype=np.uint8).view(b.dtype)
        return np.concatenate([b, junk])
    if kind == 2 and b.size:  # flip bytes
        raw = b.view(np.uint8)
        for i in rng.integers(0, raw.size, rng.integers(1, 4)):
            raw[i] ^= rng.integers(1, 256)
        return b
    if kind == 3:  # convert dtype
        return b.astype(FUZZ_DTYPES[rng.integers(len(FUZZ_DTYPES))])
    if kind == 4 and b.nbytes:  # reinterpret bytes
        dt = FUZZ_DTYPES[rng.integers(len(FUZZ_DTYPES))]
        return b.view(np.uint8)[: b.nbytes - b.nbytes % dt.itemsize].view(dt)
    if kind == 5:  # permute
        return rng.permutation(b)
    if kind == 6 and b.size:  # duplicate an entry
        i = rng.integers(b.size)
        return np.insert(b, i, b[i])
    if kind == 7 and b.size:  # extreme value
        b[rng.integers(b.size)] = np.iinfo(b.dtype).max if b.dtype.kind in "iu" else 1
        return b
    if kind == 8:
        return b[:0].copy()
    if kind == 9:  # layout trouble
        return [np.repeat(b, 2)[::2], b.reshape(1, -1), b.astype(object), b.tolist(), b.byteswap().view(b.dtype.newbyteorder())][
            rng.integers(5)
        ]
    if kind == 10 and b.size:  # shuffle a window (local disorder)
        i = rng.integers(b.size)
        b[i : i + 3] = b[i : i + 3][::-1].copy()
        return b
    return b


def _mutate(enc: Encoded, rng: np.random.Generator) -> Encoded:
    kind = rng.integers(10)
    bufs = dict(enc.buffers)
    if not bufs:
        kind = 6
    if kind <= 4:  # buffer contents (most likely)
        key = list(bufs)[rng.integers(len(bufs))]
        bufs[key] = _mutate_buffer(bufs[key], rng)
        return dataclasses.replace(enc, buffers=bufs)
    if kind == 5:  # shape
        choice = rng.integers(4)
        if choice == 0:
            shape = ABSURD_SHAPES[rng.integers(len(ABSURD_SHAPES))]
        elif choice == 1:
            shape = tuple(int(d) + int(rng.integers(-2, 3)) for d in enc.shape)
        elif choice == 2:
            shape = tuple(reversed(enc.shape)) + (1,)
        else:
            shape = [list(enc.shape), tuple(float(d) for d in enc.shape), (np.int64(5),), (True,), "7"][rng.integers(5)]
        return dataclasses.replace(enc, shape=shape)  # type: ignore[arg-type]
    if kind == 6:  # keys
        key = list(bufs)[rng.integers(len(bufs))] if bufs else "values"
        op = rng.integers(3) if bufs else 1
        if op == 0:
            del bufs[key]
        elif op == 1:
            bufs["extra"] = np.zeros(3, np.uint8)
        else:
            bufs[key + "_"] = bufs.pop(key)
        return dataclasses.replace(enc, buffers=bufs)
    if kind == 7:  # format
        return dataclasses.replace(enc, format=[*FORMATS, "zip", "", None][rng.integers(len(FORMATS) + 3)])
    if kind == 8:  # dtype
        junk = [*FUZZ_DTYPES, np.dtype(object), np.dtype("U2"), np.dtype("M8[s]"), "f4", "nope", None, 3]
        return dataclasses.replace(enc, dtype=junk[rng.integers(len(junk))])
    keys = list(bufs)  # swap two buffers
    if len(keys) > 1:
        i, j = rng.choice(len(keys), 2, replace=False)
        bufs[keys[i]], bufs[keys[j]] = bufs[keys[j]], bufs[keys[i]]
    return dataclasses.replace(enc, buffers=bufs)


def _decode_or_valueerror(enc: Encoded, max_nbytes: int) -> bool:
    """True when decoded (and the result matches the declared shape/dtype), False on ValueError."""
    try:
        out = decode(enc, max_nbytes=max_nbytes)
    except ValueError as e:
        assert "\n" not in str(e)
        return False
    assert out.shape == tuple(int(d) for d in enc.shape)
    assert out.dtype == np.dtype(enc.dtype)
    return True


@pytest.mark.parametrize("fmt", FORMATS)
def test_fuzz_mutated_encodings(fmt: str) -> None:
    rng = np.random.default_rng(FORMATS.index(fmt))
    shapes = [(), (0,), (5,), (300,), (3, 0), (4, 70), (2, 3, 5), (2, 2, 2, 40), (1, 1000)]
    bases = [
        encode(make_array(shapes[i % len(shapes)], DTYPES[i % len(DTYPES)], s, i), fmt)
        for i, s in enumerate([0.0, 0.5, 0.9, 0.99, 1.0] * 8)
    ]
    decoded = rejected = 0
    slowest = 0.0
    for _ in range(1200):
        enc = bases[rng.integers(len(bases))]
        for _ in range(rng.integers(1, 4)):
            enc = _mutate(enc, rng)
        t = time.perf_counter()
        ok = _decode_or_valueerror(enc, max_nbytes=1 << 24 if rng.random() < 0.8 else DEFAULT_MAX_NBYTES)
        slowest = max(slowest, time.perf_counter() - t)
        decoded += ok
        rejected += not ok
    assert decoded > 50 and rejected > 500
    assert slowest < 1.0


@settings(max_examples=300, deadline=None)
@given(
    fmt=st.sampled_from(FORMATS),
    a=arrays(),
    seed=st.integers(0, 2**32 - 1),
    steps=st.integers(1, 3),
)
def test_fuzz_hypothesis(fmt: str, a: np.ndarray, seed: int, steps: int) -> None:
    rng = np.random.default_rng(seed)
    enc = encode(a, fmt)
    for _ in range(steps):
        enc = _mutate(enc, rng)
    _decode_or_valueerror(enc, max_nbytes=1 << 24)


@pytest.mark.parametrize("fmt", FORMATS)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_fuzz_random_buffers(fmt: str, data: st.DataObject) -> None:
    """Encodings built from scratch: random shapes, dtypes and raw buffer bytes."""
    shape = data.draw(st.lists(st.integers(-2, 300), min_size=0, max_size=4).map(tuple))
    dtype = data.draw(st.sampled_from(FUZZ_DTYPES))
    names = {"dense": ["values"], "bitmask": ["mask", "values"], "csr": ["row_ptr", "col_idx", "values"],
             "rel": ["gaps", "values"], "relb": ["width", "packed_gaps", "values"], "coo": ["indices", "values"]}[fmt]
    bufs = {}
    for name in names:
        bdt = dtype if name == "values" else data.draw(st.sampled_from(FUZZ_DTYPES[:4]))
        raw = data.draw(st.binary(max_size=64))
        bufs[name] = np.frombuffer(raw[: len(raw) - len(raw) % bdt.itemsize], dtype=bdt).copy()
    _decode_or_valueerror(Encoded(fmt, shape, dtype, bufs), max_nbytes=1 << 24)


# ---------------------------------------------------------------------------------------------
# Speed


def test_speed_4096_squared_99_percent() -> None:
    rng = np.random.default_rng(0)
    a = np.zeros((4096, 4096), np.float32)
    idx = rng.choice(a.size, a.size // 100, replace=False)
    a.reshape(-1)[idx] = rng.standard_normal(idx.size).astype(np.float32)
    for fmt in FORMATS:
        t = time.perf_counter()
        out = decode(encode(a, fmt))
        elapsed = time.perf_counter() - t
        assert np.array_equal(out, a)
        assert elapsed < 1.0, f"{fmt}: {elapsed:.2f}s"
    t = time.perf_counter()
    best(a)
    assert time.perf_counter() - t < 1.0
