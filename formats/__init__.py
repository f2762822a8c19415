"""Pure numpy codecs for sparse weight tensors, with exact byte accounting.

No torch or onnx here: an :class:`Encoded` is a format name, the original shape and dtype,
and a dict of named 1-D raw buffers, exactly what an exporter stores. ``Encoded.nbytes`` is
the sum of the buffers' ``nbytes``; it counts no header (shape, dtype, names), which the
container stores once per tensor whatever the format.

Zeros: an entry is zero when ``x == 0``. So ``-0.0`` is a zero and the sparse formats decode
it as ``+0.0`` (``dense`` keeps the bits as they are), while NaN is a non-zero and keeps its
bits. Compare round trips with ``np.array_equal(..., equal_nan=True)``.

Every format works on any rank. ``bitmask``, ``rel`` and ``coo`` address the array flattened
in C order; ``csr`` views it as ``[R, C] = [shape[0], prod(shape[1:])]`` (rank 0/1 as ``[1, N]``).
Index buffers use the narrowest unsigned dtype ``w(m)`` that holds the largest value ``m``
they can contain (uint8/16/32/64, 1/2/4/8 bytes); decoders insist on exactly that dtype.

With N elements, nnz non-zeros, v bytes per value:

=========  ==============================================  ====================================
format     buffers                                         bytes
=========  ==============================================  ====================================
dense      values[N]                                       N*v
bitmask    mask[ceil(N/8)] uint8, values[nnz]              ceil(N/8) + nnz*v
csr        row_ptr[R+1] w(nnz), col_idx[nnz] w(C-1),       (R+1)*w(nnz) + nnz*(w(C-1) + v)
           values[nnz]
rel        gaps[L] uint8, values[L], L = nnz + F           L*(1 + v)
relb       width[1] uint8, packed_gaps[ceil(L*b/8)]       1 + ceil(L*b/8) + L*v
           uint8, values[L], L = nnz + F_b
coo        indices[nnz] w(N-1), values[nnz]                nnz*(w(N-1) + v)
=========  ==============================================  ====================================

* ``bitmask``: ``np.packbits`` default ("big") bit order, so element 0 is the most significant
  bit of byte 0; padding bits of the last byte are zero.
* ``rel`` is Deep Compression's relative indexing: entry k stores the number of zeros skipped
  since the previous entry, so it sits at ``sum_{j<=k}(gaps[j] + 1) - 1``. A run of z >= 256
  zeros first emits ``z // 256`` filler entries (gap 255, value 0, each covering 256 positions),
  hence ``F = sum over non-zeros of (zeros before it) // 256``. Trailing zeros cost nothing.
  (An ONNX decode graph that wants ``CumSum(gaps) - 1`` positions stores ``gaps + 1`` instead.)
* ``relb`` is ``rel`` with b-bit gaps (b = 1..16, stored in ``width``), bit-packed little-endian:
  gap k is bits ``[k*b, (k+1)*b)`` of the stream, bit i being bit ``i % 8`` of byte ``i // 8``;
  padding bits are zero. Fillers (gap ``2**b - 1``, value 0) cover ``2**b`` positions, so
  ``F_b = sum over non-zeros of (zeros before it) >> b``. The encoder tries every b and keeps
  the smallest total (the narrowest on ties): about 10 bits per non-zero at 99.5 % sparsity
  where ``rel`` pays 8 bits plus many fillers and ``csr`` 16 bits.
* ``coo`` with int64 indices (the ONNX ``SparseTensorProto`` layout) costs ``nnz*(8 + v)``:
  see :func:`coo_int64_nbytes`.

When each wins (fp32, i.i.d. random mask, sparsity s, density d = 1 - s; per element):
dense costs 4 bytes, bitmask 1/8 + 4d, rel about 5d, csr about d*(w + 4) plus the row pointer.

* dense only for (nearly) full tensors: bitmask is smaller once s > 1/32.
* bitmask up to s = 0.875, where rel's 1 index byte per non-zero (d bytes per element) equals
  the mask's 1/8 byte per element.
* rel from 0.875 up to about 0.99-0.995: its gap byte beats csr's 2-byte columns until the mean
  zero run nears 256 and fillers (5 bytes each) pile up.
* relb beats rel whenever a width other than 8 bits fits the gaps better (typically from about
  0.8 on) and keeps within a few % of the bound at 0.995 and beyond, where rel and csr drift.
* csr at extreme sparsity of wide 2-D tensors (fixed w(C-1)-byte columns, no fillers; the
  row pointer is amortised); coo for extreme sparsity of 1-D or small tensors (no row pointer).
  All-zero tensors cost 0 bytes in rel and coo. For N <= 256 coo and rel are byte-identical;
  ties go to the format earlier in FORMATS (so rel).

:func:`best` computes every candidate's exact size in closed form and encodes only the winner.
:func:`size_bound` is ``N*H(s)/8 + v*nnz`` (binary entropy of the mask plus the value bits);
for i.i.d. masks the best format (relb from s = 0.9 on) stays within about 4 % of it from
s = 0.9 to 0.995 (measured: bench/bench_formats.py).

Decoders validate format, dtype, shape, buffer names, types, dtypes, lengths and contents, and
raise a one-line ``ValueError`` for anything malformed. The shape is capped at ``MAX_ELEMENTS``
(2**31) elements and the decoded array at ``max_nbytes`` (default ``DEFAULT_MAX_NBYTES``, 1 GiB),
so a hostile shape cannot trigger a huge allocation.
"""

from .codecs import (
    DEFAULT_MAX_NBYTES,
    FORMATS,
    MAX_ELEMENTS,
    MAX_RANK,
    REL_MAX_GAP,
    RELB_WIDTHS,
    Encoded,
    all_nbytes,
    best,
    coo_int64_nbytes,
    decode,
    encode,
    encoded_nbytes,
    index_dtype,
    size_bound,
)

__all__ = [
    "DEFAULT_MAX_NBYTES",
    "FORMATS",
    "MAX_ELEMENTS",
    "MAX_RANK",
    "REL_MAX_GAP",
    "RELB_WIDTHS",
    "Encoded",
    "all_nbytes",
    "best",
    "coo_int64_nbytes",
    "decode",
    "encode",
    "encoded_nbytes",
    "index_dtype",
    "size_bound",
]
