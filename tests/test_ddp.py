"""Data parallelism on the CPU: two gloo processes train a micro run (autoencoder with its GAN half, then the
LDM, stopped and resumed); the replicas stay identical, a drifted replica is caught, and two ranks at batch B equal one process at 2B.
Most of the run time is each spawned process importing torch (and torch._dynamo, which optimisers load)."""
import os
import shutil
import socket
from dataclasses import replace

import pytest
import torch
import torch.multiprocessing as mp

from minildm.checkpoint import load_checkpoint
from minildm.config import micro
from minildm.train import distributed
from minildm.train.autoencoder import train_autoencoder
from minildm.train.ldm import train_ldm

WORLD, BATCH, STEPS = 2, 4, 4


def micro_preset():
    p = micro()
    loss = replace(p.vq_train.loss, disc_weight=0.5, disc_start=2)  # the discriminator trains in the last 2 steps
    p.vq_train = replace(p.vq_train, steps=STEPS, batch_size=BATCH, eval_images=8, loss=loss)
    p.ldm = replace(p.ldm, steps=STEPS, batch_size=BATCH, cache_size=32)
    return p


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, port: int, run_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    device = distributed.setup(torch.device("cpu"), timeout_seconds=120)
    try:
        preset = micro_preset()
        train_autoencoder(preset, run_dir, device, show_progress=False)  # check_in_sync runs at every save
        train_ldm(preset, run_dir, device, steps=STEPS // 2, show_progress=False)  # stopped half way,
        train_ldm(preset, run_dir, device, resume=True, show_progress=False)  # resumed by both ranks from rank 0's file
        torch.manual_seed(0)
        drifted = torch.nn.Linear(3, 3)
        with torch.no_grad():
            drifted.weight[0, 0] += 1e-3 * rank  # replica 1 differs in one weight
        with pytest.raises(RuntimeError, match="replicas of the model differ in 1 tensors"):
            distributed.check_in_sync(drifted)
        open(os.path.join(run_dir, f"rank{rank}.done"), "w").close()
        distributed.barrier()  # neither rank tears the group down while the other may still use it
    finally:
        distributed.cleanup()


def test_two_gloo_ranks_stay_in_sync_and_equal_one_process_at_the_global_batch(tmp_path):
    run = tmp_path / "ddp"
    mp.spawn(worker, args=(free_port(), str(run)), nprocs=WORLD, join=True)
    assert (run / "rank0.done").exists() and (run / "rank1.done").exists()
    ddp = load_checkpoint(run / "ldm.pt", "ldm")
    assert ddp["step"] == STEPS and not distributed.is_distributed()

    single = tmp_path / "single"  # the same frozen autoencoder, one process, the global batch
    single.mkdir()
    shutil.copy(run / "autoencoder.pt", single / "autoencoder.pt")
    train_ldm(micro_preset(), single, torch.device("cpu"), batch_size=WORLD * BATCH, show_progress=False)
    ref = load_checkpoint(single / "ldm.pt", "ldm")
    # gradients averaged over ranks = the gradient of the global batch: measured max |difference| 2.5e-7, while
    # one process at batch 4 (what a rank alone would learn) lands 6e-3 away
    for name, w in ref["model"].items():
        torch.testing.assert_close(ddp["model"][name], w, rtol=1e-4, atol=1e-5, msg=name)
