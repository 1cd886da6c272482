"""`qscore train` / `qscore eval`: one loop for every model, through the Model interface.

Training: AdamW over ``model.trainable_parameters()`` (a list of parameters, or of param-group
dicts that may carry ``lr_scale``), linear warm-up per iteration then cosine to 0, bf16 autocast
on CUDA, ``model.training_loss(batch, targets)``. Every epoch: validation (quality: SRCC + PLCC,
forgery: F1 picks the best), ``last.safetensors`` + ``last.resume.pt`` (optimiser, scheduler,
epoch) and, when it improved, ``best.safetensors``; each with its JSON card. ``--resume``
reloads the last checkpoint and continues the same schedule: each epoch reseeds the RNGs from
(seed, epoch), so a resumed run ends with the same weights as an uninterrupted one on the CPU.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from qscore import __version__
from qscore.config import BACKBONE, load_registry, model_class, pick_device, plan_model
from qscore.console import Progress
from qscore.media.image import load_mask
from qscore.models.base import Model
from qscore.runner import Chunk, Engine, Prepared, Result, default_workers, precompute
from qscore.train.labels import Labels, read_labels
from qscore.train.metrics import ForgeryMeter, quality_metrics
from qscore.types import Item, Sample, UsageError

log = logging.getLogger("qscore")

DEFAULT_LR, DEFAULT_WD = 1e-3, 0.05
RESUME_SUFFIX = ".resume.pt"


@dataclass
class TrainOptions:
    model: str
    labels: str
    out: Path
    val: str | None = None
    root: str | None = None
    preset: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    init: str = "official"  # official: pretrained backbone from weights.toml; random: from scratch
    registry: str | None = None
    epochs: int = 10
    batch_size: int = 8
    lr: float | None = None  # None: the model's own (config / spec `lr`), else DEFAULT_LR
    weight_decay: float | None = None
    warmup_epochs: float = 1.0
    device: str = "auto"
    seed: int = 0
    workers: int = -1
    resume: bool = False
    stop_after: int | None = None  # stop after this epoch (the schedule stays that of `epochs`)
    progress: bool | None = None  # None: a bar when stderr is a terminal


# ---- training ------------------------------------------------------------------------------
def train(opts: TrainOptions) -> dict:
    """Run (or resume) a training; returns a summary with the best checkpoint and its snippet."""
    from qscore.fsutil import atomic_file
    from qscore.weights import load_checkpoint, snippet

    if opts.epochs < 1 or opts.batch_size < 1:
        raise UsageError("--epochs and --batch-size must be at least 1")
    if opts.init not in ("official", "random"):
        raise UsageError(f"--init must be official or random, not {opts.init!r}")
    device = pick_device(opts.device)
    cls = model_class(opts.model)
    train_set = read_labels(opts.labels, cls.spec.task, opts.root)
    val_set = read_labels(opts.val, cls.spec.task, opts.root) if opts.val else None
    out = Path(opts.out)
    key = _schedule_key(opts, train_set, val_set)
    last = out / "last.safetensors"
    resume_file = last.with_suffix(RESUME_SUFFIX)
    if resume_file.exists() and not opts.resume:
        raise UsageError(f"{out} already holds a training run: add --resume to continue it, or use another --out")
    if opts.resume and not resume_file.exists():
        raise UsageError(f"--resume: no {resume_file} to continue from")

    reg = load_registry(opts.registry)
    plan = plan_model(opts.model, opts.preset, opts.overrides, reg, BACKBONE if opts.init == "official" else "random")
    model, _, _ = plan.build(device, opts.seed, hint=" (or train from scratch with --init random)")
    config = model.config

    optimizer = torch.optim.AdamW(_param_groups(model, opts), lr=_hyper(model, "lr", opts.lr, DEFAULT_LR))
    loader = _loader(model, train_set, opts.batch_size, opts.workers, pin=device.type == "cuda")
    steps = len(loader)
    total = opts.epochs * steps
    warmup = min(round(opts.warmup_epochs * steps), total // 2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(warmup, total))

    start, best, best_epoch = 0, -math.inf, None
    if opts.resume:
        state = torch.load(resume_file, weights_only=True)
        changed = {k: (state["key"].get(k), v) for k, v in key.items() if state["key"].get(k) != v}
        if changed:
            raise UsageError("--resume: the run was started with other settings: " + "; ".join(
                f"{k} was {a!r}, now {b!r}" for k, (a, b) in changed.items()))
        weights, card = load_checkpoint(last, expect_model=cls.spec.name)
        if card.get("epoch") != state["epoch"]:
            raise UsageError(f"--resume: {last} is from epoch {card.get('epoch')} but {resume_file} from epoch "
                             f"{state['epoch']} (interrupted while saving?): restart the run in a new --out")
        model.load_trained(weights, card, reg)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start, best, best_epoch = state["epoch"], state["best"], state["best_epoch"]
        log.info("resuming %s after epoch %d of %d", out, start, opts.epochs)

    out.mkdir(parents=True, exist_ok=True)
    card = {
        "model": cls.spec.name,
        "preset": plan.preset,
        "config": dataclasses.asdict(config),
        "backbone": opts.init,
        "data_hash": key["data_hash"],
        "qscore_version": __version__,
        "train": {k: key[k] for k in ("epochs", "batch_size", "lr", "weight_decay", "warmup_epochs", "seed", "init")}
        | {"labels": str(opts.labels), "val": opts.val, "n_train": len(train_set), "n_val": len(val_set or ())},
    }
    stop = min(opts.epochs, opts.stop_after or opts.epochs)
    with Progress(opts.progress) as bar:
        for epoch in range(start, stop):
            t0 = time.perf_counter()
            loss = _train_epoch(model, loader, optimizer, scheduler, device, opts.seed, epoch, bar)
            metrics = {"epoch": epoch + 1, "train_loss": loss, "lr": max(scheduler.get_last_lr())}
            if val_set is not None:
                metrics |= validate(model, val_set, device, opts.batch_size, opts.workers)
            metrics["elapsed_s"] = round(time.perf_counter() - t0, 2)
            value = selection_value(metrics, cls.spec.task)
            card_e = card | {"epoch": epoch + 1, "metrics": _jsonable(metrics)}
            _save(model, last, card_e)
            improved = value > best or best_epoch is None or val_set is None
            if improved:
                best, best_epoch = value, epoch + 1
                _save(model, out / "best.safetensors", card_e | {"selected_by": _selected_by(metrics, cls.spec.task, val_set)})
            with atomic_file(resume_file) as tmp:
                torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                            "epoch": epoch + 1, "best": best, "best_epoch": best_epoch, "key": key}, tmp)
            with open(out / "history.jsonl", "a") as f:
                f.write(json.dumps(_jsonable(metrics)) + "\n")
            log.info("epoch %d/%d %s%s", epoch + 1, opts.epochs, _brief(metrics), " (best)" if improved else "")
    best_path = out / "best.safetensors"
    return {
        "run_dir": str(out),
        "epochs_done": max(stop, start),
        "epochs": opts.epochs,
        "best": str(best_path),
        "best_epoch": best_epoch,
        "snippet": snippet(f"{cls.spec.name}-head", load_checkpoint(best_path)[1], best_path)
        if best_epoch else None,
    }


class WarmupCosine:
    """LR factor per iteration: linear warm-up over ``warmup`` steps, then cosine down to 0 at
    ``total``. A picklable callable so the scheduler state saves cleanly."""

    def __init__(self, warmup: int, total: int):
        self.warmup, self.total = warmup, max(1, total)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def selection_value(metrics: dict, task: str) -> float:
    """What picks the best epoch: forgery F1 (the mean over the modes validated), else SRCC +
    PLCC (NaN counts as worst)."""
    if task == "forgery":
        f1s = [v for k, v in metrics.items() if k == "f1" or k.endswith("_f1")]
        value = sum(f1s) / len(f1s) if f1s and None not in f1s else None
    else:
        value = metrics.get("srcc", math.nan) + metrics.get("plcc", math.nan)
    return -math.inf if value is None or math.isnan(value) else float(value)


MODE_METRICS = ("f1", "iou", "pixel_auc", "image_auc", "authentic_fpr")


def validate(model: Model, val_set: Labels, device: torch.device, batch_size: int, workers: int) -> dict:
    """One epoch's validation metrics. A model whose checkpoint also scores with a reference
    (UGD-IML's CIML) is validated in each such mode too, where the labels give references, as
    ``<mode>_f1`` ...: the best epoch must serve every mode, not only the configured one."""
    metrics = evaluate(model, val_set, device, batch_size, workers, model.spec.task)[0]
    base = getattr(model.config, "mode", None)
    with_references = any(item.reference for item in val_set.items)
    for mode in model.spec.reference_modes:
        if mode == base or not with_references:
            continue
        model.config.mode = mode
        try:
            other = evaluate(model, val_set, device, batch_size, workers, model.spec.task)[0]
        finally:
            model.config.mode = base
        metrics |= {f"{mode}_{k}": other[k] for k in MODE_METRICS if k in other}
    return metrics


def _train_epoch(model, loader, optimizer, scheduler, device, seed, epoch, bar) -> float:
    """One pass over the shuffled training set; returns the mean loss. A step's loss is read
    back (which waits for the GPU) only once the next step is queued, so the GPU does not idle
    while the main thread copies and launches."""
    _reseed(seed, epoch)
    loader.generator.manual_seed(_epoch_seed(seed, epoch))
    model.train()
    cache = model.cache()
    losses, queued = [], None  # queued: the latest step's loss, still on the device
    bar.start(f"epoch {epoch + 1}", len(loader))
    for part in loader:
        chunk = part.chunk
        for failure in chunk.failures:
            log.warning("training: skipping %s: %s", failure.item.display, failure.error)
        if len(chunk.samples) >= 2:  # correlation losses need two samples
            batch = _to_device(chunk.batch if chunk.batch is not None else model.collate(chunk.samples), device)
            loss = train_step(model, batch, torch.as_tensor(part.targets, device=device), optimizer, cache)
            if queued is not None:
                losses.append(float(queued))
            queued = loss
        scheduler.step()
        bar.advance(note=f"loss {losses[-1] if losses else math.nan:.4f}")
    if queued is not None:
        losses.append(float(queued))
    if not losses:
        raise RuntimeError("no training batch had two decodable files: see the warnings above")
    return float(np.mean(losses))


def train_step(model: Model, batch: dict, targets: torch.Tensor, optimizer, cache) -> torch.Tensor:
    """One optimiser step on a batch already on the model's device (bf16 autocast on CUDA);
    returns the loss, detached and not read back."""
    device = targets.device
    with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
        precompute(model, batch, cache)
        loss = model.training_loss(batch, targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


# ---- evaluation ----------------------------------------------------------------------------
def evaluate(
    model: Model, labels: Labels, device: torch.device, batch_size: int = 8, workers: int = -1, task: str | None = None
) -> tuple[dict, list[dict]]:
    """Score every labelled file through the runner's engine (its OOM back-off, per-file
    isolation and ``postprocess``); returns (metrics, one row per file).

    Quality: SRCC/PLCC/KRCC/RMSE of the scores vs the targets. Forgery: the probability map the
    row's artefact is drawn from (``postprocess``: at the file's own size, only the image's part
    of the model's square), resized to the GT mask if that differs, and the score for image AUC.
    Files that fail get a row with their error and are left out of the metrics.
    """
    task = task or model.spec.task
    was_training = model.training
    model.eval()
    rows: dict[int, dict] = {}
    meter = ForgeryMeter() if task == "forgery" else None
    indices: dict[Item, deque[int]] = defaultdict(deque)  # a file listed twice scores the same twice
    for index, item in enumerate(labels.items):
        indices[item].append(index)
    measured: dict[int, tuple | None] = {}  # index -> the meter's inputs, until every earlier file is in
    fed = 0  # files the meter has taken: it takes them in label order, so its means are the same every run
    lock = threading.Lock()  # results come from the engine's writer threads, in any order

    def collect(results: list[Result]) -> None:
        nonlocal fed
        for result in results:
            with lock:
                index = indices[result.item].popleft()
            row = _row(labels, index)
            inputs = None
            if result.output is None:
                row |= {"status": "error", "error": result.error, "prediction": math.nan}
            else:
                row |= {"status": "ok", "error": None, "prediction": result.output.columns["score"]}
                if meter is not None:
                    prob = result.output.arrays["probability"]  # (H, W) float at the file's size
                    gt = _gt_mask(result.item.mask, prob.shape)
                    if gt.shape != prob.shape:
                        prob = F.interpolate(torch.as_tensor(prob)[None, None], size=gt.shape, mode="bilinear", align_corners=False)[0, 0].numpy()
                    inputs = prob, gt, row["prediction"]
            with lock:
                rows[index] = row
                if meter is None:
                    continue
                measured[index] = inputs
                while fed in measured:
                    inputs = measured.pop(fed)
                    if inputs is not None:
                        rows[fed] |= meter.add(*inputs)
                    fed += 1

    maps = model.maps
    Engine(model.draw_maps(False), device, batch_size, workers, collect).drive(labels.items)  # no heatmaps: rows only
    model.draw_maps(maps).train(was_training)
    rows = [rows[i] for i in sorted(rows)]
    good = [r for r in rows if r["status"] == "ok"]
    if meter is not None:
        metrics = meter.result()
    elif len(good) >= 2:
        metrics = quality_metrics(np.array([r["prediction"] for r in good]), np.array([r["target"] for r in good]))
    else:
        metrics = {"srcc": math.nan, "plcc": math.nan, "n": len(good)}
    metrics["n_failed"] = len(rows) - len(good)
    return metrics, rows


def scatter_png(pred: np.ndarray, mos: np.ndarray, path: str | os.PathLike, title: str) -> None:
    """A 512 x 512 scatter plot of predictions (y) against MOS (x), drawn with PIL."""
    from PIL import Image, ImageDraw

    size, pad = 512, 48
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    draw.rectangle((pad, pad, size - pad, size - pad), outline="black")

    def scale(v: np.ndarray) -> np.ndarray:
        lo, hi = float(np.min(v)), float(np.max(v))
        return (v - lo) / (hi - lo) if hi > lo else np.full_like(v, 0.5)

    xs, ys = pad + scale(mos) * (size - 2 * pad), size - pad - scale(pred) * (size - 2 * pad)
    for x, y in zip(xs, ys):
        draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=(31, 119, 180))
    draw.text((pad, 16), title, fill="black")
    draw.text((pad, size - pad + 8), f"MOS  {np.min(mos):.3g} .. {np.max(mos):.3g}", fill="black")
    draw.text((4, pad - 16), f"prediction  {np.min(pred):.3g} .. {np.max(pred):.3g}", fill="black")
    img.save(path)


# ---- helpers -------------------------------------------------------------------------------
class _Labelled(Prepared):
    """Prepared + the target, so a shuffled batch keeps its labels: ``i -> (Sample | Failure, target)``."""

    def __init__(self, labels: Labels, prepare):
        super().__init__(labels.items, prepare)
        self.targets = labels.targets

    def __getitem__(self, i: int):
        return super().__getitem__(i), float(self.targets[i])


def _loader(model: Model, labels: Labels, batch_size: int, workers: int, pin: bool = False) -> DataLoader:
    """Training batches (``_TrainChunk``), shuffled by a generator the training loop reseeds
    each epoch. The workers collate (``Model.collate``) as well as prepare, so the main thread
    is left with the step: stacking UGD-IML's starter batch there (192 MB of images per 32)
    cost it 179-206 ms of CPU a batch, against 25 ms now (docs/benchmarks.md). ``pin``: page-locked batches (CUDA), so the copy is asynchronous."""
    return DataLoader(
        _Labelled(labels, model.preparer(train=True)),
        batch_size=batch_size,
        shuffle=True,
        drop_last=len(labels) >= batch_size,
        num_workers=workers if workers >= 0 else default_workers(),
        collate_fn=functools.partial(_TrainChunk.make, model.collate),
        pin_memory=pin,
        generator=torch.Generator(),
    )


@dataclass
class _TrainChunk:
    """A shuffled training batch as a worker hands it over: its files (failures, samples and,
    unless collating failed, the collated batch) and the samples' targets (N,)."""

    chunk: Chunk
    targets: np.ndarray

    @staticmethod
    def make(collate, pairs: list) -> "_TrainChunk":
        """``pairs``: (Sample | Failure, target), as ``_Labelled`` gives them. Once collated,
        the samples travel without their inputs: the batch holds them, and each tensor crossing
        to the main process costs it a shared-memory mapping."""
        targets = np.asarray([t for s, t in pairs if isinstance(s, Sample)], dtype=np.float32)
        chunk = Chunk.make(collate, [s for s, _ in pairs])
        if chunk.batch is not None:
            chunk.samples = [dataclasses.replace(s, inputs={}) for s in chunk.samples]
        return _TrainChunk(chunk, targets)

    def pin_memory(self) -> "_TrainChunk":
        """Called by the DataLoader's pinning thread."""
        self.chunk.pin_memory()
        return self


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _gt_mask(path: str | None, fallback_hw: Sequence[int]) -> np.ndarray:
    """The GT mask as bool (H, W) (``load_mask``, as training reads it); no mask: an empty one at
    the model's output size (authentic image)."""
    if not path:
        return np.zeros(tuple(int(v) for v in fallback_hw), bool)
    return load_mask(path)


