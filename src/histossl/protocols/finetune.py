"""``finetune``: encoder and head trained together on the labelled subset, with light augmentation.

The encoder learns at ``encoder_lr_scale`` times the head's lr; the run stops when validation
(``select_metric``) has not improved for ``patience`` validations, or after ``epochs`` (with ``steps``:
a fixed budget, no early stopping), and the checkpoint of the best validation epoch is kept. The supervised baseline is this protocol from
``random`` (or ``imagenet``) weights.
"""

from __future__ import annotations

import numpy as np

from histossl.models.backbones import build_encoder
from histossl.models.heads import classifier_head
from histossl.protocols.base import PROTOCOLS, Fitted, Job, Protocol
from histossl.train.common import ArrayBatches, loader
from histossl.train.downstream import DownstreamModule, class_weights, finetune_epochs, fit_and_select, predict, run_lr
from histossl.train.pretrain import prepare_encoder


@PROTOCOLS.register("finetune")
class Finetune(Protocol):
    title = "Fine-tuned encoder"
    uses_lr_schedule = True
    trains_encoder = True
    uses_features = False

    def fit(self, job: Job) -> Fitted:
        cfg, spec, data, labeled = job.cfg, job.spec, job.data, job.labeled
        d = cfg.downstream
        lr = run_lr(cfg, spec.lr_schedule)
        weights = class_weights(data.labels[labeled], len(data.classes)) if d.class_weighted else None
        batch = min(d.batch_size, len(labeled))
        drop_last = len(labeled) % batch == 1  # a last batch of one breaks batch norm
        encoder = build_encoder(cfg.backbone, spec.init)
        head = classifier_head(encoder.num_features, len(data.classes), d.head, d.hidden_dim, d.dropout)
        prepare_encoder(encoder, cfg)
        module = DownstreamModule(encoder, head, cfg, lr, spec.lr_schedule, weights)
        train_loader = loader(ArrayBatches(data.images, labeled, data.labels), batch, shuffle=True, drop_last=drop_last,
                              cfg=cfg.trainer, seed=spec.seed)
        val_loader = loader(ArrayBatches(data.images, data.val, data.labels), 256, False, False, cfg.trainer, spec.seed)
        plan = finetune_epochs(d, len(train_loader))
        trained = fit_and_select(cfg, module, train_loader, val_loader, job.run_dir, plan, early_stopping=d.steps is None)
        if trained is None:  # a rank other than 0 of a multi-process fit
            return None

        def logits(rows: np.ndarray) -> np.ndarray:
            return predict(module, data.images, rows)

        return Fitted(logits, lr=lr, epochs=plan.epochs, **trained.fields())
