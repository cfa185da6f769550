"""Exact inner-product top-k over a gallery of any size, read in chunks (torch).

:func:`exact_topk` is the reference search used by evaluation and by the
``exact`` backend. It never materialises the full query x gallery score matrix:
the gallery is read in chunks (a float16 memory map is upcast one chunk at a
time), queries in blocks of at most 2^25 scores, and a running top-k is merged
after each chunk. Peak extra memory is about one float32 gallery chunk
(``chunk_size x D x 4`` bytes, 128 MiB for D = 512) plus one 128 MiB score block,
whatever the gallery size.

Tie rule (shared with :mod:`zscir.eval.metrics`): among equal scores the lower
gallery index ranks first, so the same scores always give the same ranking.
(FAISS backends are approximate and make no tie promise.)
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch

ArrayLike = Union[torch.Tensor, np.ndarray]

# at most this many float32 scores per block (128 MB): queries are processed in blocks below it
_SCORE_BLOCK_ELEMENTS = 1 << 25


def _gallery_chunk(gallery: ArrayLike, start: int, end: int, device: torch.device) -> torch.Tensor:
    """Rows [start, end) of the gallery as a float32 tensor on `device` (float16 upcast here, per chunk)."""
    if isinstance(gallery, torch.Tensor):
        chunk = gallery[start:end]
    else:
        chunk = torch.from_numpy(np.asarray(gallery[start:end], dtype=np.float32))  # a fresh, writable float32 copy
    return chunk.to(device=device, dtype=torch.float32)


def _sorted_by_score_then_index(values: torch.Tensor, indices: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sort each row by score (descending), equal scores by index (ascending)."""
    order = indices.argsort(dim=1, stable=True)
    values, indices = values.gather(1, order), indices.gather(1, order)
    order = values.argsort(dim=1, descending=True, stable=True)
    return values.gather(1, order), indices.gather(1, order)


