"""Collapse is measured (std of normalised embeddings, effective rank) and a collapsed encoder is flagged."""

import math

import torch

from histossl.methods.base import collapse_metrics
from histossl.report.flags import collapsed_encoders, embedding_collapsed, find_flags
from histossl.report.records import Stage, load_stages


def test_collapse_metrics_tell_collapsed_from_spread_embeddings():
    g = torch.Generator().manual_seed(0)
    spread = collapse_metrics(torch.randn(256, 64, generator=g))
    assert abs(spread["embedding_std"].item() - 1 / math.sqrt(64)) < 0.01
    assert spread["effective_rank"].item() > 40  # close to 64 for isotropic noise
    collapsed = collapse_metrics(torch.ones(256, 64) + 1e-7 * torch.randn(256, 64, generator=g))
    assert collapsed["embedding_std"].item() < 1e-5
    assert collapsed["effective_rank"].item() < 1.1
    line = collapse_metrics(torch.randn(256, 1, generator=g) * torch.randn(1, 64, generator=g))  # rank one
    assert line["effective_rank"].item() < 1.1 and line["embedding_std"].item() > 0.01


def stage(std, rank, folder="pretrain/byol_target_abc"):
    return Stage(folder, {"method": "byol", "chain": "target"}, [0, 1, 2], [1.0, 0.5, 0.2], [None] * 3, std, rank)


def test_a_collapsed_encoder_is_flagged_and_a_healthy_one_is_not():
    healthy = stage([0.02, 0.021, 0.019], [7.0, 7.2, 7.1])
    dropped = stage([0.02, 0.01, 0.0015], [7.0, 5.0, 3.0])
    one_line = stage([0.02, 0.02, 0.02], [7.0, 2.0, 1.2])
    like_dino_on_ebhi = stage([0.00184, 0.0009, 0.00042], [19.6, 4.0, 1.53])  # std / 4.4, rank < 2
    like_byol_on_ebhi = stage([0.0482, 0.04, 0.0435], [48.7, 9.0, 3.69])  # shrank, still spread
    assert embedding_collapsed(healthy) is False and embedding_collapsed(like_byol_on_ebhi) is False
    assert embedding_collapsed(dropped) and embedding_collapsed(one_line) and embedding_collapsed(like_dino_on_ebhi)
    assert embedding_collapsed(stage([], [])) is None  # a method with a pretext accuracy
    flags = collapsed_encoders([healthy, dropped])
    assert [f.stage for f in flags] == ["pretrain/byol_target_abc"] and "collapsed" in flags[0].message
    assert [f.kind for f in find_flags([], [dropped])] == ["embedding_collapsed"]


def test_collapse_columns_are_read_from_metrics_csv(tmp_path):
    folder = tmp_path / "pretrain" / "simsiam_target_abc"
    folder.mkdir(parents=True)
    (folder / "metrics.csv").write_text(
        "epoch,pretext_loss,embedding_std,effective_rank,lr\n0,-0.5,0.02,7.5,0.06\n1,-0.9,0.0001,1.01,0.03\n"
    )
    (folder / "stage.json").write_text('{"method": "simsiam", "pretext_chance": null}')
    (read,) = load_stages(tmp_path)
    assert read.embedding_std == [0.02, 0.0001] and read.chance is None
    assert embedding_collapsed(read)


def test_pretext_figure_shows_the_collapse_signal():
    from histossl.report.figures import pretext_figure

    png = pretext_figure(stage([0.02, 0.01, 0.0015], [7.0, 5.0, 3.0]))
    assert png[:4] == b"\x89PNG"
