"""Evaluation protocols, registered by name: how a (frozen or trained) encoder is scored on labels.

A protocol is one file: a ``Protocol`` subclass that declares its axes (an lr schedule or not,
whether it trains the encoder, whether it reads the feature store) and fits on a labelled subset,
choosing whatever it chooses on the validation split. ``train.downstream.run`` does the rest
(threshold, test metrics, the record). Add one with::

    @PROTOCOLS.register("nearest_centroid")
    class NearestCentroid(Protocol):
        def fit(self, job: Job) -> Fitted: ...

and name it in ``downstream.protocols``.
"""

from histossl.protocols.base import PROTOCOLS, Fitted, Job, Protocol, select_on_validation

# Importing a protocol's file registers it.
from histossl.protocols import finetune, frozen, knn, linear  # noqa: E402,F401  isort: skip

__all__ = ["PROTOCOLS", "Fitted", "Job", "Protocol", "select_on_validation"]
