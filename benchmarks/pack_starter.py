"""Turn a `qscore train` checkpoint into a shipped starter: floating tensors as fp16, a card
that says what it was trained on, and (with --metrics) the held-out numbers of `qscore eval`.

    python benchmarks/pack_starter.py RUN/best.safetensors src/qscore/starter/NAME.safetensors \
        --data "BIQ2021 train.csv (1,200 photos)" --licence "..." --command "qscore train ..." \
        [--set regions=auto] [--metrics EVAL_DIR/metrics.json ...]

The card keeps the training card's model, preset, config and training facts; ``--set`` changes
config fields the starter should run with (RSFIQA: regions=auto, SAM where it is installed).
Prints the weights.toml table. Re-run with only --metrics on a packed file to add its eval.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from qscore.weights import card_path, file_sha256, load_checkpoint, save_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("dest")
    ap.add_argument("--data", default="")
    ap.add_argument("--licence", default="")
    ap.add_argument("--command", default="")
    ap.add_argument("--device", default="")
    ap.add_argument("--set", action="append", default=[], dest="sets")
    ap.add_argument("--metrics", action="append", default=[], help="NAME=metrics.json of `qscore eval` on the packed file")
    args = ap.parse_args()
    dest = Path(args.dest)
    if args.checkpoint != args.dest:
        state, card = load_checkpoint(args.checkpoint)
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
        config = dict(card.get("config", {}))
        for kv in args.sets:
            key, value = kv.split("=", 1)
            try:
                config[key] = json.loads(value)  # false, 3, [2, 2] as JSON values; anything else a string
            except ValueError:
                config[key] = value
        starter = {"data": args.data, "licence": args.licence, "command": args.command, "device": args.device,
                   "epoch": card.get("epoch"), "validation": card.get("metrics"), "dtype": "float16", "held_out": {}}
        card = {**card, "config": config, "starter": starter, "licence": args.licence}
        card = save_checkpoint(dest, state, card)
    card = json.loads(card_path(dest).read_text())
    for spec in args.metrics:
        name, path = spec.split("=", 1)
        result = json.loads(Path(path).read_text())
        numbers = {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        card["starter"]["held_out"][name] = {"labels": Path(result.get("labels", "")).name, **numbers}
    card_path(dest).write_text(json.dumps(card, indent=2, sort_keys=True, default=str) + "\n")
    print(f'[{card["model"]}-starter]\npath = "starter/{dest.name}"\nsha256 = "{file_sha256(dest)}"\n'
          f'size = {dest.stat().st_size}\nlicence = {json.dumps(args.licence or card.get("licence", ""))}\n'
          f'used_by = ["{card["model"]}"]')
    print(f"{dest}: {sum(t.numel() for t in load_checkpoint(dest)[0].values()) / 1e6:.2f} M values, "
          f"{dest.stat().st_size / 1e6:.1f} MB", flush=True)


if __name__ == "__main__":
    main()
