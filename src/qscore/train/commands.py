"""The `qscore train`, `qscore eval` and `qscore synth` commands (registered by cli.py).

Usage and configuration errors (bad options, unreadable label files, unknown models, missing
weights, missing pristine data) print one ``qscore: ...`` line and exit with code 2.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Optional

import typer

from qscore.console import Progress, overrides_from, setup_logging, usage
from qscore.types import UsageError

Model = Annotated[str, typer.Argument(help="Model name (see `qscore models`), e.g. mvqa, qclip, clifvqa, rsfiqa, ugdiml.", show_default=False)]
Labels = Annotated[str, typer.Option("--labels", "-l", help="Label CSV: path,mos | FAST-VQA filename,duration,fps,MOS | forged,reference,mask.", show_default=False)]
Root = Annotated[Optional[str], typer.Option("--root", help="Folder the label paths are relative to (default: the label file's folder).")]
Preset = Annotated[Optional[str], typer.Option("--preset", help="Model size preset, e.g. default or tiny.")]
Set = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Model option KEY=VALUE (repeatable), e.g. --set frames=16.")]
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
Batch = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Files per batch.")]
Workers = Annotated[int, typer.Option("--workers", "-j", help="CPU decode workers; -1 = one per core (max 16), 0 = in-process.")]
Seed = Annotated[int, typer.Option("--seed", help="Seed for initialisation, shuffling and sampling.")]
Registry_ = Annotated[Optional[str], typer.Option("--registry", help="weights.toml to use (default: $QSCORE_WEIGHTS, ./weights.toml, packaged).")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Only errors.")]


def train_command(
    model: Model,
    labels: Labels,
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder: checkpoints, cards, history.jsonl.", show_default=False)],
    val: Annotated[Optional[str], typer.Option("--val", help="Validation label CSV: evaluated every epoch, picks the best checkpoint.")] = None,
    root: Root = None,
    preset: Preset = None,
    sets: Set = None,
    init: Annotated[str, typer.Option("--init", help="official: start from the pretrained backbone in weights.toml; random: from scratch (all tensors are saved).")] = "official",
    epochs: Annotated[int, typer.Option("--epochs", "-e", min=1, help="Epochs in the schedule.")] = 10,
    batch_size: Batch = 8,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Peak learning rate (default: the model's own, else 1e-3).")] = None,
    weight_decay: Annotated[Optional[float], typer.Option("--weight-decay", "--wd", help="AdamW weight decay (default: the model's own, else 0.05).")] = None,
    warmup_epochs: Annotated[float, typer.Option("--warmup-epochs", min=0, help="Linear warm-up length in epochs (at most half the run), then cosine to 0.")] = 1.0,
    device: Device = "auto",
    seed: Seed = 0,
    workers: Workers = -1,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its last epoch, with the same schedule.")] = False,
    stop_after: Annotated[Optional[int], typer.Option("--stop-after", min=1, help="Stop after this epoch (e.g. to fit a time slot); --resume continues.")] = None,
    registry_file: Registry_ = None,
    quiet: Quiet = False,
) -> None:
    """Train a model (its trainable parts) on labelled files; keep the best epoch.

    Quality models learn PLCC + 0.3 x rank loss on MOS; ugdiml learns the diffusion epsilon
    loss on forgery masks. Writes RUN_DIR/best.safetensors (+ .json card), last.* and
    history.jsonl, then prints the weights.toml snippet that registers the best checkpoint.
    Mixed precision (bf16) on CUDA; on the CPU a seed makes the run reproducible.

    Examples:

      qscore train mvqa --labels data/train.csv --val data/val.csv --out runs/mvqa

      qscore train qclip --labels konvid/labels.txt --root konvid/videos --epochs 8 --lr 1e-3 --out runs/qclip

      qscore train ugdiml --labels synth/train.csv --val synth/val.csv --init random --out runs/ugd

      qscore train mvqa --labels train.csv --out runs/mvqa --resume
    """
    from qscore.train.loop import TrainOptions, train

    setup_logging(quiet)
    opts = TrainOptions(
        model=model, labels=labels, out=out, val=val, root=root, preset=preset, overrides=overrides_from(sets), init=init,
        registry=registry_file, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
        warmup_epochs=warmup_epochs, device=device, seed=seed, workers=workers, resume=resume, stop_after=stop_after,
        progress=None if not quiet else False,
    )
    summary = _guard(train, opts)
    if summary["epochs_done"] < summary["epochs"]:
        typer.echo(f"stopped after epoch {summary['epochs_done']} of {summary['epochs']}; continue with --resume")
    if summary["snippet"]:
        typer.echo(f"best: {summary['best']} (epoch {summary['best_epoch']})\n\nRegister it in your weights.toml:\n")
        typer.echo(summary["snippet"])


def eval_command(
    model: Model,
    labels: Labels,
    weights: Annotated[Optional[str], typer.Option("--weights", help="A checkpoint from `qscore train` (.safetensors), 'random', or omit for the official weights.")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for predictions.parquet, metrics.json and scatter.png.")] = Path("qscore-eval"),
    root: Root = None,
    preset: Preset = None,
    sets: Set = None,
    device: Device = "auto",
    batch_size: Batch = 8,
    workers: Workers = -1,
    seed: Seed = 0,
    plot: Annotated[bool, typer.Option("--plot", help="Also draw scatter.png (prediction vs MOS; quality models).")] = False,
    registry_file: Registry_ = None,
    quiet: Quiet = False,
) -> None:
    """Evaluate a model on labelled files: metrics JSON + per-file predictions (Parquet).

    Quality: SRCC, PLCC (Pearson on raw predictions, no logistic fit), KRCC, RMSE (after a linear
    map to MOS). Forgery: pixel F1 / IoU at threshold 0.5 and pixel AUC per image, averaged over
    manipulated images; image AUC over all; authentic images' false-positive pixel rate. The
    protocol is written into metrics.json.

    Examples:

      qscore eval mvqa --labels data/test.csv --weights runs/mvqa/best.safetensors --plot

      qscore eval ugdiml --labels synth/test.csv --weights runs/ugd/best.safetensors --set mode=ciml
    """
    setup_logging(quiet)
    metrics = _guard(_evaluate, model, labels, weights, out, root, preset, overrides_from(sets), device, batch_size, workers,
                     seed, plot, registry_file)
    shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    typer.echo(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()))
    typer.echo(f"wrote {out / 'metrics.json'} and {out / 'predictions.parquet'}")


def synth_command(
    kind: Annotated[str, typer.Argument(help="video (distorted clips + MOS) or forgery (splices, copy-moves, inpaintings, masks).", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write into (labels.csv, train/val/test.csv, media).", show_default=False)],
    n: Annotated[int, typer.Option("--n", "-n", min=1, help="Number of samples.")] = 200,
    seed: Annotated[int, typer.Option("--seed", help="Seed: the same seed gives the same files.")] = 0,
    pristine: Annotated[str, typer.Option("--pristine", help="Folder with bsds500/ (images + segments) and kodak/.")] = "../shared/data/pristine",
    workers: Annotated[int, typer.Option("--workers", "-j", help="Processes; -1 = one per core, 0 = in-process.")] = -1,
    size: Annotated[str, typer.Option("--size", help="video: frame size WxH (even numbers).")] = "320x240",
    frames: Annotated[int, typer.Option("--frames", min=1, help="video: frames per clip.")] = 48,
    fps: Annotated[int, typer.Option("--fps", min=1, help="video: frame rate.")] = 24,
    clips: Annotated[str, typer.Option("--clips", help="video: folder of real clips to take frame windows from (*distorted* and clips smaller than --size skipped); auto = the video/ folder beside --pristine if there; none = photos only.")] = "auto",
    clip_fraction: Annotated[float, typer.Option("--clip-fraction", help="video: fraction of samples taken from --clips (when there are clips).")] = 0.2,
    authentic: Annotated[float, typer.Option("--authentic", help="forgery: fraction of authentic (unmanipulated) samples.")] = 0.2,
    jpeg: Annotated[float, typer.Option("--jpeg", help="forgery: probability of JPEG re-compression (quality 65-95) after the edit; 1 = every image.")] = 0.5,
    quiet: Quiet = False,
) -> None:
    """Generate synthetic labelled data from pristine photos and clips (deterministic for a seed).

    video: camera pans/zooms over BSDS500 and Kodak photos, and (--clip-fraction, default 20 %)
    frame windows of real clips (--clips), with graded blur, noise, compression, stutter,
    flicker and exposure; mos = prod(1 - severity) in [0, 1].
    forgery: splices, copy-moves and inpaintings (a segment removed and filled from its
    surroundings) shaped by BSDS500 segments with exact masks, plus authentic negatives; random
    JPEG (--jpeg) / resize / blur afterwards. Both split train/val/test by source photo / clip.

    Examples:

      qscore synth video --out data/synth-video --n 300 --seed 0

      qscore synth forgery --out data/synth-forgery --n 400 --authentic 0.25

      qscore synth forgery --out data/synth-forgery-jpeg --n 400 --authentic 0.25 --jpeg 1   (same seed: its test.csv is held out)

      qscore train mvqa --labels data/synth-video/train.csv --val data/synth-video/val.csv --out runs/mvqa
    """
    from qscore.train import synth

    if kind not in ("video", "forgery"):
        usage(f"synth makes 'video' or 'forgery' data, not {kind!r}")
    setup_logging(quiet)
    with Progress(enabled=None if not quiet else False) as progress:
        tick = progress.start(f"synth {kind}", n).advance if progress.bar else None
        if kind == "video":
            try:
                w, h = (int(v) for v in size.lower().split("x"))
            except ValueError:
                usage(f"--size expects WxH, e.g. 320x240, not {size!r}")
            labels = _guard(synth.generate_video, out, n, seed, pristine, (w, h), frames, fps, workers, tick, clips,
                            clip_fraction)
        else:
            labels = _guard(synth.generate_forgery, out, n, seed, pristine, authentic, workers, tick, jpeg)
    typer.echo(f"wrote {n} {kind} samples; labels: {labels} (splits: train.csv, val.csv, test.csv beside it)")


def _evaluate(model, labels, weights, out, root, preset, overrides, device, batch_size, workers, seed, plot, registry_file) -> dict:
    import numpy as np
    import pandas as pd

    from qscore import __version__
    from qscore.config import RunConfig, build_model, model_class, pick_device
    from qscore.train.labels import read_labels
    from qscore.train.loop import evaluate, scatter_png

    task = model_class(model).spec.task
    dev = pick_device(device)
    data = read_labels(labels, task, root)
    cfg = RunConfig(task=task, model=model, inputs=[], preset=preset, overrides=overrides, weights=weights,
                    registry=registry_file, device=device, seed=seed)
    net, weights_id, head = build_model(cfg, dev)
    metrics, rows = evaluate(net, data, dev, batch_size, workers)
    metrics = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}
    metrics |= {"model": model, "weights": weights, "weights_id": weights_id, "head": head,
                "config_hash": net.config_hash(), "labels": str(labels), "data_hash": data.digest, "qscore_version": __version__}
    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).drop(columns="index").to_parquet(out / "predictions.parquet", index=False)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    good = [r for r in rows if r["status"] == "ok"]
    if plot and task != "forgery" and len(good) >= 2:
        title = f"{model}  SRCC {metrics['srcc']:.3f}  PLCC {metrics['plcc']:.3f}  n={len(good)}"
        scatter_png(np.array([r["prediction"] for r in good]), np.array([r["target"] for r in good]), out / "scatter.png", title)
    return metrics


def _guard(fn, *args):
    """Run ``fn``; usage/configuration errors become one line and exit code 2."""
    from qscore.train.labels import LabelError
    from qscore.train.synth import SynthError

    try:
        return fn(*args)
    except (UsageError, LabelError, SynthError) as e:
        usage(str(e))
