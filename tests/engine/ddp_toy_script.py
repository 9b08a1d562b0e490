"""Run by tests/engine/test_distributed.py, once plainly and once under torchrun with 2 processes.

Trains the toy task, recording per rank which dataset indices each step saw and which ranks called
``save_checkpoint``, so the test can check sharding and rank-0-only writes.
"""

import json
import os
import sys
from pathlib import Path

import torch
from torch.utils.data import Dataset

import vkd.engine.checkpoint as checkpoint_module
import vkd.engine.trainer as trainer_module
from vkd.config import apply_overrides
from vkd.engine import train_task
from vkd.engine.toy import ToyConfig, ToyTask, make_toy_data

out_dir, name = Path(sys.argv[1]), sys.argv[2]
rank = int(os.environ.get("RANK", "0"))
seen: list[list[int]] = []
writers: list[int] = []


class Indexed(Dataset):
    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        return self.base[i][0], i


class RecordingToy(ToyTask):
    def forward(self, batch):
        x, idx = batch
        seen.append(idx.tolist())
        return super().forward([x])


real_save = checkpoint_module.save_checkpoint


def recording_save(*args, **kwargs):
    writers.append(rank)
    return real_save(*args, **kwargs)


trainer_module.save_checkpoint = recording_save
cfg = apply_overrides(ToyConfig(), [f"run.output_dir={out_dir}", f"run.name={name}", "train.steps=12",
                                    "train.batch_size=16", "train.checkpoint_every=6", "train.log_every=3",
                                    "train.optimizer=sgd", "train.lr=0.05"])
torch.set_num_threads(1)
summary = train_task(cfg, RecordingToy(cfg), Indexed(make_toy_data(cfg)))
(out_dir / f"{name}-rank{rank}.json").write_text(json.dumps({"seen": seen, "writers": writers,
                                                             "world_size": summary["world_size"]}))