def _row(labels: Labels, index: int) -> dict:
    item = labels.items[index]
    return {"index": index, "path": item.display, "rel_path": item.rel_path, "target": float(labels.targets[index]),
            "reference": item.reference, "mask": item.mask}


def _hyper(model: Model, name: str, cli: float | None, default: float) -> float:
    """The CLI value, else the model's own (its Config, then its ModelSpec), else the default."""
    for value in (cli, getattr(model.config, name, None), getattr(model.spec, name, None)):
        if value is not None:
            return float(value)
    return default


def _trainable_groups(model: Model) -> list[dict]:
    """``model.trainable_parameters()`` as param-group dicts (it may return either form)."""
    trainable = list(model.trainable_parameters())
    if trainable and isinstance(trainable[0], dict):
        return [dict(g, params=list(g["params"])) for g in trainable]
    return [{"params": trainable}]


def _param_groups(model: Model, opts: TrainOptions) -> list[dict]:
    """AdamW groups with lr and weight decay filled in. A group's ``lr_scale`` slows a pretrained
    backbone so fine-tuning keeps its features; from ``--init random`` there is nothing to keep,
    so every group then trains at the run's lr."""
    lr = _hyper(model, "lr", opts.lr, DEFAULT_LR)
    wd = _hyper(model, "weight_decay", opts.weight_decay, DEFAULT_WD)
    groups = _trainable_groups(model)
    for g in groups:
        scale = g.pop("lr_scale", 1.0)
        g["lr"] = lr * (scale if opts.init == "official" else 1.0)
        g.setdefault("weight_decay", wd)
    if not any(g["params"] for g in groups):
        raise UsageError(f"{model.spec.name} has no trainable parameters in this configuration")
    return groups


