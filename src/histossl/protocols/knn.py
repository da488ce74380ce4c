"""``knn``: weighted k-nearest-neighbour vote on L2-normalised frozen features.

The recipe of Wu et al. 2018 (arXiv:1805.01978) as DINO's ``eval_knn.py`` and solo-learn's
``WeightedKNNClassifier`` run it: cosine similarity to every labelled image, the k most similar
vote for their class with weight ``exp(similarity / T)`` (T = ``downstream.knn_temperature``,
0.07), and the class scores are the normalised votes. Exact (every pair is compared), batched, on
the training device. ``k`` is chosen on the validation split from ``downstream.knn_k_grid`` (capped
at the number of labelled images) by ``select_metric``. The votes are not a calibrated
probability, so the record has no test loss.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from histossl.features import training_device
from histossl.protocols.base import PROTOCOLS, Fitted, Job, Protocol, select_on_validation


@torch.no_grad()
def knn_votes(
    train: torch.Tensor, train_labels: torch.Tensor, queries: torch.Tensor, ks: list[int], temperature: float,
    n_classes: int, batch_size: int = 1024,
) -> dict[int, np.ndarray]:
    """Normalised weighted votes of the ``k`` nearest labelled images, for every ``k`` in ``ks``.

    Args:
        train: ``(n, D)`` features of the labelled images.
        train_labels: ``(n,)`` int64 classes.
        queries: ``(m, D)`` features to classify (same device as ``train``).
        ks: Neighbour counts, each at most ``n``.
        temperature: T of the weight ``exp(cosine / T)``.

    Returns:
        Per k, ``(m, n_classes)`` float64 class shares of the vote (rows sum to 1).
    """
    train = F.normalize(train.float(), dim=1)
    k_max = max(ks)
    out: dict[int, list[np.ndarray]] = {k: [] for k in ks}
    for start in range(0, len(queries), batch_size):
        q = F.normalize(queries[start : start + batch_size].float(), dim=1)
        similarity, index = (q @ train.T).topk(k_max, dim=1)  # (b, k_max), most similar first
        weight = (similarity / temperature).exp()
        neighbour_class = train_labels[index]
        for k in ks:
            votes = torch.zeros(len(q), n_classes, device=q.device, dtype=torch.float64)
            votes.scatter_add_(1, neighbour_class[:, :k], weight[:, :k].double())
            out[k].append((votes / votes.sum(1, keepdim=True)).cpu().numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def as_logits(shares: np.ndarray) -> np.ndarray:
    """Log vote shares: their softmax gives the shares back (a class without votes gets about 1e-12)."""
    return np.log(shares + 1e-12)


@PROTOCOLS.register("knn")
class KNN(Protocol):
    title = "kNN (frozen encoder)"
    has_loss = False

    def fit(self, job: Job) -> Fitted:
        cfg, data, labeled = job.cfg, job.data, job.labeled
        d, n_classes = cfg.downstream, len(data.classes)
        device = training_device(cfg)
        features = np.asarray(job.features, dtype=np.float32)
        train = torch.from_numpy(features[labeled]).to(device)
        train_labels = torch.from_numpy(data.labels[labeled].astype(np.int64)).to(device)
        ks = sorted({min(k, len(labeled)) for k in d.knn_k_grid})

        def votes(rows: np.ndarray, which: list[int]) -> dict[int, np.ndarray]:
            queries = torch.from_numpy(features[rows]).to(device)
            return knn_votes(train, train_labels, queries, which, d.knn_temperature, n_classes)

        on_val = votes(data.val, ks)
        k = select_on_validation(ks, lambda k: as_logits(on_val[k]), data.labels[data.val], n_classes, d.select_metric)

        def logits(rows: np.ndarray) -> np.ndarray:
            return as_logits(votes(rows, [k])[k])

        return Fitted(logits, chosen={"k": k})
