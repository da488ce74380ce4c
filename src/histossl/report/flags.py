"""Checks that catch the two mistakes of the hand-made report histossl replaces, and one more.

1. A collapsed downstream run (the seed report's frozen 38.56% run): test accuracy below what
   always predicting the majority class gets (unless the run was chosen for balanced accuracy),
   balanced accuracy at chance, or a non-finite loss.
2. A pretext task whose accuracy never left chance: the encoder learnt nothing from it; for methods
   without a pretext accuracy, an encoder whose embeddings collapsed (``embedding_collapsed``).
3. Two different runs with the same (test loss, test accuracy) to the shown precision: a hint of a
   copied result (the seed report's other mistake) or of a run that did not use its settings.
4. A label budget that leaves a class with fewer than 2 labelled images (5% of a 30-image class
   rounds to 1; a class is never left with none, the subsets keep one): its cells rest on one example.
5. A run that hit its maximum of epochs with early stopping on: its validation metric was still
   improving within the last ``patience`` validations, so the run may be starved (raise the maximum).
6. A pretraining stage trained again after its weights were lost (a study restored from its published
   copy) whose curve is not the first training's: runs recorded before and after used different
   encoders of the same recipe and seed.
7. Runs that read encoders whose stages are not in the study folder while others are (a folder restored
   from a copy published before stages were: those stages' curves, and whether a stage trained again
   matches its first training, cannot be shown).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from histossl.report.records import Stage
from histossl.report.tables import Budget, format_budget

# Balanced accuracy this close to 1/classes counts as chance.
BALANCED_CHANCE_MARGIN = 0.01
# A class with fewer labelled images than this in a run's subset is flagged.
MIN_LABELS_PER_CLASS = 2
# Collapsed embeddings: the per-dimension std of the normalised embeddings fell below this fraction of
# its first epoch's (0 when every image maps to one vector; SimSiam, arXiv 2011.10566, figure 2), or
# the effective rank (RankMe, arXiv 2210.02885) is below this: the embeddings vary along fewer than
# two directions (1: all on one line). 1.5 missed DINO on EBHI at 1.53-1.60 (from ~20 in its first
# epoch), whose frozen features then scored below a randomly initialised encoder's
# (docs/benchmarks/methods-ebhi); BYOL and SimSiam there ended at 2-5 and scored above it.
COLLAPSE_STD_FRACTION = 0.1
COLLAPSE_EFFECTIVE_RANK = 2.0


@dataclass(frozen=True)
class Flag:
    """A warning for the reader. ``runs`` are downstream run folders; ``stage`` a pretraining stage."""

    kind: str  # "diverged" | "collapsed" | "pretext_chance" | "embedding_collapsed" | "identical" | "few_labels" | "hit_maximum" | "remade" | "undescribed"
    message: str
    runs: tuple[str, ...] = ()
    stage: str | None = None


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _pct(value: float) -> str:
    return f"{100 * value:.2f}%"


def number_of_classes(record: dict[str, Any]) -> int | None:
    classes = record.get("classes")
    if isinstance(classes, list) and classes:
        return len(classes)
    matrix = record.get("confusion_matrix")
    if isinstance(matrix, list) and matrix:
        return len(matrix)
    return None


def collapse_reasons(record: dict[str, Any]) -> list[str]:
    """Why a downstream run looks collapsed; empty when it does not."""
    reasons = []
    loss, acc = _num(record.get("test_loss")), _num(record.get("test_acc"))
    majority, balanced = _num(record.get("test_majority_acc")), _num(record.get("test_balanced_acc"))
    if loss is not None and not math.isfinite(loss):
        reasons.append(f"test loss is {loss}")
    # A run whose weights (or threshold) were chosen for balanced accuracy trades plain accuracy for the
    # rare classes: on imbalanced data its accuracy falls below the majority rate by design (EBHI-Seg's
    # 6 classes: nearly every such run), so only the chance test below speaks for it.
    balanced_choice = record.get("select_metric") in ("val_balanced_acc", "val_auroc") or isinstance(_num(record.get("threshold")), float)
    if acc is not None and majority is not None and acc < majority and not balanced_choice:
        reasons.append(f"test accuracy {_pct(acc)} is below the majority-class accuracy {_pct(majority)}")
    n_classes = number_of_classes(record)
    if balanced is not None and n_classes:
        chance = 1.0 / n_classes
        if balanced <= chance + BALANCED_CHANCE_MARGIN:
            reasons.append(f"balanced accuracy {_pct(balanced)} is at chance ({_pct(chance)}, {n_classes} classes)")
    return reasons


def collapsed_runs(records: list[dict[str, Any]]) -> list[Flag]:
    flags = []
    for record in sorted(records, key=lambda r: str(r.get("run"))):
        reasons = collapse_reasons(record)
        if reasons:
            run = str(record.get("run") or record.get("encoder"))
            flags.append(Flag("collapsed", f"Collapsed downstream run `{run}`: " + "; ".join(reasons) + ".", (run,)))
    return flags


def pretext_left_chance(stage: Stage) -> bool | None:
    """Whether the best pretext accuracy rose above chance; ``None`` when it cannot be told."""
    chance, best = stage.chance, stage.best_acc
    if chance is None or best is None:
        return None
    return best >= chance + max(0.02, 0.1 * chance)


def pretext_at_chance(stages: list[Stage]) -> list[Flag]:
    flags = []
    for stage in stages:
        if pretext_left_chance(stage) is False:
            method = stage.info.get("method", "?")
            chain = stage.info.get("chain", "?")
            flags.append(
                Flag(
                    "pretext_chance",
                    f"Pretext task of `{stage.folder}` ({method}, chain `{chain}`) never left chance: best pretext "
                    f"accuracy {_pct(stage.best_acc)} over {len(stage.pretext_acc)} epochs, chance "
                    f"{_pct(stage.chance)}. The encoder learnt nothing from the pretext task.",
                    stage=stage.folder,
                )
            )
    return flags


def embedding_collapsed(stage: Stage) -> bool | None:
    """Whether a stage's last epoch shows collapsed embeddings; ``None`` without the collapse columns."""
    stds = [v for v in stage.embedding_std if v is not None and math.isfinite(v)]
    ranks = [v for v in stage.effective_rank if v is not None and math.isfinite(v)]
    if not stds:
        return None
    return stds[-1] < COLLAPSE_STD_FRACTION * stds[0] or stds[-1] == 0 or bool(ranks and ranks[-1] < COLLAPSE_EFFECTIVE_RANK)


