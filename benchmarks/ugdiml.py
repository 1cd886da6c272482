"""UGD-IML on one GPU: how fast and how big is inference, and does training learn both modes?

Measures
1. ``speed``: images/s and peak GPU memory of the default model (random weights) at 256 and 512
   px for DDIM S x K in {10 x 4, 25 x 8}: the whole forward (condition encoder + S steps with
   the B x K samples batched as one tensor), bf16 autocast and inference mode as in the runner,
   on a device-resident batch (no decoding). Peak memory is ``max_memory_allocated`` over the
   timed forwards, weights included. An out-of-memory configuration is recorded as ``oom``.
2. ``learn``: the learning check. ``qscore.train.synth.generate_forgery`` makes splices and
   copy-moves (plus 20 % authentic images) from BSDS500 with forged/reference/mask triples and
   train/val/test splits by source photo; ``qscore.train.loop.train`` trains one model for
   both modes jointly from scratch (``--init random``); ``loop.evaluate`` scores the held-out
   test split twice with the same weights, ``mode=iml`` and ``mode=ciml``, under the project's
   forgery protocol (``qscore.train.metrics.FORGERY_PROTOCOL``). Passes when CIML's F1 beats
   IML's. Same as the CLI: ``qscore synth forgery``, ``qscore train ugdiml --init random``,
   ``qscore eval ugdiml --set mode=iml|ciml``.

Call (on the GPU host, from the repository root)::

    python benchmarks/ugdiml.py --out bench-out/ugdiml                 # speed, then learn
    python benchmarks/ugdiml.py --out bench-out/ugdiml --only speed [--batches 1,8]
    python benchmarks/ugdiml.py --out bench-out/ugdiml --only learn [--n 2000 --epochs 40 --size 256]

Writes ``DIR/ugdiml.json`` (everything; the learn part also leaves its data, run folder and
checkpoint under DIR) and ``DIR/ugdiml.md`` (the tables); prints the markdown. Without CUDA
it stops with a message. About 1-2 min for ``speed`` and 4-6 min for ``learn`` on an H100.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch

from qscore.models.ugdiml import UGDIML

SIZES = (256, 512)
SCHEDULES = ((10, 4), (25, 8))  # DDIM steps S x samples K


def random_batch(b: int, size: int, k: int) -> dict[str, torch.Tensor]:
    """A CIML batch as the preparer makes it (CIML runs the same work as IML), on the GPU."""
    g = torch.Generator().manual_seed(0)
    batch = {
        "forged": torch.randn(b, 3, size, size, generator=g),
        "reference": torch.randn(b, 3, size, size, generator=g),
        "ciml": torch.ones(b, dtype=torch.bool),
        "noise": torch.randn(b, k, size, size, generator=g),
    }
    return {key: v.cuda() for key, v in batch.items()}


def time_forward(model: UGDIML, batch: dict, min_s: float, max_reps: int) -> tuple[float, int]:
    """Mean seconds per forward after one warm-up call: repeat until ``min_s`` or ``max_reps``."""
    with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16):
        model(batch)
        torch.cuda.synchronize()
        reps, t0 = 0, time.perf_counter()
        while reps < max_reps and (reps == 0 or time.perf_counter() - t0 < min_s):
            model(batch)
            torch.cuda.synchronize()
            reps += 1
    return (time.perf_counter() - t0) / reps, reps


def speed(batches: list[int], min_s: float, max_reps: int) -> list[dict]:
    rows = []
    for size in SIZES:
        for steps, samples in SCHEDULES:
            torch.manual_seed(0)
            model = UGDIML(UGDIML.make_config("default", size=size, steps=steps, samples=samples)).cuda().eval()
            for b in batches:
                row = {"size": size, "steps": steps, "samples": samples, "batch": b, "unet_batch": b * samples}
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                try:
                    seconds, reps = time_forward(model, random_batch(b, size, samples), min_s, max_reps)
                    row |= {
                        "images_per_s": round(b / seconds, 3),
                        "s_per_batch": round(seconds, 4),
                        "unet_passes_per_s": round(b * samples * steps / seconds, 1),
                        "peak_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1),
                        "reps": reps,
                    }
                except torch.cuda.OutOfMemoryError:
                    row["status"] = "oom"
                rows.append(row)
                print(json.dumps(row), flush=True)
            del model
    return rows


def learn(out: Path, n: int, epochs: int, size: int, batch_size: int, pristine: str | None, seed: int) -> dict:
    """Synthetic forgeries -> one joint training -> test F1/IoU/AUC in IML and CIML mode."""
    from qscore.train import synth
    from qscore.train.labels import read_labels
    from qscore.train.loop import TrainOptions, evaluate, train

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    data = out / "data"
    synth.generate_forgery(data, n, seed=seed, **({"pristine": pristine} if pristine else {}))
    t_synth = time.perf_counter() - t0
    run = out / "run"
    summary = train(TrainOptions(model="ugdiml", labels=str(data / "train.csv"), out=run, init="random",
                                 epochs=epochs, batch_size=batch_size, overrides={"size": size}, seed=seed,
                                 progress=False))
    t_train = time.perf_counter() - t0 - t_synth
    test = read_labels(data / "test.csv", "forgery")
    card = json.loads(Path(summary["best"]).with_suffix(".json").read_text())
    result = {"n": n, "epochs": epochs, "size": size, "batch_size": batch_size, "seed": seed,
              "n_test": len(test), "final_train_loss": card["metrics"].get("train_loss"),
              "synth_s": round(t_synth, 1), "train_s": round(t_train, 1), "modes": {}}
    for mode in ("iml", "ciml"):
        model = UGDIML(UGDIML.make_config(card["preset"], **{**card["config"], "mode": mode}))
        model.load(summary["best"], registry=None)
        t1 = time.perf_counter()
        metrics, _ = evaluate(model.to(device), test, device, batch_size=batch_size)
        result["modes"][mode] = metrics | {"eval_s": round(time.perf_counter() - t1, 1)}
    iml, ciml = result["modes"]["iml"]["f1"], result["modes"]["ciml"]["f1"]
    result["ciml_beats_iml"] = bool(ciml > iml)
    result["protocol"] = result["modes"]["iml"].get("protocol")
    return result


def markdown(report: dict) -> str:
    lines = [f"# UGD-IML on {report['device']}", ""]
    if report.get("speed"):
        lines += ["| size | S x K | batch | images/s | UNet passes/s | peak MiB |", "|---|---|---|---|---|---|"]
        for r in report["speed"]:
            cells = (f"{r['images_per_s']:.2f} | {r['unet_passes_per_s']:.0f} | {r['peak_mib']:.0f}"
                     if "images_per_s" in r else "oom | - | -")
            lines.append(f"| {r['size']} | {r['steps']} x {r['samples']} | {r['batch']} | {cells} |")
        lines.append("")
    if report.get("learn"):
        lr = report["learn"]
        lines += [f"Learning check: {lr['n']} synthetic samples, {lr['epochs']} epochs at {lr['size']} px, "
                  f"{lr['n_test']} held-out test images; train {lr['train_s']} s.", "",
                  "| mode | F1 | IoU | pixel AUC | image AUC | authentic FPR |", "|---|---|---|---|---|---|"]
        for mode, m in lr["modes"].items():
            cells = " | ".join(_fmt(m.get(k)) for k in ("f1", "iou", "pixel_auc", "image_auc", "authentic_fpr"))
            lines.append(f"| {mode} | {cells} |")
        lines += ["", f"CIML beats IML: {lr['ciml_beats_iml']}", "", f"Protocol: {lr['protocol']}"]
    return "\n".join(lines) + "\n"


def _fmt(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--only", choices=("speed", "learn"))
    p.add_argument("--batches", default="1,8", help="files per batch for the speed table")
    p.add_argument("--min-seconds", type=float, default=3.0)
    p.add_argument("--max-reps", type=int, default=5)
    p.add_argument("--n", type=int, default=2000, help="synthetic samples (70/15/15 split by photo)")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--pristine", default=None, help="folder holding bsds500/ (default: synth's)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/ugdiml.py needs a CUDA GPU")
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version()}
    if args.only in (None, "speed"):
        report["speed"] = speed([int(b) for b in args.batches.split(",")], args.min_seconds, args.max_reps)
    if args.only in (None, "learn"):
        report["learn"] = learn(args.out, args.n, args.epochs, args.size, args.batch_size, args.pristine, args.seed)
    (args.out / "ugdiml.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    text = markdown(report)
    (args.out / "ugdiml.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
