"""``linear``: the linear probe, multinomial logistic regression on standardised frozen features.

The standard frozen-encoder measure (lightly's ``linear_eval``, eva, HistoSSLscaling's logistic
regression): features are standardised with the labelled subset's mean and spread, and the inverse
L2 strength ``C`` is chosen on the validation split from ``downstream.linear_c_grid`` by
``select_metric``. scikit-learn's L-BFGS solver, seeded; no lr schedule, no epochs.
"""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from histossl.protocols.base import PROTOCOLS, Fitted, Job, Protocol, select_on_validation

# Score of a class the labelled subset does not hold: never predicted, finite for the metrics.
ABSENT = -1e4


def fit_logistic(x: np.ndarray, y: np.ndarray, c: float, seed: int) -> LogisticRegression:
    """Multinomial (binary for two classes) logistic regression with inverse L2 strength ``c``; ``x`` standardised.

    One BLAS thread: L-BFGS on a few thousand 512-d features does many small products, which a
    multi-threaded BLAS slows down ~10x (measured on a loaded 2-core machine) instead of speeding up.
    """
    with threadpool_limits(limits=1, user_api="blas"):
        return LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(x, y)


def log_probabilities(model: LogisticRegression, x: np.ndarray, n_classes: int) -> np.ndarray:
    """``(len(x), n_classes)`` log-probabilities; classes the model never saw get ``ABSENT``."""
    out = np.full((len(x), n_classes), ABSENT)
    out[:, model.classes_] = model.predict_log_proba(x)
    return out


@PROTOCOLS.register("linear")
class Linear(Protocol):
    title = "Linear probe (frozen encoder)"

    def fit(self, job: Job) -> Fitted:
        d, data, labeled = job.cfg.downstream, job.data, job.labeled
        n_classes = len(data.classes)
        features = np.asarray(job.features, dtype=np.float32)
        scaler = StandardScaler().fit(features[labeled])
        x, y = scaler.transform(features[labeled]), data.labels[labeled]
        if len(np.unique(y)) < 2:  # one class labelled: nothing to regress, that class is predicted
            only = int(y[0])

            def constant(rows: np.ndarray) -> np.ndarray:
                out = np.full((len(rows), n_classes), ABSENT)
                out[:, only] = 0.0
                return out

            return Fitted(constant, chosen={"C": None})
        models = {c: fit_logistic(x, y, c, job.spec.seed) for c in d.linear_c_grid}
        x_val = scaler.transform(features[data.val])
        c = select_on_validation(list(d.linear_c_grid), lambda c: log_probabilities(models[c], x_val, n_classes),
                                 data.labels[data.val], n_classes, d.select_metric)
        model = models[c]

        def logits(rows: np.ndarray) -> np.ndarray:
            return log_probabilities(model, scaler.transform(features[rows]), n_classes)

        return Fitted(logits, chosen={"C": c})
