"""Classification heads on top of an encoder's features."""

from torch import nn


def classifier_head(in_dim: int, n_classes: int, kind: str = "mlp", hidden_dim: int = 256, dropout: float = 0.0) -> nn.Module:
    """``linear``: one layer; ``mlp``: Linear-BN-ReLU-(Dropout)-Linear, the seed report's MLP head.

    Args:
        in_dim: encoder feature size.
        n_classes: number of output logits.
        kind: ``mlp`` or ``linear``.
        hidden_dim: width of the MLP's hidden layer.
        dropout: dropout before the last layer of the MLP.
    """
    if kind == "linear":
        return nn.Linear(in_dim, n_classes)
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(hidden_dim, n_classes),
    )
