"""How long the rest of a study's downstream runs should take, from the wall times of its own runs.

A run is timed like the recorded runs of its kind (fine-tuning, or a protocol on stored features)
at its label budget, else like the recorded runs of its kind at any budget; with neither there is no
estimate yet. The study logs it after each run, so a CPU user knows whether the study ends this
afternoon (an estimate at this machine's pace, not a promise: early stopping varies run to run).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

Kind = bool  # the protocol trains the encoder (fine-tuning) or reads stored features
Budget = tuple[float | None, int | None]  # (label_fraction, shots)


class Pace:
    """Wall times of a study's runs by kind and budget; ``left`` estimates the runs still to come."""

    def __init__(self) -> None:
        self.seconds: dict[tuple[Kind, Budget], list[float]] = defaultdict(list)

    def add(self, trains_encoder: Kind, budget: Budget, wall_s: Any) -> None:
        if isinstance(wall_s, int | float) and not isinstance(wall_s, bool) and wall_s >= 0:
            self.seconds[(trains_encoder, budget)].append(float(wall_s))

    def estimate(self, trains_encoder: Kind, budget: Budget) -> float | None:
        same = self.seconds.get((trains_encoder, budget))
        if same:
            return sum(same) / len(same)
        kind = [s for (k, _), values in self.seconds.items() if k == trains_encoder for s in values]
        return sum(kind) / len(kind) if kind else None

    def left(self, runs: list[tuple[Kind, Budget]]) -> float | None:
        """Seconds for ``runs`` at this pace; None while any of them has no estimate."""
        total = 0.0
        for kind, budget in runs:
            one = self.estimate(kind, budget)
            if one is None:
                return None
            total += one
        return total


def duration(seconds: float) -> str:
    """``45 s``, ``14.0 min``, ``2.6 h`` (the report's compute times too)."""
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.0f} s"
