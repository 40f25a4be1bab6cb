"""Exact k-nearest neighbours of a set against itself, and neighbourhood-overlap metrics.

Search
------
``knn(X, k)`` returns, for every row ``i`` of ``X`` (or every row listed in ``query_idx``), the ``k``
nearest *other* rows of ``X``. The query is excluded **by its row index**, never by position in the
result, so exact duplicates of a row are returned (at distance 0) while the row itself never is.
Neighbours are ordered by distance, ties by row index (smaller first).

Distances: ``metric="l2"`` returns Euclidean distances ``||x_i - x_j||``; ``metric="cosine"`` returns
``1 - cos(x_i, x_j)`` (rows of zero norm are treated as zero vectors: cosine 0 to everything).
Precision: like faiss, selection uses float32 GEMM scores (``||x||^2 + ||y||^2 - 2 x.y``, on
mean-centred rows for l2, which leaves distances unchanged and shrinks the norms), whose rounding
error is of order ``1e-7 * sqrt(D) * (||x||^2 + ||y||^2)``. So "exact" means exhaustive and exact up to
float32 rounding: two candidates whose squared distances differ by less than that may be ordered
either way (scikit-learn, which upcasts to float64, can then differ in the k-th neighbour). For
returned pairs that are close relative to their norms (``d^2 < 1e-3 (||x||^2 + ||y||^2)``, or cosine
distance ``< 1e-3``) the distance is recomputed directly from the difference vector, so an exact
duplicate is reported at distance exactly 0. Ties are defined on the computed float32 values.

Backends (all exhaustive; "exact" in the float32 sense above):

* ``"torch"`` and ``"hybrid"`` share one tiled GEMM driver: float32 score tiles (``tile_size``,
  a tile and its transpose within ``block_mb``) from ``torch.mm`` plus two in-place row/column adds
  (no ``addmm``, whose bias copy cost ~30% here), never an N x N matrix. When the queries are all
  rows, the scores are symmetric, so only tiles I <= J are computed and each off-diagonal tile also
  serves J's rows through its transpose: half the flops of the GEMM floor ``X @ X.T``. Each row
  receives its columns in ascending index order, which makes the tie-break by index exact.
  ``"torch"`` (CPU or CUDA) keeps a running top-k per row: ``select_largest_two_level`` on each tile
  (one vectorised pass over strided group maxima, then only ~4 (k+2) candidates are sorted) merged
  with the running list by a stable sort. ``"hybrid"`` (CPU, needs faiss) feeds the tiles to faiss's
  C++ max-heaps (``HeapArray.addn``: one pass, OpenMP over rows).
* ``"faiss"``: ``IndexFlatL2`` / ``IndexFlatIP`` on unit vectors, on GPU when ``device`` is CUDA and
  a GPU build of faiss is present (GPU faiss caps k at 2048: larger k falls back to ``"torch"``).
  Searches ``k + 2``, drops self by id, re-sorts by (distance, index); rows whose k-th and (k+1)-th
  distances tie are recomputed with the torch kernel so boundary ties are also broken by index.
* ``"auto"``: CUDA -> ``"faiss"`` if GPU faiss is importable, else ``"torch"``; CPU -> ``"hybrid"``
  if faiss is importable, else ``"torch"``. Not IndexFlat on CPU: the faiss-cpu 1.15.1 wheel bundles
  OpenBLAS 0.3.15, which detects this machine's Ice Lake CPU as "Prescott" and runs its GEMM ~10x
  slower than torch's MKL (``OPENBLAS_CORETYPE=SkylakeX`` in the environment brings it to ~1.4x).

The overlap metrics (KNOR, Jaccard, rank displacement, three-way counts, distance correlation) live
in ``vlmc.metrics.overlap`` and are re-exported here.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence
from typing import Literal, NamedTuple

import numpy as np
import torch

from vlmc.metrics.overlap import (  # noqa: F401  (re-exported)
    distance_correlation,
    jaccard_per_item,
    knor,
    knor_multi,
    knor_per_item,
    overlap_counts,
    rank_displacement,
    summarize,
    three_way_counts,
)

log = logging.getLogger(__name__)

Metric = Literal["l2", "cosine"]
BACKENDS = ("auto", "hybrid", "faiss", "torch")
METRICS = ("l2", "cosine")
GPU_FAISS_MAX_K = 2048
REFINE_REL = 1e-3
GROUP = 4  # columns per group in select_largest_two_level
_NEG_INF = float("-inf")


class KnnResult(NamedTuple):
    """Neighbours of each query: ``indices`` int64 [Q, k] and ``distances`` float32 [Q, k]."""

    indices: np.ndarray
    distances: np.ndarray


# ----------------------------------------------------------------------------------------------------
# backend discovery and thread control


def _faiss():
    """The faiss module, or None when it is not importable."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def faiss_gpu_available() -> bool:
    """True when a GPU build of faiss is importable and sees at least one GPU."""
    faiss = _faiss()
    return bool(faiss is not None and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0)


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map ``auto`` to a concrete backend for ``device`` and check the requested one can run.

    Raises:
        ValueError: unknown backend, faiss missing, or ``hybrid`` asked for on a non-CPU device.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        if device.type == "cuda":
            return "faiss" if faiss_gpu_available() else "torch"
        return "hybrid" if _faiss() is not None else "torch"
    if backend in ("faiss", "hybrid") and _faiss() is None:
        raise ValueError(f"backend {backend!r} needs faiss, which is not importable")
    if backend == "hybrid" and device.type != "cpu":
        raise ValueError("backend 'hybrid' runs on CPU only; use 'torch' or 'faiss' on CUDA")
    return backend


