"""Which process of a multi-process run this is: one owns the study folder, the others join its fits.

Lightning's DDP launcher starts ranks 1..n-1 by re-running the same command (``sys.argv``) with
``LOCAL_RANK`` (and ``NODE_RANK``, ``WORLD_SIZE``) set, at the first ``trainer.fit``; torchrun starts
every rank at once with ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``; on several nodes each node's
command runs with its ``NODE_RANK``. Every rank runs the same study code so that each reaches the
same fits in the same order, but only global rank 0 takes the lock, checks and writes the config,
sets aside stale results, writes the split, the records and the report. The others read what it wrote.
"""

from __future__ import annotations

import os


def global_rank() -> int:
    """This process's global rank from the launcher's environment (0 when launched alone)."""
    if "RANK" in os.environ:  # torchrun
        return int(os.environ["RANK"])
    if _slurm_tasks() > 1:  # srun: one task per device, Lightning reads the same variables
        return int(os.environ["SLURM_PROCID"])
    local = int(os.environ.get("LOCAL_RANK", 0))
    node = int(os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", 0)))
    return local if node == 0 else node * 1_000_000 + local  # only whether it is 0 matters here


def is_owner() -> bool:
    """Whether this process owns the output folder (global rank 0)."""
    return global_rank() == 0


def _slurm_tasks() -> int:
    if "SLURM_PROCID" not in os.environ or os.environ.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return 0  # an interactive allocation: Lightning does not treat it as SLURM-managed either
    return int(os.environ.get("SLURM_NTASKS", 1))


def started_together() -> bool:
    """Whether every rank was started at once (torchrun, srun), rather than by Lightning at the first fit."""
    return ("RANK" in os.environ and int(os.environ.get("WORLD_SIZE", 1)) > 1) or _slurm_tasks() > 1


def wait_for_owner(backend: str) -> None:
    """torchrun: hold every rank until rank 0 has prepared the folder (lock, config, split).

    The default process group made here is the one Lightning's DDP strategy then uses (it only makes
    one when none exists); ``backend`` is the one it would choose (nccl on GPUs, gloo on CPUs).
    """
    import torch
    import torch.distributed as dist

    if not started_together():
        return
    if not dist.is_initialized():
        kwargs = {}
        if "RANK" not in os.environ:  # srun: the address and port Lightning's SLURM environment derives
            from pytorch_lightning.plugins.environments import SLURMEnvironment

            slurm = SLURMEnvironment()
            os.environ.setdefault("MASTER_ADDR", slurm.main_address)
            os.environ.setdefault("MASTER_PORT", str(slurm.main_port))
            kwargs = {"rank": slurm.global_rank(), "world_size": slurm.world_size()}
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0))))
        dist.init_process_group(backend, **kwargs)
    dist.barrier()
