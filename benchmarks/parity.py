"""Score the shared test inputs with every model's small preset and random weights (fixed seeds)
on the CPU, and digest the rows, artefact PNGs and `qscore eval` predictions, so a refactor can
show it changed no score: run it on the old and the new tree and compare the two digests.

    PYTHONPATH=<tree>/src python benchmarks/parity.py digest OUT.json
    python benchmarks/parity.py compare OLD.json NEW.json

Volatile columns (timings, timestamps, version) are left out; everything else must be equal.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
IMAGES = [DATA / "biq2021" / "images" / n for n in ("ss01_1006.jpg", "ss01_1007.jpg", "ss01_1015.jpg")]
KODAK = [DATA / "pristine" / "kodak" / n for n in ("kodim01.png", "kodim02.png", "kodim03.png")]
VIDEOS = [DATA / "video" / n for n in ("carphone_distorted.mp4", "bikes.mp4")]
VOLATILE = {"scored_at", "decode_ms", "model_ms", "qscore_version", "path", "reference_path", "mtime"}
RUNS = [  # (name, task, model, preset, inputs, overrides)
    ("rsfiqa-cold", "image", "rsfiqa", "tiny", IMAGES, {}),
    ("rsfiqa-warm", "image", "rsfiqa", "tiny", IMAGES, {}),  # the region cache from the cold run
    ("rsfiqa-slic", "image", "rsfiqa", "tiny", IMAGES, {"regions": "slic", "describer": "measured"}),
    ("ugdiml-iml", "forgery", "ugdiml", "tiny", KODAK, {"mode": "iml"}),
    ("ugdiml-ciml", "forgery", "ugdiml", "tiny", None, {"mode": "ciml"}),
    ("clifvqa", "video", "clifvqa", "tiny", VIDEOS, {}),
    ("qclip", "video", "qclip", "tiny", VIDEOS, {}),
    ("mvqa", "video", "mvqa", "test", VIDEOS, {}),
]


def digest(path: str) -> None:
    import pyarrow.parquet as pq
    import torch

    from qscore.runner import RunConfig, run

    torch.set_num_threads(1)
    result = {}
    tmp = Path(tempfile.gettempdir()) / "qscore-parity"  # fixed: RSFIQA's cache_dir is in its config hash
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    pairs = tmp / "pairs.csv"
    pairs.write_text(f"forged,reference\n{KODAK[0]},{KODAK[1]}\n{KODAK[2]},{KODAK[0]}\n")
    for name, task, model, preset, inputs, overrides in RUNS:
        out = tmp / name
        overrides = {**overrides, **({"cache_dir": str(tmp / "regions")} if model == "rsfiqa" else {})}
        cfg = RunConfig(task=task, model=model, inputs=[str(p) for p in inputs or []], out=out, preset=preset,
                        overrides=overrides, weights="random", device="cpu", batch_size=2, workers=0, seed=0,
                        pairs=str(pairs) if inputs is None else None, save_npz=True, quiet=True, progress=False)
        code = run(cfg)
        table = pq.read_table(next(out.glob("*.parquet")))
        rows = [{k: v for k, v in row.items() if k not in VOLATILE} for row in table.to_pylist()]
        files = {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
                 for p in sorted(out.rglob("*")) if p.suffix in (".png", ".npz")}
        result[name] = {"exit": code, "columns": sorted(table.column_names), "rows": rows, "files": files}
    result["train-rsfiqa"] = _train(tmp, "rsfiqa", "tiny", IMAGES, {"cache_dir": str(tmp / "train-regions")})
    result["eval-rsfiqa"] = _eval(tmp, "rsfiqa", "tiny", IMAGES, {"cache_dir": str(tmp / "eval-regions")})
    result["eval-mvqa"] = _eval(tmp, "mvqa", "test", VIDEOS, {})
    result["eval-ugdiml"] = _eval(tmp, "ugdiml", "tiny", KODAK, {"mode": "ciml"})
    Path(path).write_text(json.dumps(result, indent=1, sort_keys=True, default=str) + "\n")


def _eval(tmp: Path, model: str, preset: str, inputs: list[Path], overrides: dict) -> dict:
    """`qscore eval` with random weights on labels 0.1, 0.2, ...: its predictions and metrics."""
    from typer.testing import CliRunner

    import pandas as pd

    from qscore.cli import app

    labels = tmp / f"{model}-labels.csv"
    if model == "ugdiml":  # forged,reference,mask: a square mask, an authentic image (no mask)
        from PIL import Image

        mask = np.zeros((512, 768), np.uint8)
        mask[100:300, 200:500] = 255
        Image.fromarray(mask).save(tmp / "mask.png")
        labels.write_text(f"forged,reference,mask\n{inputs[0]},{inputs[1]},{tmp / 'mask.png'}\n"
                          f"{inputs[2]},{inputs[0]},{tmp / 'mask.png'}\n{inputs[1]},{inputs[2]},\n")
    else:
        labels.write_text("path,mos\n" + "".join(f"{p},{0.1 * (i + 1):.1f}\n" for i, p in enumerate(inputs)))
    out = tmp / f"eval-{model}"
    sets = [a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]
    res = CliRunner().invoke(app, ["eval", model, "--labels", str(labels), "--weights", "random", "--preset", preset,
                                   "--device", "cpu", "--workers", "0", "--batch-size", "2", "--out", str(out), *sets])
    metrics = json.loads((out / "metrics.json").read_text())
    for volatile in ("qscore_version", "labels"):
        metrics.pop(volatile)
    predictions = pd.read_parquet(out / "predictions.parquet").to_dict("records")
    return {"exit": res.exit_code, "metrics": metrics, "predictions": predictions}


def _train(tmp: Path, model: str, preset: str, inputs: list[Path], overrides: dict) -> dict:
    """Two epochs of `qscore train --init random` on labels 0.1, 0.2, ...: the checkpoint's tensors."""
    from safetensors.torch import load_file

    from qscore.train.loop import TrainOptions, train

    labels = tmp / f"{model}-train.csv"
    labels.write_text("path,mos\n" + "".join(f"{p},{0.1 * (i + 1):.1f}\n" for i, p in enumerate(inputs)))
    out = tmp / f"train-{model}"
    train(TrainOptions(model=model, labels=str(labels), out=out, val=str(labels), preset=preset, overrides=overrides,
                       init="random", epochs=2, batch_size=2, device="cpu", workers=0, progress=False))
    state = load_file(out / "best.safetensors")
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    return {"tensors": {k: hashlib.sha256(v.numpy().tobytes()).hexdigest() for k, v in sorted(state.items())},
            "history": [{k: v for k, v in h.items() if k != "elapsed_s"} for h in history]}


