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
import sys
import tempfile
from pathlib import Path

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
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
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
        result["eval-rsfiqa"] = _eval(tmp, "rsfiqa", "tiny", IMAGES, {"cache_dir": str(tmp / "regions")})
        result["eval-mvqa"] = _eval(tmp, "mvqa", "test", VIDEOS, {})
    Path(path).write_text(json.dumps(result, indent=1, sort_keys=True, default=str) + "\n")


def _eval(tmp: Path, model: str, preset: str, inputs: list[Path], overrides: dict) -> dict:
    """`qscore eval` with random weights on labels 0.1, 0.2, ...: its predictions and metrics."""
    from typer.testing import CliRunner

    import pandas as pd

    from qscore.cli import app

    labels = tmp / f"{model}-labels.csv"
    labels.write_text("path,mos\n" + "".join(f"{p},{0.1 * (i + 1):.1f}\n" for i, p in enumerate(inputs)))
    out = tmp / f"eval-{model}"
    sets = [a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]
    res = CliRunner().invoke(app, ["eval", model, "--labels", str(labels), "--weights", "random", "--preset", preset,
                                   "--device", "cpu", "--workers", "0", "--batch-size", "2", "--out", str(out), *sets])
    metrics = json.loads((out / "metrics.json").read_text())
    metrics.pop("qscore_version", None)
    predictions = pd.read_parquet(out / "predictions.parquet").to_dict("records")
    return {"exit": res.exit_code, "metrics": metrics, "predictions": predictions}


def compare(old: str, new: str) -> int:
    a, b = json.loads(Path(old).read_text()), json.loads(Path(new).read_text())
    bad = 0
    for name in sorted(set(a) | set(b)):
        if a.get(name) == b.get(name):
            print(f"{name}: identical")
            continue
        bad += 1
        print(f"{name}: DIFFERS")
        for key in sorted(set(a.get(name, {})) | set(b.get(name, {}))):
            if a.get(name, {}).get(key) != b.get(name, {}).get(key):
                print(f"  {key}:\n    old {str(a.get(name, {}).get(key))[:400]}\n    new {str(b.get(name, {}).get(key))[:400]}")
    return 1 if bad else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["digest"]:
        digest(sys.argv[2])
    elif sys.argv[1:2] == ["compare"]:
        sys.exit(compare(sys.argv[2], sys.argv[3]))
    else:
        sys.exit(__doc__)
