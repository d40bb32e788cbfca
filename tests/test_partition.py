"""Split strategies and their building blocks, on small synthetic layers (no model needed)."""

import numpy as np
import pytest

from surgery.errors import SurgeryError
from surgery.execution.routers.measure import oracle_hit_rate
from surgery.execution.routers.registry import make
from surgery.execution.routers.request import RouterRequest
from surgery.partition import LayerInputs, Partition, default_shared, files, strategy
from surgery.partition.balanced import balanced_assign, balanced_kmeans
from surgery.partition.base import normalize_rows


def layer_inputs(ffn=48, experts=4, shared=0, seed=0, weights=None, **extra):
    rng = np.random.default_rng(123)
    weights = weights or {"gate": rng.standard_normal((ffn, 16)).astype(np.float32),
                          "up": rng.standard_normal((ffn, 16)).astype(np.float32),
                          "down": rng.standard_normal((16, ffn)).astype(np.float32)}
    return LayerInputs(layer=0, ffn=ffn, num_experts=experts, shared_count=shared, seed=seed,
                       read=lambda role: weights[role], **extra)


def planted_rows(groups=4, per_group=12, dim=16, noise=0.05, seed=0):
    """Rows near `groups` orthogonal directions, shuffled; returns (rows, true group of each row)."""
    rng = np.random.default_rng(seed)
    truth = rng.permutation(np.repeat(np.arange(groups), per_group))
    directions = np.eye(dim, dtype=np.float32)[:groups]
    rows = directions[truth] + noise * rng.standard_normal((len(truth), dim)).astype(np.float32)
    return rows, truth


def same_grouping(experts, truth):
    """Each expert holds exactly one planted group."""
    return sorted(tuple(sorted(e.tolist())) for e in experts) == sorted(
        tuple(np.flatnonzero(truth == g).tolist()) for g in np.unique(truth))


