"""Exact-capacity assignment and balanced k-means (every cluster gets exactly its share of points).

``balanced_assign`` solves "give point i to cluster j, maximising the total score, with exactly
capacity[j] points per cluster" (a transportation problem) exactly and fast: a greedy pass serves
the points with the most to lose first (assignment regret, recomputed as clusters fill up);
pairwise swaps then move points in bulk; finally cycle canceling moves one point along each edge
of any cluster cycle with a positive total gain until none is left, which is the optimality
condition of min-cost flow. Capacities hold exactly at every step. ``balanced_kmeans`` takes
centroids from scikit-learn's KMeans and alternates that assignment with centroid updates.
"""

from __future__ import annotations

import numpy as np

from surgery.partition.base import normalize_rows


def balanced_assign(scores: np.ndarray, capacities, max_swap_rounds: int = 20) -> np.ndarray:
    """labels[i] in 0..k-1 with exactly capacities[j] labels equal to j, maximising sum scores[i, labels[i]]."""
    scores = np.asarray(scores, dtype=np.float64)
    n, k = scores.shape
    capacities = np.asarray(capacities, dtype=np.int64)
    if capacities.sum() != n or (capacities < 0).any():
        raise ValueError(f"capacities {capacities.tolist()} do not add up to {n} points")
    labels = _greedy_by_regret(scores, capacities)
    _improve_by_swaps(scores, labels, k, max_swap_rounds)
    _cancel_cycles(scores, labels, k)
    return labels


def _greedy_by_regret(scores: np.ndarray, capacities: np.ndarray) -> np.ndarray:
    """Points with the largest gap between their best and second-best open cluster choose first.

    Regrets are computed over the clusters still open; whenever a cluster fills, the regrets of the
    unassigned points are recomputed, so at most k recomputations happen.
    """
    n, k = scores.shape
    labels = np.full(n, -1, dtype=np.int64)
    remaining = capacities.copy()
    pending = np.arange(n)
    while len(pending):
        open_clusters = np.flatnonzero(remaining > 0)
        sub = scores[np.ix_(pending, open_clusters)]
        if len(open_clusters) == 1:
            labels[pending] = open_clusters[0]
            remaining[open_clusters[0]] -= len(pending)
            break
        top2 = -np.partition(-sub, 1, axis=1)[:, :2]
        regret = top2[:, 0] - top2[:, 1]
        best = open_clusters[np.argmax(sub, axis=1)]
        order = np.lexsort((pending, -regret))  # largest regret first; ties by index (deterministic)
        filled = False
        taken = np.zeros(len(pending), dtype=bool)
        for position in order:
            cluster = best[position]
            if remaining[cluster] == 0:
                filled = True  # a cluster closed: recompute regrets for the rest
                break
            labels[pending[position]] = cluster
            remaining[cluster] -= 1
            taken[position] = True
            if remaining[cluster] == 0:
                filled = True
                break
        pending = pending[~taken]
        if not filled and len(pending):
            raise AssertionError("greedy assignment made no progress")
    return labels


def _improve_by_swaps(scores: np.ndarray, labels: np.ndarray, k: int, max_rounds: int) -> None:
    """Swap points between two clusters while the swap raises the total score (capacities unchanged)."""
    for _ in range(max_rounds):
        improved = False
        for a in range(k):
            for b in range(a + 1, k):
                in_a, in_b = np.flatnonzero(labels == a), np.flatnonzero(labels == b)
                if not len(in_a) or not len(in_b):
                    continue
                gain_a = scores[in_a, b] - scores[in_a, a]  # a point of a moving to b
                gain_b = scores[in_b, a] - scores[in_b, b]
                order_a = np.lexsort((in_a, -gain_a))
                order_b = np.lexsort((in_b, -gain_b))
                count = min(len(in_a), len(in_b))
                pair_gain = gain_a[order_a[:count]] + gain_b[order_b[:count]]
                swaps = int(np.sum(np.cumsum(pair_gain > 1e-12) == np.arange(1, count + 1)))
                if swaps:
                    labels[in_a[order_a[:swaps]]] = b
                    labels[in_b[order_b[:swaps]]] = a
                    improved = True
        if not improved:
            return


def _cancel_cycles(scores: np.ndarray, labels: np.ndarray, k: int, max_rounds: int = 100_000) -> None:
    """Move one point along each edge of a cluster cycle a -> b -> ... -> a while that raises the total.

    Capacities stay exact (every cluster gives one point and takes one). When no cycle of clusters
    has a positive total gain, the assignment is optimal (min-cost flow optimality), so this step
    turns the greedy result into an exact optimum; swaps between two clusters are 2-cycles.
    """
    for _ in range(max_rounds):
        gain = np.full((k, k), -np.inf)
        mover = np.zeros((k, k), dtype=np.int64)
        for a in range(k):
            members = np.flatnonzero(labels == a)
            if not len(members):
                continue
            delta = scores[members] - scores[members, a][:, None]
            best = np.argmax(delta, axis=0)
            gain[a] = delta[best, np.arange(k)]
            mover[a] = members[best]
        np.fill_diagonal(gain, -np.inf)
        cycle = _positive_cycle(gain)
        if cycle is None:
            return
        for a, b in zip(cycle, cycle[1:] + cycle[:1]):
            labels[mover[a, b]] = b