def compare(old: str, new: str) -> int:
    """Every run's rows, files and predictions equal; columns added or dropped are listed (the
    rows are then compared on the columns both have)."""
    a, b = json.loads(Path(old).read_text()), json.loads(Path(new).read_text())
    bad = 0
    for name in sorted(set(a) | set(b)):
        x, y = a.get(name, {}), b.get(name, {})
        if "columns" in x and "columns" in y and x["columns"] != y["columns"]:
            shared = set(x["columns"]) & set(y["columns"])
            dropped, added = sorted(set(x["columns"]) - shared), sorted(set(y["columns"]) - shared)
            print(f"{name}: columns dropped {dropped}, added {added}")
            x, y = dict(x, columns=None), dict(y, columns=None)
            x["rows"] = [{k: v for k, v in r.items() if k in shared} for r in x["rows"]]
            y["rows"] = [{k: v for k, v in r.items() if k in shared} for r in y["rows"]]
        if x == y:
            print(f"{name}: identical")
            continue
        bad += 1
        print(f"{name}: DIFFERS")
        for key in sorted(set(x) | set(y)):
            if x.get(key) != y.get(key):
                print(f"  {key}:\n    old {str(x.get(key))[:400]}\n    new {str(y.get(key))[:400]}")
    return 1 if bad else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["digest"]:
        digest(sys.argv[2])
    elif sys.argv[1:2] == ["compare"]:
        sys.exit(compare(sys.argv[2], sys.argv[3]))
    else:
        sys.exit(__doc__)
