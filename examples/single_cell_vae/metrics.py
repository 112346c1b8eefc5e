"""How well a representation separates the known cell types (torch only, no sklearn)."""

from __future__ import annotations

import torch

KNN_NEIGHBOURS = 15


def knn_accuracy(
    reference: torch.Tensor,
    reference_labels: torch.Tensor,
    query: torch.Tensor,
    query_labels: torch.Tensor,
    k: int = KNN_NEIGHBOURS,
) -> float:
    """Fraction of query points whose k nearest reference points (Euclidean)
    vote for their label; a tie goes to the smallest label.

    Args:
        reference: [M, D] points with known labels (the training cells).
        reference_labels: [M] int64 in [0, K).
        query: [N, D] points to classify (the held-out cells).
        query_labels: [N] int64, their true labels.
        k: neighbours, at most M (fewer reference points: all of them vote).
    """
    k = min(k, reference.shape[0])
    distances = torch.cdist(query.double(), reference.double())  # [N, M]
    nearest = distances.topk(k, dim=1, largest=False).indices  # [N, k]
    n_labels = int(max(reference_labels.max(), query_labels.max())) + 1
    votes = torch.zeros(query.shape[0], n_labels, dtype=torch.int64)
    votes.scatter_add_(1, reference_labels[nearest], torch.ones_like(nearest))
    # argmax returns the first maximum: the smallest label among tied ones.
    return float((votes.argmax(dim=1) == query_labels).double().mean())


def silhouette_score(points: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean silhouette (Rousseeuw 1987) over the points, Euclidean distances.

    s_i = (b_i - a_i) / max(a_i, b_i), a_i the mean distance to the other
    points of i's cluster, b_i the smallest mean distance to another cluster;
    s_i = 0 for a point alone in its cluster (sklearn's convention). In
    [-1, 1]: near 1, tight and well-separated clusters; near 0, overlapping.

    Args:
        points: [N, D].
        labels: [N] int64, at least two distinct values.

    Raises:
        ValueError: fewer than two clusters.
    """
    present, labels = labels.unique(return_inverse=True)
    if present.numel() < 2:
        raise ValueError("the silhouette needs at least two clusters")
    distances = torch.cdist(points.double(), points.double())  # [N, N]
    one_hot = torch.nn.functional.one_hot(labels, present.numel()).double()  # [N, K]
    sizes = one_hot.sum(dim=0)  # [K]
    to_cluster = distances @ one_hot  # [N, K]: sum of distances to each cluster
    own_size = sizes[labels]
    own = to_cluster.gather(1, labels[:, None]).squeeze(1)
    a = own / (own_size - 1).clamp_min(1)  # the point's own zero distance excluded
    mean_to = to_cluster / sizes
    b = mean_to.scatter(1, labels[:, None], float("inf")).min(dim=1).values
    s = (b - a) / torch.maximum(a, b)
    s = torch.where(own_size > 1, s, torch.zeros_like(s))
    return float(s.mean())


def pca_projection(train: torch.Tensor, dims: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean [D], components [D, dims]) of the training rows' principal axes."""
    centre = train.double().mean(dim=0)
    _, _, vh = torch.linalg.svd(train.double() - centre, full_matrices=False)
    return centre, vh[:dims].T