def _schedule_key(opts: TrainOptions, train_set: Labels, val_set: Labels | None) -> dict:
    """Everything that must match for --resume to continue the same schedule."""
    data = hashlib.sha256((train_set.digest + (val_set.digest if val_set else "")).encode()).hexdigest()
    return {
        "model": opts.model, "preset": opts.preset, "overrides": json.dumps(opts.overrides, sort_keys=True, default=str),
        "init": opts.init, "epochs": opts.epochs, "batch_size": opts.batch_size, "lr": opts.lr,
        "weight_decay": opts.weight_decay, "warmup_epochs": opts.warmup_epochs, "seed": opts.seed, "data_hash": data,
    }


def _save(model: Model, path: Path, card: dict) -> None:
    """All tensors for a random backbone; only the trained ones (+ buffers) over an official one."""
    from qscore.weights import save_checkpoint

    state = model.state_dict()
    if card["backbone"] == "official":
        trained = {id(p) for g in _trainable_groups(model) for p in g["params"]}
        keep = {n for n, p in model.named_parameters() if id(p) in trained} | {n for n, _ in model.named_buffers()}
        state = {k: v for k, v in state.items() if k in keep}
    save_checkpoint(path, state, card)


def _selected_by(metrics: dict, task: str, val_set: Labels | None) -> str:
    if val_set is None:
        return "last epoch (no --val)"
    if task != "forgery":
        return "validation srcc + plcc"
    modes = [k.removesuffix("_f1") for k in metrics if k.endswith("_f1")]
    return f"validation f1, mean with {', '.join(m + '_f1' for m in modes)}" if modes else "validation f1"


def _epoch_seed(seed: int, epoch: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{epoch}".encode()).digest()[:7], "little")


def _reseed(seed: int, epoch: int) -> None:
    s = _epoch_seed(seed, epoch)
    torch.manual_seed(s)
    np.random.seed(s % 2**32)


def _jsonable(metrics: dict) -> dict:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}


def _brief(metrics: dict) -> str:
    keys = ("train_loss", "srcc", "plcc", "krcc", "rmse", "f1", "iou", "pixel_auc", "image_auc")
    keys += tuple(k for k in metrics if k.endswith("_f1"))  # other modes' F1 (validate)
    return " ".join(f"{k}={metrics[k]:.4f}" for k in keys if isinstance(metrics.get(k), float))
