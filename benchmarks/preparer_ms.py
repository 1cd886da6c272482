"""Preparer time per file (decode + sampling on one CPU core), best of 3, for video models.

    OMP_NUM_THREADS=1 python benchmarks/preparer_ms.py CLIP.mp4 [MODEL:PRESET ...]

Default models: mvqa:tiny clifvqa:default. The clip: e.g. ``qscore.bench.synthesize('video720',
1, Path('/tmp/v1'))``. Weights do not matter (random); only ``model.preparer()`` runs.
"""

import os
import sys
import time

import torch

from qscore import registry
from qscore.types import Item

torch.set_num_threads(1)
path = sys.argv[1]
item = Item(path, os.path.basename(path), os.path.getsize(path), os.path.getmtime(path))
for spec in sys.argv[2:] or ["mvqa:tiny", "clifvqa:default"]:
    name, preset = spec.split(":")
    cls = registry.get(name)
    prepare = cls(cls.make_config(preset)).preparer()
    prepare(item)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        prepare(item)
        times.append(time.perf_counter() - t0)
    print(f"{name} {preset}: {min(times) * 1e3:.0f} ms per file (best of 3)")
