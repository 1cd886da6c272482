"""Where a training's time goes: the loader, the step, and the two together.

    python benchmarks/train_speed.py LABELS.csv [--model ugdiml] [--preset starter] [--batch-size 32]
        [--set KEY=VALUE ...] [--workers 2] [--device cpu|cuda] [--steps 20] [--only loader[,step]] [--json F]

1. ``loader``: ``qscore.train.loop._loader`` (the augmenting preparer and the collation in
   DataLoader workers, as ``qscore train`` runs them) over the labelled files once, no model
   step: files/s (over all, and after the first batch, which holds the workers' start) and the
   main process's CPU ms per batch (its own clock; the first batch left out). The main process
   also launches every step, so this bounds a training whatever the GPU. With an older qscore
   first on PYTHONPATH (before the workers collated) it measures that one; ``--only loader``
   then, as the rest needs this one.
2. ``step``: one batch resident on ``--device``, ``--steps`` optimiser steps (``train_step``:
   bf16 autocast on CUDA), after 3 warm-up steps: samples/s and peak GPU memory.
3. ``train``: the loader and the steps together as ``qscore train``'s epoch loop runs them
   (``_train_epoch``: a loss read back once the next step is queued), for the whole labelled set
   once (validation excluded): samples/s.

Random weights, the model's own preset; the model's AdamW learning rate.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def loader_speed(model, labels, batch_size: int, workers: int) -> dict:
    from qscore.train.loop import _loader

    batches = iter(_loader(model, labels, batch_size, workers))
    cpu, files, first = [], 0, None
    t0 = time.perf_counter()
    while True:
        if cpu and first is None:  # the workers' start is behind the first batch
            first = (time.perf_counter(), files)
        c0 = time.process_time()
        part = next(batches, None)
        if part is None:
            break
        if isinstance(part, list):  # an older qscore: the main thread stacked
            samples = [s for s, _ in part if hasattr(s, "inputs")]
            model.collate(samples)
        else:
            samples = part.chunk.samples
            if part.chunk.batch is None:  # collating failed in the worker: the main thread does it
                model.collate(samples)
        cpu.append(time.process_time() - c0)
        files += len(samples)
    wall, steady = time.perf_counter(), cpu[1:] or cpu
    after = (files - first[1]) / (wall - first[0]) if first and wall > first[0] else None
    return {"files_per_s": round(files / (wall - t0), 1), "files_per_s_after_first": after and round(after, 1),
            "main_cpu_ms_per_batch": round(1e3 * sum(steady) / len(steady), 1), "batches": len(cpu)}


def step_speed(model, labels, batch_size: int, steps: int, device: torch.device) -> dict:
    from qscore.train.loop import _to_device, train_step

    prepare = model.preparer(train=True)
    samples = [prepare(item) for item in labels.items[:batch_size]]
    batch = _to_device(model.collate(samples), device)
    targets = torch.as_tensor(labels.targets[:batch_size], device=device)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)
    cache = model.cache()
    model.train()
    for _ in range(3):
        train_step(model, batch, targets, optimizer, cache)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = train_step(model, batch, targets, optimizer, cache)
    float(loss)
    wall = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    return {"samples_per_s": round(steps * len(samples) / wall, 1), "ms_per_step": round(1e3 * wall / steps, 1),
            "peak_gpu_mb": round(peak) if peak else None}


def train_speed(model, labels, batch_size: int, workers: int, device: torch.device) -> dict:
    from qscore.console import Progress
    from qscore.train.loop import WarmupCosine, _loader, _train_epoch

    loader = _loader(model, labels, batch_size, workers, pin=device.type == "cuda")
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(1, len(loader)))
    t0 = time.perf_counter()
    with Progress(False) as bar:
        _train_epoch(model, loader, optimizer, scheduler, device, 0, 0, bar)
    wall = time.perf_counter() - t0
    return {"samples_per_s": round(len(loader) * batch_size / wall, 1), "s": round(wall, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("labels")
    p.add_argument("--model", default="ugdiml")
    p.add_argument("--preset", default="starter")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override, as qscore train --set")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--only", default="", help="the parts to run, comma-separated: loader, step, train (default all)")
    p.add_argument("--json")
    args = p.parse_args()
    if args.only == "loader":
        torch.set_num_threads(1)  # as a DataLoader worker: the main thread only receives
    from qscore.config import load_registry, model_class, parse_sets, plan_model
    from qscore.train.labels import read_labels

    device = torch.device(args.device)
    plan = plan_model(args.model, args.preset, parse_sets(args.set), load_registry(None), "random")
    model = plan.cls(plan.config).to(device)
    labels = read_labels(args.labels, model_class(args.model).spec.task)
    result = {"model": args.model, "preset": args.preset, "set": args.set, "batch_size": args.batch_size, "workers": args.workers,
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "files": len(labels)}
    parts = {"loader": lambda: loader_speed(model, labels, args.batch_size, args.workers),
             "step": lambda: step_speed(model, labels, args.batch_size, args.steps, device),
             "train": lambda: train_speed(model, labels, args.batch_size, args.workers, device)}
    for name, run in parts.items():
        if not args.only or name in args.only.split(","):
            result[name] = run()
            print(name, json.dumps(result[name]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