@contextlib.contextmanager
def num_threads(n: int | None) -> Iterator[None]:
    """Temporarily set torch's and faiss's (OpenMP) CPU thread counts; ``None`` leaves them alone."""
    if n is None:
        yield
        return
    faiss = _faiss()
    old_t = torch.get_num_threads()
    old_f = faiss.omp_get_max_threads() if faiss is not None else None
    torch.set_num_threads(n)
    if faiss is not None:
        faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old_t)
        if faiss is not None:
            faiss.omp_set_num_threads(old_f)


# ----------------------------------------------------------------------------------------------------
# input preparation


def _as_float32(X: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """``X`` as a contiguous float32 [N, D] tensor on ``device`` (no copy when already so)."""
    t = X if isinstance(X, torch.Tensor) else torch.as_tensor(np.asarray(X))
    if t.ndim != 2:
        raise ValueError(f"X must be 2-D [N, D], got shape {tuple(t.shape)}")
    t = t.to(device=device, dtype=torch.float32).contiguous()
    for s in range(0, t.shape[0], 8192):  # chunked: no [N, D] bool temporary
        if not bool(torch.isfinite(t[s : s + 8192]).all()):
            raise ValueError("X contains NaN or inf")
    return t


def _sq_norms(X: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """Row squared norms ``||x_i||^2`` as plain sums of squares (exact for small integers; no
    sqrt round trip), in row chunks so no [N, D] temporary is made."""
    out = torch.empty(X.shape[0], dtype=X.dtype, device=X.device)
    for s in range(0, X.shape[0], chunk):
        out[s : s + chunk] = X[s : s + chunk].square().sum(dim=1)
    return out


def _unit_rows(X: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit norm; zero rows stay zero."""
    return X / torch.linalg.vector_norm(X, dim=1, keepdim=True).clamp_min_(1e-30)


def _centred(X: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """``X - mean(X)``: L2 distances are unchanged, GEMM cancellation shrinks.

    The mean is accumulated in float64 over row chunks (``X.mean(dtype=float64)`` would make a
    float64 copy of all of X: +1.5 GiB at 200k x 1024).
    """
    acc = torch.zeros(X.shape[1], dtype=torch.float64, device=X.device)
    for s in range(0, X.shape[0], chunk):
        acc += X[s : s + chunk].sum(dim=0, dtype=torch.float64)
    return X - (acc / max(X.shape[0], 1)).to(X.dtype)


def _query_ids(query_idx: np.ndarray | torch.Tensor | Sequence[int] | None, n: int) -> torch.Tensor:
    """Validated int64 query row ids (all rows when ``None``)."""
    if query_idx is None:
        return torch.arange(n)
    q = torch.as_tensor(np.asarray(query_idx), dtype=torch.int64).reshape(-1)
    if q.numel() and (int(q.min()) < 0 or int(q.max()) >= n):
        raise ValueError(f"query_idx out of range [0, {n})")
    return q


# ----------------------------------------------------------------------------------------------------
# torch selection kernels


def _group_threshold(S: torch.Tensor, k: int) -> torch.Tensor:
    """A per-row threshold ``t_i`` with ``t_i <= `` the k-th largest entry of row i of ``S``.

    Columns are split into G strided groups (``{g, g+G, g+2G, ...}``; leftover columns are singleton
    groups). The k largest group maxima are k distinct entries, so the k-th largest group maximum is
    at most the k-th largest entry. Returns [rows, 1].
    """
    b, n = S.shape
    G = min(n, max(4 * k, 256))
    q = n // G
    gm = S[:, : q * G].view(b, q, G).amax(dim=1)
    if q * G < n:
        gm = torch.cat([gm, S[:, q * G :]], dim=1)
    return gm.topk(k, dim=1, sorted=True).values[:, -1:]


def _row_chunks(counts: torch.Tensor, cap: int) -> Iterator[tuple[int, int]]:
    """Split rows so that (rows in chunk) x (largest count in chunk) <= cap (one row at least)."""
    b = counts.numel()
    if b * int(counts.max()) <= cap:
        yield 0, b
        return
    start, width = 0, 0
    for i, c in enumerate(counts.tolist()):
        w = max(width, c)
        if (i - start + 1) * w > cap and i > start:
            yield start, i
            start, width = i, c
        else:
            width = w
    yield start, b


def _sorted_candidates(
    rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, nrows: int, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """First k candidates of each row by (value desc, column asc); ``cols`` ascend within a row."""
    counts = torch.bincount(rows, minlength=nrows)
    starts = counts.cumsum(0) - counts
    width = int(counts.max())
    pos = torch.arange(rows.numel(), device=rows.device) - starts[rows]
    pv = vals.new_full((nrows, width), _NEG_INF)
    pc = cols.new_zeros((nrows, width))
    pv[rows, pos] = vals
    pc[rows, pos] = cols
    order = torch.sort(pv, dim=1, descending=True, stable=True).indices[:, :k]
    return pv.gather(1, order), pc.gather(1, order)


def select_largest(S: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of each row of ``S`` by (value desc, column asc), by thresholding.

    Every entry ``>=`` the group threshold is a candidate (ties at the threshold included, so the
    tie-break by column is exact); each row needs at least k finite entries. Robust to any number of
    ties (candidates are processed in row chunks of bounded size); used as the fallback of
    ``select_largest_two_level``.

    Returns:
        values [rows, k] and column indices [rows, k] (int64).
    """
    b = S.shape[0]
    mask = S >= _group_threshold(S, k)
    counts = mask.sum(dim=1)
    vals = S.new_empty(b, k)
    cols = torch.empty(b, k, dtype=torch.int64, device=S.device)
    cap = max(S.numel() // 8, S.shape[1])
    for r0, r1 in _row_chunks(counts, cap):
        rr, cc = mask[r0:r1].nonzero(as_tuple=True)
        v, c = _sorted_candidates(rr, cc, S[r0:r1][rr, cc], r1 - r0, k)
        vals[r0:r1], cols[r0:r1] = v, c
    return vals, cols


def two_level_candidates(
    S: torch.Tensor, k: int, g: int = GROUP
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Candidates for the top-k of each row of ``S`` from one vectorised pass.

    With ``q = w / g`` (``w`` a multiple of ``g``, ``q >= k + 2``), group ``j`` is the strided column
    set ``{j + q t : t < g}``. The ``k + 2`` groups with the largest maxima are expanded into
    ``g (k + 2)`` candidates, listed in ascending column order. Every entry outside them lies in a
    group whose maximum is ``<= bound`` = the smallest selected group maximum, so whenever the k-th
    largest candidate is ``> bound`` the candidates contain the exact top-k, ties included.

    Returns:
        candidate values [rows, g (k+2)], their columns (int64, ascending), and ``bound`` [rows].
    """
    b, w = S.shape
    q = w // g
    top = S.view(b, g, q).amax(dim=1).topk(k + 2, dim=1, sorted=True)
    grp = top.indices.sort(dim=1).values
    cols = (grp[:, None, :] + q * torch.arange(g, device=S.device)[None, :, None]).reshape(b, -1)
    return S.gather(1, cols), cols, top.values[:, -1]


def _stable_top(vals: torch.Tensor, cols: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """First k of each row by (value desc, position asc), sorted.

    Same result as a stable descending sort, but via ``topk`` on unique int64 keys
    ``(order-preserving int32 of the float) << 32 | (2^31 - 1 - position)`` (~1.5x faster here);
    ``-0.0`` is folded into ``+0.0`` first so that they tie as floats do.
    """
    bits = (vals + 0.0).view(torch.int32)
    key = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(torch.int64) << 32
    key |= 0x7FFFFFFF - torch.arange(vals.shape[1], device=vals.device)
    order = key.topk(k, dim=1, sorted=True).indices
    return vals.gather(1, order), cols.gather(1, order)


def select_largest_two_level(S: torch.Tensor, k: int, g: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of each row by (value desc, column asc) via ``two_level_candidates``.

    Rows whose k-th candidate is not above the bound (only possible with tied group maxima) are
    redone by ``select_largest``.
    """
    cand, cols, bound = two_level_candidates(S, k, g)
    vals, cols = _stable_top(cand, cols, k)
    bad = (vals[:, -1] <= bound).nonzero().flatten()
    if bad.numel():
        vals[bad], cols[bad] = select_largest(S[bad], k)
    return vals, cols


# ----------------------------------------------------------------------------------------------------
# tiled score computation shared by the "torch" and "hybrid" backends
#
# Scores are sign * (x.y - ||x||^2/2 - ||y||^2/2) = -sign d^2/2 on mean-centred rows (l2), or
# sign * x.y on unit rows (cosine): sign +1 ("larger is better") for the torch consumer, -1 for the
# faiss max-heap, whose tie-break keeps the smaller id only in that orientation (its min-heap keeps
# the larger). Both forms are symmetric in (x, y), so when the queries are all rows
# only tiles (I, J) with I <= J are computed and each off-diagonal tile also serves J's rows through
# its transpose: half the GEMM flops of the full X @ X.T. Every row receives its columns in
# ascending order (tiles J' < I arrive as transposes in earlier outer iterations), which both
# consumers rely on for the tie-break by index. Tile widths are padded to a multiple of GROUP with
# the consumer's neutral value (-sign inf), which it never selects; self gets the same value.


def tile_size(block_mb: float) -> int:
    """Tile side so that a tile and its transpose (float32) fit in ``block_mb`` MiB (multiple of 64)."""
    return max(64, int(math.sqrt(block_mb * 2**20 / 8)) // 64 * 64)


# Working-memory budget of the score tiles. CPU: 256 MiB (larger tiles gained nothing on 2 cores). CUDA:
# a quarter of the device memory free once X and its float32 copy are resident, between 256 MiB and
# 2 GiB: on an H200, N=200k D=4096 took 5.5 s with 256 MiB tiles and 4.5 s with 2 GiB (N=500k, D=1024:
# 16.4 vs 10.7 s; /work/shared/GPU.md); beyond 2 GiB the tiles no longer shorten the GEMM.
CPU_BLOCK_MB = 256.0
CUDA_BLOCK_MB_RANGE = (256.0, 2048.0)
CUDA_FREE_FRACTION = 0.25


def auto_block_mb(device: torch.device, free_bytes: int | None = None) -> float:
    """The tile budget (MiB) for ``device``: fixed on CPU, from free device memory on CUDA.

    Args:
        device: where the tiles are computed.
        free_bytes: free device memory (default: ``torch.cuda.mem_get_info``); for tests.
    """
    if device.type != "cuda" and free_bytes is None:
        return CPU_BLOCK_MB
    if free_bytes is None:
        free_bytes, _ = torch.cuda.mem_get_info(device)
    lo, hi = CUDA_BLOCK_MB_RANGE
    return float(min(hi, max(lo, CUDA_FREE_FRACTION * free_bytes / 2**20)))


def block_rows(n_gallery: int, block_mb: float) -> int:
    """Query rows per block so that one float32 [rows, n_gallery] score block is ~``block_mb`` MiB."""
    return max(1, int(block_mb * 2**20) // (4 * max(n_gallery, 1)))


class _Tiles:
    """Computes padded score tiles of prepared rows ``G`` (see the comment above)."""

    def __init__(self, G: torch.Tensor, cosine: bool, side: int, sign: float):
        self.G, self.side, self.sign, self.neutral = G, side, sign, -sign * float("inf")
        self.hs = None if cosine else _sq_norms(G).mul_(-0.5 * sign)
        wp = _pad(side)
        self.buf = torch.empty(side * wp, device=G.device)
        self.buft = torch.empty(side * wp, device=G.device)

    def block(self, rows: torch.Tensor | slice, c0: int, c1: int) -> torch.Tensor:
        """Scores of ``G[rows]`` against columns ``c0:c1``, as a [r, pad(c1 - c0)] contiguous tile."""
        xa = self.G[rows] if self.sign > 0 else self.G[rows].neg()
        w = c1 - c0
        full = self.buf[: xa.shape[0] * _pad(w)].view(xa.shape[0], _pad(w))
        S = full[:, :w]
        torch.mm(xa, self.G[c0:c1].T, out=S)
        if self.hs is not None:
            S.add_(self.hs[c0:c1][None, :]).add_(self.hs[rows][:, None])
        full[:, w:] = self.neutral
        return full

    def transposed(self, full: torch.Tensor, w: int) -> torch.Tensor:
        """The transpose of a tile's valid part, padded: [w, pad(rows)]."""
        r = full.shape[0]
        out = self.buft[: w * _pad(r)].view(w, _pad(r))
        for s in range(0, r, 256):  # strips: ~2x faster than one strided copy here (cache)
            out[:, s : s + 256].copy_(full[s : s + 256, :w].T)
        out[:, r:] = self.neutral
        return out


def _pad(w: int) -> int:
    """``w`` rounded up to a multiple of GROUP."""
    return -(-w // GROUP) * GROUP


def _feed_symmetric(G: torch.Tensor, cosine: bool, side: int, consume) -> None:
    """All-rows queries: tiles I <= J, each consumed directly and (I < J) transposed."""
    n, tiles = G.shape[0], _Tiles(G, cosine, side, consume.sign)
    for i0 in range(0, n, side):
        i1 = min(n, i0 + side)
        for j0 in range(i0, n, side):
            j1 = min(n, j0 + side)
            S = tiles.block(slice(i0, i1), j0, j1)
            if i0 == j0:
                S.diagonal().fill_(tiles.neutral)
            consume(i0, j0, S)
            if j0 > i0:
                consume(j0, i0, tiles.transposed(S, j1 - j0))


def _feed_queries(G: torch.Tensor, qid: torch.Tensor, cosine: bool, side: int, consume) -> None:
    """A query subset: blocks of query rows against column tiles in ascending order."""
    n, tiles = G.shape[0], _Tiles(G, cosine, side, consume.sign)
    for s in range(0, qid.numel(), side):
        ids = qid[s : s + side].to(G.device)
        for j0 in range(0, n, side):
            j1 = min(n, j0 + side)
            S = tiles.block(ids, j0, j1)
            hit = ((ids >= j0) & (ids < j1)).nonzero().flatten()
            S[hit, ids[hit] - j0] = tiles.neutral
            consume(s, j0, S)


class _TorchTopK:
    """Running per-row top-k over column tiles fed in ascending order (torch, CPU or CUDA)."""

    sign = 1.0

    def __init__(self, n: int, k: int, device: torch.device):
        self.k = k
        self.vals = torch.full((n, k), _NEG_INF, device=device)
        self.cols = torch.full((n, k), -1, dtype=torch.int64, device=device)

    def __call__(self, r0: int, c0: int, S: torch.Tensor) -> None:
        """Merge tile ``S`` (rows ``r0:``, columns ``c0:``) into the running lists.

        Running entries come first in the stable sort (they hold smaller columns), then the tile's
        candidates in ascending column order, so ties keep index order. If the merged k-th value is
        not above the tile's candidate bound, the row is redone with the tile's exact top-k.
        """
        r1 = r0 + S.shape[0]
        old_v, old_c = self.vals[r0:r1], self.cols[r0:r1]
        if S.shape[1] >= GROUP * (self.k + 2):
            v, c, bound = two_level_candidates(S, self.k)
        else:
            v, c, bound = S, torch.arange(S.shape[1], device=S.device).expand_as(S), None
        new_v, new_c = _stable_top(torch.cat([old_v, v], 1), torch.cat([old_c, c + c0], 1), self.k)
        if bound is not None:
            bad = (new_v[:, -1] <= bound).nonzero().flatten()
            if bad.numel():
                tv, tc = select_largest(S[bad], self.k)
                new_v[bad], new_c[bad] = _stable_top(torch.cat([old_v[bad], tv], 1),
                                                     torch.cat([old_c[bad], tc + c0], 1), self.k)
        self.vals[r0:r1], self.cols[r0:r1] = new_v, new_c

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.vals.cpu(), self.cols.cpu()


class _HeapTopK:
    """Running per-row k smallest scores in faiss's C++ max-heaps (``HeapArray.addn``: one pass,
    OpenMP over rows).

    The heap replaces its largest kept score only on a strict improvement, orders equal scores by id,
    and columns arrive in ascending order, so ties keep the smaller index.
    """

    sign = -1.0

    def __init__(self, n: int, k: int):
        faiss = _faiss()
        self.vals = np.empty((n, k), dtype=np.float32)
        self.ids = np.empty((n, k), dtype=np.int64)
        self.heap = faiss.float_maxheap_array_t()
        self.heap.nh, self.heap.k = n, k
        self.heap.val, self.heap.ids = faiss.swig_ptr(self.vals), faiss.swig_ptr(self.ids)
        self.heap.heapify()
        self._ptr = faiss.swig_ptr

    def __call__(self, r0: int, c0: int, S: torch.Tensor) -> None:
        self.heap.addn(S.shape[1], self._ptr(S.numpy()), c0, r0, S.shape[0])

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.heap.reorder()
        return torch.from_numpy(self.vals), torch.from_numpy(self.ids)


def _knn_tiled(G, qid, k, cosine, block_mb, consumer):
    """Drive tiles into ``consumer``; convert its scores to squared-l2 / cosine distances."""
    side = tile_size(block_mb)
    if qid.numel() == G.shape[0] and bool((qid == torch.arange(G.shape[0])).all()):
        _feed_symmetric(G, cosine, side, consumer)
    else:
        _feed_queries(G, qid, cosine, side, consumer)
    s, idx = consumer.result()
    d = s.mul_(-consumer.sign).add_(1.0) if cosine else s.mul_(-2.0 * consumer.sign)  # in place
    d.clamp_min_(0)
    _sort_rows(d, idx, (d[:, 1:] == d[:, :-1]).any(dim=1).nonzero().flatten())
    return d, idx


def _sort_rows(d: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor) -> None:
    """Re-sort the given rows of (d, idx) in place by (distance, index)."""
    if rows.numel() == 0:
        return
    order = torch.from_numpy(np.lexsort((idx[rows].numpy(), d[rows].numpy()), axis=1))
    d[rows], idx[rows] = d[rows].gather(1, order), idx[rows].gather(1, order)


def _knn_torch(G: torch.Tensor, qid: torch.Tensor, k: int, cosine: bool, block_mb: float):
    """Pure-torch backend (CPU or CUDA)."""
    return _knn_tiled(G, qid, k, cosine, block_mb, _TorchTopK(qid.numel(), k, G.device))


def _knn_hybrid(G: torch.Tensor, qid: torch.Tensor, k: int, cosine: bool, block_mb: float):
    """Torch GEMM tiles + faiss heaps (CPU)."""
    return _knn_tiled(G, qid, k, cosine, block_mb, _HeapTopK(qid.numel(), k))


def _faiss_index(G: np.ndarray, cosine: bool, gpu: bool):
    """A flat faiss index over ``G`` (IP for cosine on unit rows), moved to GPU 0 when ``gpu``."""
    faiss = _faiss()
    index = faiss.IndexFlatIP(G.shape[1]) if cosine else faiss.IndexFlatL2(G.shape[1])
    if gpu:
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    index.add(G)
    return index


def _drop_self(dist: np.ndarray, ids: np.ndarray, qid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Remove each query's own id (at most one per row), else the surplus last column."""
    order = np.argsort(ids == qid[:, None], axis=1, kind="stable")[:, : ids.shape[1] - 1]
    return np.take_along_axis(dist, order, 1), np.take_along_axis(ids, order, 1)


def _knn_faiss(G: torch.Tensor, qid: torch.Tensor, k: int, cosine: bool, block_mb: float):
    """faiss IndexFlat search of k+2, self dropped by id, boundary ties repaired (module docstring)."""
    n = G.shape[0]
    gpu = G.device.type == "cuda" and faiss_gpu_available()
    gn = G.cpu().numpy()
    dist, ids = _faiss_index(gn, cosine, gpu).search(np.ascontiguousarray(gn[qid.numpy()]), min(k + 2, n))
    dist = (1.0 - dist).clip(min=0) if cosine else dist.clip(min=0)
    dist, ids = _drop_self(dist, ids, qid.numpy())
    order = np.lexsort((ids, dist), axis=1)
    dist, ids = np.take_along_axis(dist, order, 1), np.take_along_axis(ids, order, 1)
    if ids.shape[1] > k:
        tied = np.flatnonzero(dist[:, k - 1] == dist[:, k])
        if tied.size:
            d2, i2 = _knn_torch(G, qid[tied], k, cosine, block_mb)
            dist[tied, :k], ids[tied, :k] = d2.numpy(), i2.numpy()
    return (torch.from_numpy(np.ascontiguousarray(dist[:, :k])),
            torch.from_numpy(np.ascontiguousarray(ids[:, :k])))


def _refine_close(G: torch.Tensor, qid: torch.Tensor, d: torch.Tensor, idx: torch.Tensor, cosine: bool):
    """Recompute distances of close pairs from difference vectors (exact 0 for duplicates), re-sort.

    ``d`` and ``idx`` are modified in place. Close: ``d < REFINE_REL`` (cosine) or
    ``d < REFINE_REL * (||x||^2 + ||y||^2)`` (squared l2).
    """
    if cosine:
        close = d < REFINE_REL
    else:
        sq = _sq_norms(G).cpu()
        close = d < REFINE_REL * (sq[qid][:, None] + sq[idx])
    r, c = close.nonzero(as_tuple=True)
    if r.numel() == 0:
        return
    step = max(1, 2**24 // max(G.shape[1], 1))
    for s in range(0, r.numel(), step):
        rr, cc = r[s : s + step], c[s : s + step]
        diff = G[qid[rr].to(G.device)] - G[idx[rr, cc].to(G.device)]
        exact = diff.square().sum(1).cpu()
        d[rr, cc] = 0.5 * exact if cosine else exact
    _sort_rows(d, idx, torch.unique(r))


_IMPLS = {"torch": _knn_torch, "hybrid": _knn_hybrid, "faiss": _knn_faiss}


def knn(
    X: np.ndarray | torch.Tensor,
    k: int,
    *,
    metric: Metric = "l2",
    backend: str = "auto",
    device: str | torch.device = "cpu",
    query_idx: np.ndarray | torch.Tensor | Sequence[int] | None = None,
    block_mb: float | None = None,
    threads: int | None = None,
) -> KnnResult:
    """Exact k nearest neighbours of rows of ``X`` among all other rows of ``X``.

    ``N_k(i)`` = the k rows ``j != i`` with the smallest ``d(x_i, x_j)``, ties broken by smaller ``j``;
    ``d = ||x_i - x_j||_2`` (``l2``) or ``1 - x_i.x_j / (||x_i|| ||x_j||)`` (``cosine``).

    Args:
        X: [N, D] vectors (any float dtype; computed in float32).
        k: neighbours per query, ``1 <= k <= N - 1``.
        metric: ``"l2"`` or ``"cosine"``.
        backend: ``"auto"``, ``"hybrid"``, ``"torch"`` or ``"faiss"`` (see module docstring).
        device: ``"cpu"`` or a CUDA device.
        query_idx: rows of ``X`` to use as queries (default all); self-exclusion uses these ids.
        block_mb: working-memory budget in MiB for the float32 score tiles (a tile and its
            transpose; ``tile_size``). Peak memory is about X + one float32 copy of X (centred or
            unit rows) + ``block_mb`` + the [Q, k] outputs. ``None``: ``auto_block_mb`` (256 MiB
            on CPU; on CUDA a quarter of the free device memory, 256 MiB to 2 GiB).
        threads: CPU threads for torch and faiss during the call (default: leave as set).

    Returns:
        ``KnnResult(indices [Q, k] int64, distances [Q, k] float32)``, rows in ``query_idx`` order.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    dev = torch.device(device)
    G = _as_float32(X, dev)
    n = G.shape[0]
    if not 1 <= k <= n - 1:
        raise ValueError(f"k must be in [1, N-1] = [1, {n - 1}], got {k}")
    be = resolve_backend(backend, dev)
    if be == "faiss" and dev.type == "cuda" and k + 2 > GPU_FAISS_MAX_K:
        log.info("k=%d exceeds GPU faiss's limit %d: using the torch backend", k, GPU_FAISS_MAX_K)
        be = "torch"
    cosine = metric == "cosine"
    qid = _query_ids(query_idx, n)
    with num_threads(threads), torch.no_grad():
        G = _unit_rows(G) if cosine else _centred(G)
        if block_mb is None:
            block_mb = auto_block_mb(dev)
        if qid.numel() == 0:
            d, idx = torch.empty(0, k), torch.empty(0, k, dtype=torch.int64)
        else:
            d, idx = _IMPLS[be](G, qid, k, cosine, block_mb)
            _refine_close(G, qid, d, idx, cosine)
    dist = d if cosine else d.sqrt()
    return KnnResult(idx.numpy().astype(np.int64, copy=False), dist.numpy().astype(np.float32, copy=False))