# ------------------------------------------------------------------ balanced assignment
@pytest.mark.parametrize("seed", range(6))
def test_balanced_assignment_is_optimal_and_exactly_balanced(seed):
    from scipy.optimize import linear_sum_assignment

    rng = np.random.default_rng(seed)
    n, k = 90 + seed, 3 + seed % 4
    scores = rng.standard_normal((n, k))
    capacities = [n // k + (1 if j < n % k else 0) for j in range(k)]
    labels = balanced_assign(scores, capacities)
    assert np.bincount(labels, minlength=k).tolist() == capacities
    replicated = np.repeat(np.arange(k), capacities)  # the optimum: one slot per unit of capacity
    rows, slots = linear_sum_assignment(-scores[:, replicated])
    assert scores[np.arange(n), labels].sum() == pytest.approx(scores[rows, replicated[slots]].sum(), abs=1e-9)


def test_balanced_assignment_honours_uneven_capacities():
    scores = np.zeros((10, 3))
    scores[:, 0] = 1.0  # every point prefers cluster 0
    labels = balanced_assign(scores, [2, 3, 5])
    assert np.bincount(labels, minlength=3).tolist() == [2, 3, 5]


def test_balanced_kmeans_recovers_planted_equal_clusters():
    rows, truth = planted_rows()
    labels, centroids, stats = balanced_kmeans(rows, 4, seed=0)
    assert same_grouping([np.flatnonzero(labels == j) for j in range(4)], truth)
    assert stats["cosine_spread"] == pytest.approx(stats["unconstrained_cosine_spread"]) and stats["cosine_spread"] < 0.05
    assert np.allclose(np.linalg.norm(centroids, axis=1), 1, atol=1e-5)


def test_balanced_kmeans_forces_equal_sizes_on_unequal_data():
    rows, _ = planted_rows(groups=2, per_group=20)
    rows = np.concatenate([rows, rows[:8]])  # 48 points, groups of 24 and 24 +- duplicates
    labels, _, stats = balanced_kmeans(rows[:36], 4, seed=1)
    assert np.bincount(labels).tolist() == [9, 9, 9, 9]
    assert stats["cosine_spread"] >= stats["unconstrained_cosine_spread"] - 1e-9


# ------------------------------------------------------------------ strategies
def test_random_cuts_a_shuffle_into_equal_disjoint_parts():
    partition = strategy("random").split(layer_inputs(ffn=46, experts=4))
    sizes = sorted(len(e) for e in partition.experts)
    assert sizes == [11, 11, 12, 12]
    assert sorted(np.concatenate(partition.experts).tolist()) == list(range(46))
    assert not any(np.array_equal(e, np.arange(e[0], e[0] + len(e))) for e in partition.experts)  # shuffled


def test_random_depends_on_seed_and_layer_only():
    a = strategy("random").split(layer_inputs(seed=3))
    b = strategy("random").split(layer_inputs(seed=3))
    c = strategy("random").split(layer_inputs(seed=4))
    assert all(np.array_equal(x, y) for x, y in zip(a.experts, b.experts))
    assert not all(np.array_equal(x, y) for x, y in zip(a.experts, c.experts))


@pytest.mark.parametrize("cluster_on", ["up", "gate", "gate+up"])
def test_clustering_groups_neurons_with_similar_rows(cluster_on):
    rows, truth = planted_rows()
    other = np.random.default_rng(9).standard_normal(rows.shape).astype(np.float32)
    weights = {"up": rows if "up" in cluster_on else other, "gate": rows if "gate" in cluster_on else other,
               "down": np.ones((16, 48), dtype=np.float32)}
    partition = strategy("clustering").split(layer_inputs(weights=weights, cluster_on=cluster_on))
    assert same_grouping(partition.experts, truth)
    assert "cosine_spread" in partition.stats


def test_shared_norm_shares_the_neurons_with_the_largest_weight_norms():
    inputs = layer_inputs(ffn=40, experts=4, shared=8)
    score = np.linalg.norm(inputs.weight("down"), axis=0) * np.linalg.norm(inputs.weight("up"), axis=1)
    partition = strategy("shared-norm").split(inputs)
    assert sorted(partition.shared.tolist()) == sorted(np.argsort(-score)[:8].tolist())
    assert [len(e) for e in partition.experts] == [8, 8, 8, 8]
    partition.check(40, "test")


def block_importance(ffn=48, clusters=4, seed=0):
    """Cluster j finds block j of the neurons important (plus noise)."""
    rng = np.random.default_rng(seed)
    importance = 0.1 * rng.random((clusters, ffn))
    block = ffn // clusters
    for j in range(clusters):
        importance[j, j * block:(j + 1) * block] += 1.0
    return importance


def test_sharing_inner_gives_each_expert_its_clusters_top_neurons():
    importance = block_importance()
    partition = strategy("sharing-inner").split(layer_inputs(importance=importance))
    for j, expert in enumerate(partition.experts):
        assert set(range(12 * j, 12 * j + 12)) <= set(expert.tolist())


def test_sharing_inner_may_overlap_but_holds_every_neuron():
    rng = np.random.default_rng(1)
    importance = rng.random((4, 48)) + 2.0 * rng.random(48)  # many neurons important to every cluster
    partition = strategy("sharing-inner").split(layer_inputs(importance=importance))
    assert partition.overlapping and partition.stats["neurons_in_several_experts"] > 0
    assert (partition.holders(48) >= 1).all()
    partition.check(48, "test")


def test_sharing_inter_shares_neurons_important_to_every_cluster():
    importance = block_importance()
    everywhere = [5, 17, 29, 41]
    importance[:, everywhere] = 5.0
    partition = strategy("sharing-inter").split(layer_inputs(importance=importance, shared=4))
    assert sorted(partition.shared.tolist()) == everywhere
    for j, expert in enumerate(partition.experts):
        assert set(expert.tolist()) == set(range(12 * j, 12 * j + 12)) - set(everywhere)


def test_coactivation_keeps_neurons_that_fire_together_in_one_expert():
    rng = np.random.default_rng(0)
    truth = rng.permutation(np.repeat(np.arange(4), 12))
    tokens = 400
    active_group = rng.integers(4, size=tokens)  # each token fires (most of) one group
    fires = (truth[None, :] == active_group[:, None]) & (rng.random((tokens, 48)) < 0.9)
    partition = strategy("coactivation").split(layer_inputs(firing=np.packbits(fires, axis=1)))
    assert same_grouping(partition.experts, truth)
    assert partition.stats["coactivation_within_experts"] > 0.9


def test_strategies_with_a_shared_part_default_to_one_expert_worth():
    assert default_shared("sharing-inter", 352, 8) == 352 - 8 * 39
    assert default_shared("shared-norm", 44, 4) == 44 - 4 * 8
    assert default_shared("random", 352, 8) == 0


def test_unknown_strategy_is_refused_with_the_choices():
    with pytest.raises(SurgeryError, match="expected one of: random, clustering"):
        strategy("kmeans")


# ------------------------------------------------------------------ checks and files
@pytest.mark.parametrize("experts, shared, message", [
    ([[0, 1], [2]], [], "neuron 3 is in no expert"),
    ([[0, 1], [2, 3, 9]], [], "neuron 9 is out of range"),
    ([[0, 1], [2, 3]], [3], "both shared and in a routed expert"),
    ([[0, 1], []], [2, 3], "expert 1 holds no neuron"),
])
def test_partition_check_refuses_what_would_break_the_split(experts, shared, message):
    with pytest.raises(SurgeryError, match=message):
        Partition(experts, shared).check(4, "layer 0")


@pytest.mark.parametrize("suffix", [".json", ".npz"])
def test_partition_files_round_trip_and_are_byte_stable(tmp_path, suffix):
    partitions = {0: Partition([[3, 1], [0, 2, 5]], [4]), 2: Partition([[0, 1, 2], [3, 4]], [5])}
    files.save(tmp_path / f"a{suffix}", partitions, strategy="random", ffn=6)
    files.save(tmp_path / f"b{suffix}", partitions, strategy="random", ffn=6)
    assert (tmp_path / f"a{suffix}").read_bytes() == (tmp_path / f"b{suffix}").read_bytes()
    meta, loaded = files.load(tmp_path / f"a{suffix}")
    assert meta["strategy"] == "random" and meta["intermediate_size"] == 6 and sorted(loaded) == [0, 2]
    assert [e.tolist() for e in loaded[0].experts] == [[3, 1], [0, 2, 5]] and loaded[2].shared.tolist() == [5]


def test_a_file_that_is_not_a_partition_is_refused(tmp_path):
    (tmp_path / "p.json").write_text('{"hello": 1}')
    with pytest.raises(SurgeryError, match="not a partition file"):
        files.load(tmp_path / "p.json")


# ------------------------------------------------------------------ routers
def test_calibrated_router_ranks_experts_by_activation_mass():
    rng = np.random.default_rng(0)
    inputs = rng.standard_normal((2000, 16))
    directions = rng.standard_normal((16, 8))
    masses = np.exp(inputs @ directions / 4)  # expert mass grows with the input's projection on its direction
    router = make("ridge", RouterRequest(8, 16, inputs=inputs, targets=masses)).rows.numpy()
    assert router.shape == (8, 16)
    assert oracle_hit_rate(inputs, masses, router, 2) > 0.9
    assert oracle_hit_rate(inputs, masses, rng.standard_normal((8, 16)), 2) < 0.5


def test_centroid_router_points_each_expert_at_its_neurons_gate_direction():
    rows, truth = planted_rows()
    partition = Partition([np.flatnonzero(truth == g) for g in range(4)])
    router = make("centroid", RouterRequest(4, 16, inputs=normalize_rows(rows), targets=partition.experts)).rows.numpy()
    logits = np.eye(16)[:4] @ router.T  # an input along group g's direction
    assert np.argmax(logits, axis=1).tolist() == [0, 1, 2, 3]
