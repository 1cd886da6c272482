"""The training loader's cost to the main process: what is left of each step for the GPU.

    python benchmarks/train_loader.py LABELS.csv [--model ugdiml] [--preset starter] [--batch-size 32] [--workers 2]

Iterates ``qscore.train.loop._loader`` (the augmenting preparer in DataLoader workers, as
``qscore train`` runs it) over the labelled files once, with no model step, and prints the
main process's CPU ms per batch (the process's own clock, the first batch left out: it holds
the workers' start) and the files per second. The main process also launches every training
step, so its CPU per batch bounds a training's speed whatever the GPU. With an older qscore
first on PYTHONPATH it measures that one (before the workers collated).
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("labels")
    p.add_argument("--model", default="ugdiml")
    p.add_argument("--preset", default="starter")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(1)
    from qscore.config import load_registry, model_class, plan_model
    from qscore.train.labels import read_labels
    from qscore.train.loop import _loader

    plan = plan_model(args.model, args.preset, {}, load_registry(None), "random")
    model = plan.cls(plan.config)
    labels = read_labels(args.labels, model_class(args.model).spec.task)
    batches = iter(_loader(model, labels, args.batch_size, args.workers))
    cpu, files = [], 0
    t0 = time.perf_counter()
    while True:
        c0 = time.process_time()
        part = next(batches, None)
        if part is None:
            break
        if isinstance(part, list):  # a qscore before 2026-12-04 (PYTHONPATH=old/src): the main thread stacked
            samples = [s for s, _ in part if hasattr(s, "inputs")]
            model.collate(samples)
        else:
            samples = part.chunk.samples
            if part.chunk.batch is None:  # collating failed in the worker: the main thread does it
                model.collate(samples)
        cpu.append(time.process_time() - c0)
        files += len(samples)
    wall = time.perf_counter() - t0
    steady = cpu[1:] or cpu
    print(f"{args.model} {args.preset}, batch {args.batch_size}, {args.workers} workers: {files} files, "
          f"{files / wall:.1f} files/s; main process {1e3 * sum(steady) / len(steady):.0f} ms CPU per batch "
          f"(batches 2-{len(cpu)})")


if __name__ == "__main__":
    main()
