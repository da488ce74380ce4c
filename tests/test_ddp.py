"""Two-process data-parallel training on a CPU (Lightning DDP, gloo): each rank sees its own samples,
both end with the same weights, and validation gathers every item once, in order."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# Run as a script: Lightning's DDP launcher starts rank 1 by re-running this file with LOCAL_RANK set.
SCRIPT = textwrap.dedent(
    """
    import json
    import sys
    from pathlib import Path

    import numpy as np
    import torch

    from histossl import config
    from histossl.methods import METHODS
    from histossl.models.backbones import build_encoder
    from histossl.train.common import ArrayBatches, loader, make_trainer
    from histossl.train.pretrain import PretrainModule

    OUT = Path(sys.argv[1])
    METHOD = sys.argv[2]


    class LoggedBatches(ArrayBatches):
        \"\"\"ArrayBatches that remembers which rows this process read.\"\"\"

        seen: list[int] = []

        def __getitems__(self, indices):
            LoggedBatches.seen.extend(int(r) for r in self.rows[np.asarray(indices, dtype=np.int64)])
            return super().__getitems__(indices)


    if __name__ == "__main__":
        torch.set_num_threads(1)
        cfg = config.from_dict(
            {
                "image_size": 16,
                "backbone": {"name": "resnet18", "stem": "small"},
                "pretrain": {"batch_size": 4, "epochs": 1},
                "trainer": {"accelerator": "cpu", "devices": "2", "strategy": "ddp", "progress": False},
            }
        )
        torch.manual_seed(0)  # same initial weights on both ranks (DDP also broadcasts rank 0's)
        images = np.random.default_rng(0).integers(0, 256, (16, 16, 16, 3), dtype=np.uint8)
        encoder = build_encoder(cfg.backbone, "random")
        settings = METHODS.config(METHOD)()
        method = METHODS.get(METHOD)(encoder, settings, cfg.pretrain, cfg.image_size)
        module = PretrainModule(method, cfg.pretrain.optim)
        trainer = make_trainer(cfg.trainer, 1, [], OUT, validate=False)
        trainer.fit(module, loader(LoggedBatches(images, np.arange(16)), 4, True, True, cfg.trainer, seed=0))
        rank = trainer.global_rank
        (OUT / f"rows_{rank}.json").write_text(json.dumps({"rows": LoggedBatches.seen, "steps": trainer.global_step}))
        # Parameters (teachers included) and MoCo's queue, which every rank fills with all ranks' keys.
        state = dict(module.named_parameters()) | {k: v for k, v in module.named_buffers() if "memory_bank" in k}
        torch.save({k: v.detach().clone() for k, v in state.items()}, OUT / f"params_{rank}.pt")

        # Validation under DDP: 7 items over 2 processes (the sampler pads one); the gathered labels
        # must be the validation labels, in order, each once.
        from torch.utils.data import DataLoader, TensorDataset

        from histossl.models.heads import classifier_head
        from histossl.train.downstream import DownstreamModule

        gathered = []

        class Probe(DownstreamModule):
            def _gather_in_order(self, local):
                out = super()._gather_in_order(local)
                gathered.append(out.tolist())
                return out

        val_labels = torch.tensor([0, 1, 1, 0, 1, 0, 0])
        probe = Probe(None, classifier_head(8, 2, "linear"), cfg, 0.01, "cosine", None)
        train = DataLoader(TensorDataset(torch.randn(8, 8), torch.arange(8) % 2), batch_size=2)
        val = DataLoader(TensorDataset(torch.randn(7, 8), val_labels), batch_size=2)
        make_trainer(cfg.trainer, 1, [], OUT, validate=True).fit(probe, train, val)
        (OUT / f"val_{rank}.json").write_text(json.dumps({"labels": gathered[-1], "expected": val_labels.tolist()}))
    """
)


@pytest.mark.parametrize("method", ["simclr", "byol", "moco_v2"])  # in-batch negatives, an EMA teacher, a queue
def test_two_process_ddp_pretraining_splits_data_and_syncs_weights(tmp_path, method):
    script = tmp_path / "ddp_pretrain.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path), method], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=170
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = [json.loads((tmp_path / f"rows_{rank}.json").read_text()) for rank in (0, 1)]
    rows = [set(log["rows"]) for log in logs]
    # The distributed sampler gives each rank half of the 16 images: 2 batches of 4, disjoint.
    assert [log["steps"] for log in logs] == [2, 2]
    assert len(rows[0]) == len(rows[1]) == 8 and not rows[0] & rows[1]
    # Gradients are all-reduced, so every parameter is identical (BN running statistics are buffers,
    # updated by each rank's own forward, and are not compared).
    params = [torch.load(tmp_path / f"params_{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert params[0].keys() == params[1].keys()
    assert len(params[0]) > 0
    for name in params[0]:
        assert torch.equal(params[0][name], params[1][name]), name
    if method == "moco_v2":
        assert any("memory_bank.bank" in name for name in params[0])
    for rank in (0, 1):
        val = json.loads((tmp_path / f"val_{rank}.json").read_text())
        assert val["labels"] == val["expected"]
