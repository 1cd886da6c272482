"""Writer-thread CPU per image for RSFIQA (postprocess + artefact PNGs), with and without maps.

    OMP_NUM_THREADS=1 QSCORE_HOME=/tmp/qh python benchmarks/writer_ms.py IMAGE... [--preset tiny]

The work a writer thread does per image after the forward: ``postprocess`` (heatmap assembly
from the test crops and the overlay) and ``write_artefacts`` (PNG encoding and the file), once
with ``model.maps`` set and once as ``--no-maps`` runs it. Best of 3, ms per image, one core.
Random weights (the cost does not depend on them); the measured describer needs no CLIP.
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from qscore.models.rsfiqa import RSFIQA
from qscore.sinks import write_artefacts
from qscore.types import Item

parser = argparse.ArgumentParser()
parser.add_argument("images", nargs="+")
parser.add_argument("--preset", default="tiny")
args = parser.parse_args()
torch.set_num_threads(1)
model = RSFIQA(RSFIQA.make_config(args.preset, describer="measured")).eval()
prepare = model.preparer()
samples = [prepare(Item(p, os.path.basename(p), os.path.getsize(p), os.path.getmtime(p))) for p in args.images]
with torch.no_grad():
    outputs = model(model.collate(samples))
for maps in (True, False):
    model.maps = maps
    best = {"postprocess": float("inf"), "write": float("inf")}
    for _ in range(3):
        with tempfile.TemporaryDirectory() as out:
            t0 = time.perf_counter()
            results = model.postprocess(outputs, samples)
            t1 = time.perf_counter()
            for sample, result in zip(samples, results):
                if maps:
                    write_artefacts(Path(out), sample.item.rel_path, result.artefacts)
            t2 = time.perf_counter()
        best = {"postprocess": min(best["postprocess"], t1 - t0), "write": min(best["write"], t2 - t1)}
    per = {k: round(1e3 * v / len(samples), 1) for k, v in best.items()}
    print(f"maps={maps}: postprocess {per['postprocess']} ms + write {per['write']} ms per image")