def _positive_cycle(gain: np.ndarray, tolerance: float = 1e-9) -> list[int] | None:
    """A cycle of nodes whose edge gains sum to more than `tolerance` (Bellman-Ford on -gain), or None."""
    k = len(gain)
    cost = -gain
    distance = np.zeros(k)
    parent = np.full(k, -1, dtype=np.int64)
    changed = -1
    for _ in range(k):
        changed = -1
        for a in range(k):
            for b in range(k):
                if np.isfinite(cost[a, b]) and distance[a] + cost[a, b] < distance[b] - tolerance:
                    distance[b] = distance[a] + cost[a, b]
                    parent[b] = a
                    changed = b
        if changed < 0:
            return None
    node = changed
    for _ in range(k):  # walk back into the cycle
        node = parent[node]
    cycle = [int(node)]
    walker = parent[node]
    while walker != node:
        cycle.append(int(walker))
        walker = parent[walker]
    cycle.reverse()
    if sum(gain[a, b] for a, b in zip(cycle, cycle[1:] + cycle[:1])) <= tolerance:
        return None
    return cycle


def balanced_kmeans(points: np.ndarray, k: int, seed: int, capacities=None, max_iter: int = 10) -> tuple[np.ndarray, np.ndarray, dict]:
    """Cluster L2-normalised `points` into k clusters of exactly `capacities` (default: equal, +-1).

    Returns (labels, unit centroids, stats) where stats holds the within-cluster cosine spread
    (mean 1 - cos(point, its centroid)) of the balanced result and of unconstrained k-means.
    """
    from sklearn.cluster import KMeans  # lazy: scikit-learn (~45 MiB) only for the strategies that cluster

    points = normalize_rows(np.asarray(points, dtype=np.float32))
    n = len(points)
    if capacities is None:
        capacities = [n // k + (1 if j < n % k else 0) for j in range(k)]
    seeds = plus_plus_seeds(points, k, np.random.default_rng(seed))
    kmeans = KMeans(n_clusters=k, init=seeds, n_init=1, max_iter=100).fit(points)
    centroids = normalize_rows(kmeans.cluster_centers_.astype(np.float32))
    free_spread = _spread(points, normalize_rows(_means(points, kmeans.labels_, k, centroids)), kmeans.labels_)
    labels = None
    for _ in range(max_iter):
        new = balanced_assign(points @ centroids.T, capacities)
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        centroids = normalize_rows(_means(points, labels, k, centroids))
    stats = {"cosine_spread": round(float(_spread(points, centroids, labels)), 4),
             "unconstrained_cosine_spread": round(float(free_spread), 4)}
    return labels, centroids, stats


def plus_plus_seeds(points: np.ndarray, k: int, rng: np.random.Generator, trials: int = 4) -> np.ndarray:
    """k-means++ seeding for unit rows with cosine distances (one matrix-vector product per candidate).

    scikit-learn's own seeding computes float32 distances through a float64 upcast that takes
    minutes on a 7B-sized FFN; on unit vectors ||x - c||^2 = 2 - 2 x.c needs only products.
    """
    n = len(points)
    chosen = [int(rng.integers(n))]
    closest = np.maximum(2.0 - 2.0 * (points @ points[chosen[0]]), 0.0).astype(np.float64)
    for _ in range(1, k):
        total = closest.sum()
        if total <= 0:
            candidates = rng.integers(n, size=trials)
        else:
            candidates = np.searchsorted(np.cumsum(closest), rng.random(trials) * total).clip(max=n - 1)
        distances = np.maximum(2.0 - 2.0 * (points @ points[candidates].T), 0.0)  # [n, trials]
        merged = np.minimum(closest[:, None], distances)
        best = int(np.argmin(merged.sum(axis=0)))
        chosen.append(int(candidates[best]))
        closest = merged[:, best]
    return points[chosen].copy()


def _means(points, labels, k, fallback):
    means = np.array(fallback, dtype=np.float32, copy=True)
    for j in range(k):
        members = points[labels == j]
        if len(members):
            means[j] = members.mean(axis=0, dtype=np.float64)
    return means


def _spread(points, centroids, labels) -> float:
    """Mean over points of 1 - cos(point, centroid of its cluster)."""
    return float(np.mean(1.0 - np.einsum("ij,ij->i", points, centroids[labels])))