def collapsed_encoders(stages: list[Stage]) -> list[Flag]:
    flags = []
    for stage in stages:
        if embedding_collapsed(stage):
            method, chain = stage.info.get("method", "?"), stage.info.get("chain", "?")
            std = [v for v in stage.embedding_std if v is not None]
            rank = [v for v in stage.effective_rank if v is not None]
            flags.append(
                Flag(
                    "embedding_collapsed",
                    f"Encoder of `{stage.folder}` ({method}, chain `{chain}`) collapsed: in the last epoch the "
                    f"normalised embeddings' per-dimension std is {std[-1]:.2g} (first epoch {std[0]:.2g})"
                    + (f" and their effective rank {rank[-1]:.3g}" if rank else "")
                    + ". Its images map to (nearly) one vector.",
                    stage=stage.folder,
                )
            )
    return flags


def remade_encoders(stages: list[Stage]) -> list[Flag]:
    flags = []
    for stage in stages:
        remade = stage.info.get("remade")
        if isinstance(remade, dict) and not remade.get("same_curve"):
            first = remade.get("first_last_epoch") or {}
            loss = f" (last pretext loss {first.get('pretext_loss')} then, {stage.pretext_loss[-1]:.6g} now)" if first and stage.pretext_loss else ""
            flags.append(
                Flag(
                    "remade",
                    f"Encoder of `{stage.folder}` was pretrained again after its weights were lost (a restored study) "
                    f"and its curve differs from the first training's{loss}: runs recorded before the restore used the "
                    "first encoder, later runs this one; same recipe and seed, not the same weights (another kind of "
                    "CPU or other code rounds differently).",
                    stage=stage.folder,
                )
            )
    return flags


def undescribed_stages(records: list[dict[str, Any]], stages: list[Stage]) -> list[Flag]:
    """One flag when some stages read by the records have no curve here while others do."""
    described = {s.folder for s in stages}
    read = {str(r["pretrain_dir"]).rstrip("/") for r in records if r.get("pretrain_dir")}
    missing = sorted(read - described)
    if not described or not missing:
        return []
    runs = [r for r in records if str(r.get("pretrain_dir", "")).rstrip("/") in missing]
    return [  # the runs are counted, not marked in the tables: their numbers are not in doubt, the curves are missing
        Flag(
            "undescribed",
            f"{len(runs)} runs read encoders of {len(missing)} pretraining stages that are not in this study folder "
            f"({', '.join(f'`{m}`' for m in missing[:3])}{', ...' if len(missing) > 3 else ''}): their curves are "
            "missing, and if stages in the folder were pretrained again after a restore, whether they match the "
            "encoders earlier runs read cannot be checked (another kind of CPU gives other weights for the same seed).",
        )
    ]


