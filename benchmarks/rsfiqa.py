"""RSFIQA on one GPU: SAM region partition, stock generator vs the device path, and the whole model.

Measures
1. Region partition alone with SAM ViT-B (random weights unless ``--sam-checkpoint``) on
   ``--n`` 512x512 images (BIQ2021 photos from ``--images``, synthetic textures if absent):
   - ``stock``: segment-anything's ``SamAutomaticMaskGenerator`` (points_per_batch 64), one image
     at a time, then the reference painting and the label-map rules;
   - ``device``: ``SamRegions`` (batched encoder, chunked prompts, masks and NMS on the GPU,
     vectorised painting) at each batch size of ``--batches``.
   Images/s, peak GPU memory, masks per image (after filters and NMS, from the stock run) and
   agreement of the device label maps with the stock ones (fraction identical, mean pixel
   agreement). Two threshold settings: SAM's defaults (a random SAM passes few masks) and
   ``loose`` (pred IoU 0.3, stability 0.6) so a random SAM yields a trained SAM's mask load;
   the rows say how many masks each setting produced.
2. The whole model, default preset (SAM ViT-B, CLIP ViT-B/16 describer, resnet50 backbone,
   3x3 crops of 384 px), random weights, bf16 autocast and inference mode as the runner runs it,
   inputs prepared up front (decoding is the CPU workers' job, not timed):
   - ``cold/device``: empty region cache, segmentation + description + backbone + RSA;
   - ``cold/stock``: the same with label maps from the stock generator;
   - ``warm``: region cache filled (what later runs and every training epoch after the first pay).
   Images/s and peak GPU memory (``max_memory_allocated`` over the timed calls, weights included).

Call (on the GPU host)::

    python benchmarks/rsfiqa.py --out bench-out/rsfiqa [--n 32] [--batches 1,4,8] \\
        [--images ../shared/data/biq2021/images] [--sam-checkpoint sam_vit_b_01ec64.pth]

Writes ``DIR/rsfiqa.json`` (everything) and ``DIR/rsfiqa.md`` (the tables); prints the markdown.
Without CUDA it stops with a message. A configuration that runs out of memory is recorded as
``oom`` and the run goes on.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from qscore.models.rsfiqa import RSFIQA
from qscore.models.sam_regions import RegionRules, SamRegions, build_sam, sam_input, stock_label_map
from qscore.types import Item

DEFAULT_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "biq2021" / "images"
SETTINGS = {"sam-defaults": RegionRules(), "loose": RegionRules(pred_iou_thresh=0.3, stability_score_thresh=0.6)}


def load_images(folder: Path, n: int, out: Path) -> list[Path]:
    """n 512x512 image files: BIQ2021 photos (centre 512 crop) or synthetic textures."""
    from PIL import Image

    files = sorted(folder.glob("*.jpg"))[:n] if folder.is_dir() else []
    rng = np.random.default_rng(0)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        if i < len(files):
            img = Image.open(files[i]).convert("RGB")
            left, top = max(0, (img.width - 512) // 2), max(0, (img.height - 512) // 2)
            img = img.resize((max(512, img.width), max(512, img.height))).crop((left, top, left + 512, top + 512))
        else:
            img = Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).resize((512, 512), Image.BICUBIC)
        paths.append(out / f"img{i:04d}.png")
        img.save(paths[-1])
    return paths


def timed(fn, repeats: int = 1) -> tuple[float, float]:
    """(seconds per call, peak MiB) after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats, torch.cuda.max_memory_allocated() / 2**20


def partition(sam, images: list[np.ndarray], batches: list[int]) -> list[dict]:
    rows = []
    size = sam.image_encoder.img_size
    sam_inputs = [torch.from_numpy(sam_input(im, size)).permute(2, 0, 1) for im in images]
    for name, rules in SETTINGS.items():
        stock_maps: list[np.ndarray] = []

        def stock():
            stock_maps[:] = [stock_label_map(sam, im, rules) for im in images]

        seconds, peak = timed(stock)
        from segment_anything import SamAutomaticMaskGenerator

        generator = SamAutomaticMaskGenerator(
            sam, rules.points_per_side, pred_iou_thresh=rules.pred_iou_thresh,
            stability_score_thresh=rules.stability_score_thresh, box_nms_thresh=rules.box_nms_thresh,
        )
        masks = float(np.mean([len(generator.generate(im)) for im in images[:4]]))
        rows.append({"setting": name, "path": "stock", "batch": 1, "images_s": len(images) / seconds, "peak_mib": peak,
                     "masks_per_image": masks, "regions_per_image": float(np.mean([m.max() + 1 for m in stock_maps]))})
        regions = SamRegions(sam, rules)
        for batch in batches:
            got: list[np.ndarray] = []

            def device():
                got.clear()
                for i in range(0, len(images), batch):
                    chunk = sam_inputs[i : i + batch]
                    x = torch.zeros(len(chunk), 3, size, size, dtype=torch.uint8)
                    for b, t in enumerate(chunk):
                        x[b, :, : t.shape[1], : t.shape[2]] = t
                    hw = torch.tensor([t.shape[1:] for t in chunk])
                    out_hw = torch.tensor([im.shape[:2] for im in images[i : i + batch]])
                    got.extend(m.cpu().numpy() for m in regions(x.cuda(non_blocking=True), hw, out_hw))

            try:
                seconds, peak = timed(device)
            except torch.cuda.OutOfMemoryError:
                rows.append({"setting": name, "path": "device", "batch": batch, "images_s": "oom"})
                torch.cuda.empty_cache()
                continue
            same = [np.array_equal(a, b) for a, b in zip(got, stock_maps)]
            pixels = [float((a == b).mean()) for a, b in zip(got, stock_maps)]
            rows.append({"setting": name, "path": "device", "batch": batch, "images_s": len(images) / seconds,
                         "peak_mib": peak, "identical_maps": float(np.mean(same)), "pixel_agreement": float(np.mean(pixels))})
    return rows


