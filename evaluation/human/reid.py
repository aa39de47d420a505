"""Person re-identification: CMC rank-k and mAP with the Market-1501 protocol.

For each query, gallery images of the same identity taken by the same camera are removed, and so are
junk images (identity -1); distractors (identity 0) stay as negatives. A query without any remaining
true match is left out (``valid_queries`` counts the rest). CMC rank-k is the share of queries whose first
true match is among the first k remaining gallery images; AP is the mean over a query's matches of the
precision at each match.

``evaluate_reid`` never sorts the gallery: masks are built for a chunk of queries at once, and a query's
ranks follow from its k true matches alone — the rank of match i is i plus the number of kept negatives
closer than it, counted with one ``searchsorted`` of the negatives' distances into the k sorted match
distances (O(G log k) instead of the O(G log G) ``argsort`` of every row). ``evaluate_reid_reference`` is
the usual per-query loop (torchreid's ``eval_market1501``, with a stable argsort so that equal distances
rank by gallery index); the two give equal results, ties included, see
benchmarks/reid_eval.py.
"""

from __future__ import annotations

import numpy as np

RANKS = (1, 5, 10)
JUNK_ID = -1


def pairwise_distance(query: np.ndarray, gallery: np.ndarray, metric: str = "euclidean") -> np.ndarray:
    """(Q, G) float32 distances: squared-free euclidean, or cosine distance 1 - cos."""
    q, g = np.asarray(query, np.float32), np.asarray(gallery, np.float32)
    if metric == "cosine":
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        g = g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)
        return 1.0 - q @ g.T
    if metric != "euclidean":
        raise ValueError(f"unknown metric {metric!r}: euclidean or cosine")
    d2 = (q * q).sum(1)[:, None] + (g * g).sum(1)[None, :] - 2.0 * (q @ g.T)
    return np.sqrt(np.maximum(d2, 0.0))


def evaluate_reid(distmat: np.ndarray, q_pids: np.ndarray, g_pids: np.ndarray, q_camids: np.ndarray,
                  g_camids: np.ndarray, max_rank: int = 50, ranks: tuple[int, ...] = RANKS,
                  chunk: int = 256) -> dict:
    """CMC (first ``max_rank`` values), ``rank{k}`` for ``ranks``, ``mAP``, ``valid_queries``."""
    dist = np.asarray(distmat, np.float32)
    q_pids, g_pids = np.asarray(q_pids).ravel(), np.asarray(g_pids).ravel()
    q_camids, g_camids = np.asarray(q_camids).ravel(), np.asarray(g_camids).ravel()
    num_q, num_g = dist.shape
    max_rank = min(max_rank, num_g)
    junk = g_pids == JUNK_ID
    first_hits = np.zeros(max_rank + 1, np.int64)
    ap_sum, valid = 0.0, 0
    for s in range(0, num_q, chunk):
        e = min(s + chunk, num_q)
        same = g_pids[None, :] == q_pids[s:e, None]  # (C, G)
        match = same & (g_camids[None, :] != q_camids[s:e, None]) & ~junk[None, :]
        negative = ~same & ~junk[None, :]  # kept images of other identities (distractors included)
        for c in range(e - s):
            d = dist[s + c]
            mi = np.flatnonzero(match[c])  # gallery indices of the true matches
            k = mi.size
            if k == 0:
                continue
            order = np.argsort(d[mi], kind="stable")
            mi = mi[order]
            dm = d[mi]  # (k,) their distances, ascending
            v = d[negative[c]]
            below = np.searchsorted(dm, v, side="right")  # matches ranked before each negative
            tie = (below > 0) & (dm[np.maximum(below - 1, 0)] == v)
            if tie.any():  # equal distances rank by gallery index, as a stable argsort does
                ni, vt = np.flatnonzero(negative[c])[tie], v[tie]
                below[tie] = ((dm[None] < vt[:, None]) | ((dm[None] == vt[:, None]) & (mi[None] < ni[:, None]))).sum(1)
            before = np.cumsum(np.bincount(below, minlength=k + 1))[:k]  # negatives ranked before match i
            rank = np.arange(k) + before  # 0-based rank of each match among the kept images
            ap_sum += float(np.mean(np.arange(1, k + 1) / (rank + 1)))
            first_hits[min(int(rank[0]), max_rank)] += 1
            valid += 1
    if valid == 0:
        raise ValueError("no query has a true match in the gallery (same identity, another camera)")
    cmc = np.cumsum(first_hits[:max_rank]) / valid
    out = {f"rank{k}": float(cmc[k - 1]) for k in ranks if k <= max_rank}
    out.update(mAP=ap_sum / valid, cmc=cmc.tolist(), valid_queries=valid, queries=num_q, gallery=num_g)
    return out


def evaluate_reid_reference(distmat: np.ndarray, q_pids: np.ndarray, g_pids: np.ndarray, q_camids: np.ndarray,
                            g_camids: np.ndarray, max_rank: int = 50, ranks: tuple[int, ...] = RANKS) -> dict:
    """The per-query loop of torchreid's ``eval_market1501`` (numpy, stable argsort of every row): the reference."""
    num_q, num_g = distmat.shape
    max_rank = min(max_rank, num_g)
    indices = np.argsort(distmat, axis=1, kind="stable")  # equal distances: lower gallery index first
    matches = (g_pids[indices] == q_pids[:, np.newaxis]).astype(np.int32)
    all_cmc, all_ap = [], []
    for q_idx in range(num_q):
        order = indices[q_idx]
        remove = ((g_pids[order] == q_pids[q_idx]) & (g_camids[order] == q_camids[q_idx])) | (g_pids[order] == JUNK_ID)
        raw_cmc = matches[q_idx][~remove]
        if not np.any(raw_cmc):
            continue
        cmc = raw_cmc.cumsum()
        cmc[cmc > 1] = 1
        cmc = cmc[:max_rank]
        all_cmc.append(np.pad(cmc, (0, max_rank - cmc.size), constant_values=1))  # fewer images kept than max_rank
        precision = raw_cmc.cumsum() / np.arange(1, raw_cmc.size + 1)
        all_ap.append((precision * raw_cmc).sum() / raw_cmc.sum())
    if not all_cmc:
        raise ValueError("no query has a true match in the gallery (same identity, another camera)")
    cmc = np.asarray(all_cmc, np.float64).sum(0) / len(all_cmc)
    out = {f"rank{k}": float(cmc[k - 1]) for k in ranks if k <= max_rank}
    out.update(mAP=float(np.mean(all_ap)), cmc=cmc.tolist(), valid_queries=len(all_cmc), queries=num_q,
               gallery=num_g)
    return out


__all__ = ["JUNK_ID", "RANKS", "evaluate_reid", "evaluate_reid_reference", "pairwise_distance"]
