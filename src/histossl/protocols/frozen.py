"""``frozen``: an MLP (or linear, ``downstream.head``) head trained on the frozen encoder's stored features.

The head trains with the run's lr schedule on one CPU process until validation (``select_metric``)
has not improved for ``patience`` epochs, or for at most ``frozen_epochs``; the epoch with the best
validation metric is kept.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from histossl.models.heads import classifier_head
from histossl.protocols.base import PROTOCOLS, Fitted, Job, Protocol
from histossl.train.common import EpochShuffle
from histossl.train.downstream import DownstreamModule, class_weights, fit_and_select, run_lr, with_min_steps


@PROTOCOLS.register("frozen")
class Frozen(Protocol):
    title = "Frozen encoder"
    uses_lr_schedule = True

    def fit(self, job: Job) -> Fitted:
        cfg, spec, data, labeled = job.cfg, job.spec, job.data, job.labeled
        d = cfg.downstream
        features = np.asarray(job.features, dtype=np.float32)
        lr = run_lr(cfg, spec.lr_schedule)
        weights = class_weights(data.labels[labeled], len(data.classes)) if d.class_weighted else None
        batch = min(d.batch_size, len(labeled))
        drop_last = len(labeled) % batch == 1  # a last batch of one breaks batch norm
        head = classifier_head(features.shape[1], len(data.classes), d.head, d.hidden_dim, d.dropout)
        module = DownstreamModule(None, head, cfg, lr, spec.lr_schedule, weights)
        train_set = TensorDataset(torch.from_numpy(features[labeled]), torch.from_numpy(data.labels[labeled]))
        val_set = TensorDataset(torch.from_numpy(features[data.val]), torch.from_numpy(data.labels[data.val]))
        train_loader = DataLoader(train_set, batch_size=batch, sampler=EpochShuffle(train_set, spec.seed), drop_last=drop_last)
        val_loader = DataLoader(val_set, batch_size=1024)
        plan = with_min_steps(d, d.frozen_epochs, 1, len(train_loader))
        epochs = plan.epochs
        trained = fit_and_select(cfg, module, train_loader, val_loader, job.run_dir, plan, early_stopping=True)

        @torch.no_grad()
        def logits(rows: np.ndarray) -> np.ndarray:
            return module.head(torch.from_numpy(features[rows])).numpy()

        return Fitted(logits, lr=lr, epochs=epochs, **trained.fields())