def _block_topk(scores: torch.Tensor, k: int, offset: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-k of a score block with exact tie handling at the k-th value (lowest indices win)."""
    width = scores.shape[1]
    # one extra candidate tells whether the k-th score is tied with an item left out
    values, cols = scores.topk(min(k + 1, width), dim=1, largest=True, sorted=True)
    if values.shape[1] > k:
        boundary_tied = values[:, k] == values[:, k - 1]
        values, cols = values[:, :k].contiguous(), cols[:, :k].contiguous()
        # torch.topk picks arbitrary members among equal k-th scores: redo those rows by index order
        for row in torch.nonzero(boundary_tied).flatten().tolist():
            kth = values[row, k - 1]
            above = values[row] > kth
            tied = torch.nonzero(scores[row] == kth).flatten()[: k - int(above.sum())]
            cols[row] = torch.cat([cols[row][above], tied])
            values[row] = torch.cat([values[row][above], scores[row, tied]])
    return _sorted_by_score_then_index(values, cols + offset)


def _exclusion_pairs(exclude: Sequence[Sequence[int]], n_queries: int, n_gallery: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Flatten per-query exclusions into (query, gallery) index pairs sorted by gallery index."""
    if len(exclude) != n_queries:
        raise ValueError(f"exclude has {len(exclude)} entries but there are {n_queries} queries (one list per query)")
    qs, gs = [], []
    for qi, items in enumerate(exclude):
        for g in items if items is not None else ():
            g = int(g)
            if not 0 <= g < n_gallery:
                raise IndexError(f"exclude[{qi}] contains gallery index {g}, outside 0..{n_gallery - 1}")
            qs.append(qi)
            gs.append(g)
    q = torch.tensor(qs, dtype=torch.long)
    g = torch.tensor(gs, dtype=torch.long)
    order = g.argsort(stable=True)
    return q[order], g[order]


def exact_topk(
    queries: ArrayLike,
    gallery: ArrayLike,
    k: int,
    chunk_size: int = 65536,
    exclude: Optional[Sequence[Sequence[int]]] = None,
    progress: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact inner-product top-k of queries [Q, D] over a gallery [N, D] (tensor, array or memmap), chunked.

    Returns ``(scores [Q, k'] float32, indices [Q, k'] int64)`` with ``k' = min(k, N)``,
    best first; equal scores are ordered by gallery index, lower first.
    ``exclude[i]`` lists gallery indices never returned for query i; when a query
    has fewer than k' candidates left, its row is padded with score ``-inf`` and
    index ``-1``. Non-finite values in queries or gallery raise ValueError naming
    the row. Results are on the queries' device.
    """
    from tqdm.auto import tqdm

    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    q = queries if isinstance(queries, torch.Tensor) else torch.from_numpy(np.asarray(queries))
    if q.ndim != 2:
        raise ValueError(f"queries must be 2-D [Q, D], got shape {tuple(q.shape)}")
    if gallery.ndim != 2:
        raise ValueError(f"gallery must be 2-D [N, D], got shape {tuple(gallery.shape)}")
    n, dim = int(gallery.shape[0]), int(gallery.shape[1])
    if q.shape[1] != dim:
        raise ValueError(f"queries have dimension {q.shape[1]} but the gallery has {dim}")
    if n == 0:
        raise ValueError("the gallery is empty")
    device = q.device
    q = q.detach().to(torch.float32)
    bad = torch.nonzero(~torch.isfinite(q).all(dim=1)).flatten()
    if len(bad):
        raise ValueError(f"queries contain NaN/inf in {len(bad)} row(s), e.g. query {int(bad[0])}")
    n_queries = q.shape[0]
    k = min(k, n)
    if n_queries == 0:
        return torch.empty(0, k, device=device), torch.empty(0, k, dtype=torch.long, device=device)
    ex_q = ex_g = None
    if exclude is not None:
        ex_q, ex_g = _exclusion_pairs(exclude, n_queries, n)
    q_block = max(1, min(n_queries, _SCORE_BLOCK_ELEMENTS // min(chunk_size, n)))

    best_v = torch.full((n_queries, 0), float("-inf"), device=device)
    best_i = torch.full((n_queries, 0), -1, dtype=torch.long, device=device)
    bar = tqdm(total=n, desc="search", unit="item", disable=not progress)
    for start in range(0, n, chunk_size):
        end = min(n, start + chunk_size)
        g = _gallery_chunk(gallery, start, end, device)
        finite = torch.isfinite(g.sum(dim=1))  # a NaN/inf anywhere in a row makes its sum non-finite
        if not bool(finite.all()):
            row = start + int(torch.nonzero(~finite)[0])
            raise ValueError(f"gallery contains NaN/inf, e.g. in row {row}")
        if ex_g is not None:
            lo, hi = torch.searchsorted(ex_g, torch.tensor([start, end])).tolist()
            chunk_ex_q, chunk_ex_g = ex_q[lo:hi].to(device), (ex_g[lo:hi] - start).to(device)
        kk = min(k, end - start)
        new_v = torch.empty(n_queries, kk, device=device)
        new_i = torch.empty(n_queries, kk, dtype=torch.long, device=device)
        for qs in range(0, n_queries, q_block):
            qe = min(n_queries, qs + q_block)
            scores = q[qs:qe] @ g.T
            if ex_g is not None and len(chunk_ex_g):
                in_block = (chunk_ex_q >= qs) & (chunk_ex_q < qe)
                scores[chunk_ex_q[in_block] - qs, chunk_ex_g[in_block]] = float("-inf")
            new_v[qs:qe], new_i[qs:qe] = _block_topk(scores, kk, start)
            del scores
        # both lists are sorted (score desc, index asc) and every new index is larger, so a stable
        # sort of the concatenation keeps the tie rule
        cat_v = torch.cat([best_v, new_v], dim=1)
        cat_i = torch.cat([best_i, new_i], dim=1)
        order = cat_v.argsort(dim=1, descending=True, stable=True)[:, :k]
        best_v, best_i = cat_v.gather(1, order), cat_i.gather(1, order)
        bar.update(end - start)
    bar.close()
    best_i = best_i.masked_fill(torch.isneginf(best_v), -1)  # excluded items that filled short rows
    return best_v, best_i
