"""A minimal test-only image model: exercises the runner without any real method."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from qscore.artefacts import overlay
from qscore.media.image import load_image
from qscore.media.sampling import squash_resize, to_tensor
from qscore.models.base import Item, Model, ModelSpec, Output, Sample
import pyarrow as pa


@dataclass
class ToyConfig:
    size: int = 32
    delay: float = 0.0  # seconds to sleep per batch (kill -9 test)
    oom_above: int = 0  # raise CUDA OOM for batches larger than this (back-off test); 0 = never
    fail_name: str = ""  # files whose name contains this break the whole batch (isolation test)
    die_name: str = ""  # files whose name contains this kill the process scoring them (Ray worker deaths)


@dataclass
class ToyPrepare:
    size: int

    def __call__(self, item: Item) -> Sample:
        image, facts = load_image(item.path)
        x = squash_resize(to_tensor(image[None]), (self.size, self.size))[0]
        small = image[:: max(1, image.shape[0] // 64), :: max(1, image.shape[1] // 64)]
        return Sample(item, {"image": x}, facts, {"preview": small, "name": item.rel_path})


class Toy(Model):
    spec = ModelSpec(
        name="toy", task="image", summary="test-only", paper="-", licence="none",
        columns={"brightness": pa.float32()}, artefacts=("heatmap",),
    )
    Config = ToyConfig
    presets = {"default": {}}

    def __init__(self, config: ToyConfig):
        super().__init__(config)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 1)

    def preparer(self, train: bool = False) -> ToyPrepare:
        return ToyPrepare(self.config.size)

    def forward(self, batch):
        x = batch["image"]
        if self.config.delay:
            time.sleep(self.config.delay)
        if self.config.oom_above and x.shape[0] > self.config.oom_above:
            raise torch.cuda.OutOfMemoryError("simulated")
        if self.config.fail_name and x.shape[0] > 1 and bool(batch["poison"].any()):
            raise RuntimeError("poisoned batch")
        if self.config.die_name and bool(batch["deadly"].any()):
            os.kill(os.getpid(), signal.SIGKILL)
        feat = torch.relu(self.conv(x))  # (B, 4, H, W)
        score = torch.sigmoid(self.head(feat.mean((2, 3)))).squeeze(1)
        return {"score": score, "heat": feat.mean(1), "brightness": x.mean((1, 2, 3))}

    def collate(self, samples):
        batch = super().collate(samples)
        batch["poison"] = torch.tensor([bool(self.config.fail_name) and self.config.fail_name in s.item.rel_path for s in samples])
        batch["deadly"] = torch.tensor([bool(self.config.die_name) and self.config.die_name in s.item.rel_path for s in samples])
        return batch

    def load_official(self, registry):
        return "toy-official", "trained"

    def postprocess(self, outputs, samples):
        res = []
        for i, s in enumerate(samples):
            if self.config.fail_name and self.config.fail_name in s.item.rel_path:
                raise RuntimeError("poisoned file")
            heat = overlay(s.keep["preview"], outputs["heat"][i].numpy())
            res.append(Output({"score": float(outputs["score"][i]), "brightness": float(outputs["brightness"][i])},
                              {"heatmap": np.asarray(heat)}))
        return res
