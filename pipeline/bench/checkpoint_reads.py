"""How much of a checkpoint one rank reads to resume: a real 2-rank ZeRO-2 checkpoint (tiny UNet,
EMA on) written by DeepSpeed, then copied out of a non-local run directory the way `resume` does.

Used by `pipeline bench scale-train` (`resume_read_ratio`).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from pipeline.bench.common import free_port


def _save_rank(rank: int, world: int, folder: str, port: int) -> None:
    """One rank: build the engine as training does, take one step, save its checkpoint parts."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    import deepspeed
    import torch.distributed as dist

    from pipeline.core.config import load_config
    from train.checkpoint import DEEPSPEED_TAG, STATE_FILE
    from train.ema import ExponentialMovingAverage
    from train.engine import make_engine
    from train.unet import build_unet

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    train = load_config("tiny", overrides=["train.zero_stage=2", "train.batch_size_per_worker=2"]).train
    torch.manual_seed(0)
    engine = make_engine(build_unet(train.unet, 64, 8), train)
    ema = ExponentialMovingAverage.of(engine, train)
    generator = torch.Generator().manual_seed(rank)
    noisy = torch.randn(2, 4, 8, 8, generator=generator)
    loss = engine(noisy, torch.tensor([10, 500]), encoder_hidden_states=torch.randn(2, 77, 64, generator=generator))
    engine.backward(loss.sample.pow(2).mean())
    engine.step()
    ema.update()
    engine.save_checkpoint(folder, tag=DEEPSPEED_TAG)
    ema.save(folder)
    if rank == 0:
        Path(folder, STATE_FILE).write_text('{"step": 1, "world_size": 2}\n')
    dist.destroy_process_group()


def resume_read_ratio(world: int = 2, rank: int = 1) -> dict:
    """Bytes rank `rank` copies to resume a `world`-rank ZeRO-2 checkpoint, over the folder's bytes."""
    import fsspec
    import torch.multiprocessing as mp

    from pipeline.core.rundir import RunDir
    from train.checkpoint import rank_files

    with tempfile.TemporaryDirectory(prefix="bench-checkpoint-") as scratch:
        folder = Path(scratch, "checkpoint")
        mp.spawn(_save_rank, args=(world, str(folder), free_port()), nprocs=world)
        files = [path for path in folder.rglob("*") if path.is_file()]
        total = sum(path.stat().st_size for path in files)
        memory = fsspec.filesystem("memory")
        root = f"/bench-{os.getpid()}"
        for path in files:
            memory.pipe_file(f"{root}/ck/{path.relative_to(folder)}", path.read_bytes())
        copied = Path(scratch, "copied")
        RunDir(f"memory://{root}").get_dir("ck", copied, rank_files(rank, world))
        read = sum(path.stat().st_size for path in copied.rglob("*") if path.is_file())
        memory.rm(root, recursive=True)
    return {"resume_read_ratio": round(read / total, 3), "resume_read_bytes": read, "checkpoint_bytes": total}


if __name__ == "__main__":
    print(resume_read_ratio())