def identical_results(records: list[dict[str, Any]]) -> list[Flag]:
    """Distinct runs whose (test loss, test accuracy) agree to the report's precision (4 decimals, 0.01%)."""
    groups: dict[tuple[float, float], list[str]] = {}
    for record in records:
        loss, acc = _num(record.get("test_loss")), _num(record.get("test_acc"))
        if loss is None or acc is None or not (math.isfinite(loss) and math.isfinite(acc)):
            continue
        groups.setdefault((round(loss, 4), round(acc, 4)), []).append(str(record.get("run") or "?"))
    flags = []
    for (loss, acc), runs in groups.items():
        runs = sorted(set(runs))
        if len(runs) > 1:
            names = ", ".join(f"`{r}`" for r in runs)
            flags.append(
                Flag(
                    "identical",
                    f"Runs {names} report the same test loss / accuracy ({loss:.4f} / {_pct(acc)}): "
                    "a copied result, or runs that did not differ as their settings say?",
                    tuple(runs),
                )
            )
    return flags


def few_labels(records: list[dict[str, Any]]) -> list[Flag]:
    """Per label budget, the classes some seed's subset gives fewer than ``MIN_LABELS_PER_CLASS`` images.

    Read from the records' ``labels_per_class`` (records written before it existed are not checked).
    """
    short: dict[Budget, dict[str, set[str]]] = {}
    runs: dict[Budget, set[str]] = {}
    for record in records:
        counts, classes = record.get("labels_per_class"), record.get("classes")
        if not isinstance(counts, list) or not isinstance(classes, list) or len(counts) != len(classes):
            continue
        budget = Budget.of(record)
        for name, count in zip(classes, counts):
            if isinstance(count, int) and count < MIN_LABELS_PER_CLASS:
                short.setdefault(budget, {}).setdefault(f"`{name}` ({count})", set()).add(str(record.get("seed")))
                runs.setdefault(budget, set()).add(str(record.get("run") or "?"))
    flags = []
    for budget in sorted(short, key=lambda b: b.order):
        listed = "; ".join(f"{c} at seed {', '.join(sorted(seeds))}" for c, seeds in sorted(short[budget].items()))
        flags.append(Flag("few_labels", f"Label budget {format_budget(budget)} leaves classes with fewer than "
                          f"{MIN_LABELS_PER_CLASS} labelled images (count in brackets): {listed}; "
                          "its cells rest on too few images of those classes.", tuple(sorted(runs[budget]))))
    return flags


def hit_maximum(records: list[dict[str, Any]]) -> list[Flag]:
    """Runs that ended at their maximum of epochs while early stopping was on (``stopped: max``).

    Early stopping had not fired, so the selected metric improved within the last ``patience``
    validations: the run was still learning when its budget ran out.
    """
    runs = sorted(str(r.get("run") or "?") for r in records if r.get("stopped") == "max")
    if not runs:
        return []
    shown = ", ".join(f"`{r}`" for r in runs[:5]) + (f" and {len(runs) - 5} more" if len(runs) > 5 else "")
    return [Flag("hit_maximum", f"{len(runs)} run(s) reached their maximum of epochs while validation was still "
                 f"improving ({shown}): they may be starved. Their maximum is `downstream.epochs` (fine-tuning) or "
                 "`downstream.frozen_epochs` (heads on frozen features), or what `downstream.min_steps` needs if that "
                 "is more. A cosine schedule decays over the maximum, so its best epoch comes late whatever the "
                 "maximum: whether more training helps is a comparison on validation of a study with twice the "
                 "steps (`downstream.test: false`, `benchmarks/tune_table.py`).", tuple(runs))]


def is_diverged(record: dict[str, Any]) -> bool:
    """A run recorded as diverged (non-finite loss or outputs): it has settings but no metrics."""
    return record.get("status") == "diverged"


def diverged_runs(records: list[dict[str, Any]]) -> list[Flag]:
    """One flag per diverged run, with the settings that made it diverge; such runs are left out of the tables."""
    flags = []
    for record in sorted((r for r in records if is_diverged(r)), key=lambda r: str(r.get("run"))):
        run = str(record.get("run") or record.get("encoder"))
        settings = f"lr {record.get('lr')}, {record.get('lr_schedule')} schedule, {record.get('mode')}"
        flags.append(Flag("diverged", f"Diverged downstream run `{run}` ({settings}): {record.get('diverged') or 'non-finite loss'}; "
                                      "left out of the tables.", (run,)))
    return flags


def find_flags(records: list[dict[str, Any]], stages: list[Stage]) -> list[Flag]:
    """All warnings, in a stable order: diverged runs, collapsed runs, pretext tasks at chance, collapsed
    encoders, encoders remade after a restore, stages missing from the folder, identical results, too few
    labels, starved runs."""
    done = [r for r in records if not is_diverged(r)]
    return (diverged_runs(records) + collapsed_runs(done) + pretext_at_chance(stages) + collapsed_encoders(stages)
            + remade_encoders(stages) + undescribed_stages(records, stages) + identical_results(done) + few_labels(done)
            + hit_maximum(done))