def end_to_end(paths: list[Path], batches: list[int], sam_checkpoint: str | None) -> list[dict]:
    rows = []
    items = [Item(str(p), p.name, p.stat().st_size, p.stat().st_mtime) for p in paths]
    for batch in batches:
        with tempfile.TemporaryDirectory() as cache:
            torch.manual_seed(0)
            model = RSFIQA(RSFIQA.make_config("default", cache_dir=cache))
            if sam_checkpoint:
                model.regions.sam.load_state_dict(torch.load(sam_checkpoint, map_location="cpu", weights_only=True))
            model = model.cuda().eval()
            prepare = model.preparer()
            groups = [items[i : i + batch] for i in range(0, len(items), batch)]
            cold = [model.collate([prepare(it) for it in g]) for g in groups]

            def run(batches_, stock=False):
                def go():
                    for b in batches_:
                        b = {k: v.cuda(non_blocking=True) for k, v in b.items()}
                        if stock:
                            for i in range(len(b["hw"])):
                                h, w = b["hw"][i].tolist()
                                image = b["image"][i, :, :h, :w].permute(1, 2, 0).cpu().numpy()
                                with torch.autocast("cuda", enabled=False):
                                    labels = stock_label_map(model.regions.sam, image, model.rules)
                                model.add_regions(b, i, torch.from_numpy(labels).cuda())
                            b["cached"][:] = True
                        model(b)["score"].float().cpu()

                def wrapped():
                    with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16):
                        go()

                return wrapped

            for name, fn in (("cold/device", run(cold)), ("cold/stock", run(cold, stock=True))):
                try:
                    seconds, peak = timed(fn)
                    rows.append({"path": name, "batch": batch, "images_s": len(items) / seconds, "peak_mib": peak})
                except torch.cuda.OutOfMemoryError:
                    rows.append({"path": name, "batch": batch, "images_s": "oom"})
                    torch.cuda.empty_cache()
            warm = [model.collate([prepare(it) for it in g]) for g in groups]
            assert all(bool(b["cached"].all()) for b in warm), "the cold runs should have filled the cache"
            try:
                seconds, peak = timed(run(warm), repeats=3)
                rows.append({"path": "warm", "batch": batch, "images_s": len(items) / seconds, "peak_mib": peak})
            except torch.cuda.OutOfMemoryError:
                rows.append({"path": "warm", "batch": batch, "images_s": "oom"})
            del model
            torch.cuda.empty_cache()
    return rows


def markdown(result: dict) -> str:
    def table(rows, keys):
        lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        for r in rows:
            cells = [f"{r[k]:.3g}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    return (
        f"# RSFIQA benchmark ({result['device']}, {result['n']} images of 512x512, SAM {result['sam']})\n\n"
        "## Region partition (SAM ViT-B)\n\n"
        + table(result["partition"], ["setting", "path", "batch", "images_s", "peak_mib", "masks_per_image",
                                      "regions_per_image", "identical_maps", "pixel_agreement"])
        + "\n\n## Whole model (default preset, bf16)\n\n"
        + table(result["model"], ["path", "batch", "images_s", "peak_mib"])
        + "\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--batches", default="1,4,8")
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument("--sam-checkpoint", default=None, help="SAM ViT-B state dict (.pth); random weights without")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/rsfiqa.py needs CUDA")
    args.out.mkdir(parents=True, exist_ok=True)
    batches = [int(b) for b in args.batches.split(",")]
    from PIL import Image

    inputs = Path(tempfile.mkdtemp(prefix="rsfiqa-bench-"))  # not under --out: only results go there
    paths = load_images(args.images, args.n, inputs)
    images = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    sam = build_sam("vit_b")
    if args.sam_checkpoint:
        sam.load_state_dict(torch.load(args.sam_checkpoint, map_location="cpu", weights_only=True))
    sam = sam.cuda().eval()
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "n": args.n,
        "sam": "checkpoint" if args.sam_checkpoint else "random",
        "partition": partition(sam, images, batches),
    }
    del sam
    torch.cuda.empty_cache()
    result["model"] = end_to_end(paths, batches, args.sam_checkpoint)
    (args.out / "rsfiqa.json").write_text(json.dumps(result, indent=2))
    text = markdown(result)
    (args.out / "rsfiqa.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
