"""MVQA on one GPU, in one run: is the fused scan right, and how fast and small is the model?

Measures
1. Which selective-scan path runs (mamba-ssm fused kernel, with or without causal-conv1d, or
   the pure PyTorch reference) and, when the fused kernel imports, its agreement with the
   reference: the scan alone at MVQA-tiny's size (b 2, d_inner 384, n 16, L 6273) with fp32
   inputs, and with bf16 inputs (the model's bf16 path) against the fp32 reference on the same
   values (also against the reference rounded to bf16, and the bf16 rounding floor itself);
   then the whole MVQA-tiny (random weights, 32 frames): bf16 + fused against fp32 + reference,
   and fp32 + fused against fp32 + reference (relative error of the regression-token features).
2. Videos/s, frames/s and peak GPU memory of MVQA-tiny, MVQA-middle and a FAST-VQA-B-sized
   Swin-T 3D (torchvision ``swin3d_t``, random weights, one output) on the same 32 x 224 x 224
   inputs: USDS samples of a real clip (``--video``) or random ones; bf16 autocast, inference
   mode, batch sizes ``--batches``. Peak memory is ``max_memory_allocated`` over the timed
   forwards, weights and the fp32 input batch (as the runner sends it; ``input_mib``) included.

Call (on the GPU host; mamba-ssm built by ``/work/shared/tools/build-mamba-sm90.sh``)::

    export PYTHONPATH=/tmp/msite:$PYTHONPATH      # where the build put mamba-ssm
    python benchmarks/mvqa.py --out bench-out/mvqa [--batches 1,4,8,16] [--scan auto]

``import mamba_ssm`` also imports einops, triton and transformers (its package ``__init__``
loads its language-model code); a missing one shows in ``env.fused_unavailable_because`` and
the reference scan runs instead.

Writes ``DIR/mvqa.json`` (everything) and ``DIR/mvqa.md`` (the tables); prints the markdown.
Without CUDA it stops with a message. A configuration that runs out of memory is recorded as
``oom`` and the run goes on.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from importlib import metadata
from pathlib import Path

import torch

from qscore.models import mamba
from qscore.models.mvqa import MVQA, USDSPreparer, backbone_input
from qscore.types import Item

DEFAULT_VIDEO = Path(__file__).resolve().parents[2] / "shared" / "data" / "video" / "bikes.mp4"


def rel_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref.double()).norm() / ref.double().norm())


def version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def scan_agreement(seed: int = 0) -> dict:
    """Fused kernel vs reference on the scan alone, at MVQA-tiny's size."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    b, d, n, length = 2, 384, 16, 6273

    def randn(*shape):
        return torch.randn(*shape, generator=g, device="cuda")

    x = dict(
        u=randn(b, d, length), delta=randn(b, d, length) - 2, A=-torch.exp(randn(d, n)), B=randn(b, n, length),
        C=randn(b, n, length), D=randn(d), z=randn(b, d, length), delta_bias=randn(d) * 0.1,
    )
    ref = mamba.selective_scan(**x, impl="reference")
    fused = mamba.selective_scan(**x, impl="fused")
    low = {k: v.bfloat16() if k in ("u", "delta", "B", "C", "z") else v for k, v in x.items()}
    ref_low = mamba.selective_scan_reference(**{k: v.float() for k, v in low.items()})
    fused_low = mamba.selective_scan(**low, impl="fused")
    torch.cuda.synchronize()
    timing = {}
    for impl in ("fused", "reference"):
        start = time.perf_counter()
        mamba.selective_scan(**x, impl=impl)
        torch.cuda.synchronize()
        timing[f"{impl}_ms"] = round(1000 * (time.perf_counter() - start), 3)
    return {
        "shape": {"b": b, "d_inner": d, "d_state": n, "L": length},
        "fp32_fused_vs_reference": rel_error(fused, ref),
        "bf16_fused_vs_fp32_reference": rel_error(fused_low, ref_low),
        "bf16_fused_vs_reference_rounded_to_bf16": rel_error(fused_low, ref_low.bfloat16()),
        "bf16_rounding_floor": rel_error(ref_low.bfloat16(), ref_low),
        **timing,
    }


def model_agreement(video: torch.Tensor) -> dict:
    """MVQA-tiny features: bf16 + fused and fp32 + fused against fp32 + reference."""
    torch.manual_seed(0)
    model = MVQA(MVQA.make_config("tiny")).cuda().eval()
    batch = video[:1].cuda()

    def features(impl: str, bf16: bool) -> torch.Tensor:
        for layer in model.backbone.layers:
            layer.mixer.impl = impl
        with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=bf16):
            return model.backbone(backbone_input(batch)).float()

    torch.backends.cudnn.allow_tf32 = False  # fp32 convolutions really in fp32 for this check
    ref = features("reference", bf16=False)
    result = {
        "bf16_fused_vs_fp32_reference": rel_error(features("fused", bf16=True), ref),
        "fp32_fused_vs_fp32_reference": rel_error(features("fused", bf16=False), ref),
    }
    torch.backends.cudnn.allow_tf32 = True
    return result


def inputs(path: Path | None, frames: int) -> tuple[torch.Tensor, str]:
    """One uint8 USDS sample (1, 1, T, 3, 224, 224) of a real clip, or random pixels of that shape."""
    if path is not None and path.is_file():
        prepare = USDSPreparer(frames=frames, interval=2, clips=1, grid=7, fragment=32, seed=0)
        item = Item(str(path), path.name, path.stat().st_size, path.stat().st_mtime)
        return prepare(item).inputs["video"][None], f"USDS of {path.name}"
    return torch.randint(0, 256, (1, 1, frames, 3, 224, 224), dtype=torch.uint8), "random"


def measure(forward, batch: torch.Tensor, iters: int, budget_s: float) -> dict:
    """Videos/s over up to ``iters`` timed forwards (after one warm-up) and the peak memory."""
    try:
        with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16):
            forward(batch)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            done, start = 0, time.perf_counter()
            while done < iters and (done == 0 or time.perf_counter() - start < budget_s):
                forward(batch)
                torch.cuda.synchronize()
                done += 1
            seconds = time.perf_counter() - start
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"status": "oom"}
    videos = done * batch.shape[0]
    return {
        "status": "ok",
        "iters": done,
        "videos_per_s": round(videos / seconds, 2),
        "frames_per_s": round(videos * batch.shape[2] / seconds, 1),
        "peak_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1),
        "input_mib": round(batch.numel() * batch.element_size() / 2**20, 1),
    }


CONTENDERS = ("mvqa-tiny", "mvqa-middle", "swin3d_t")


def build(name: str, scan: str, frames: int):
    """(model on the GPU, forward(batch (b, 1, T, 3, H, W))) for a contender."""
    if name == "swin3d_t":
        import torchvision

        swin = torchvision.models.video.swin3d_t(weights=None, num_classes=1).cuda().eval()
        return swin, lambda x: swin(backbone_input(x))  # the same normalised fragments MVQA reads
    model = MVQA(MVQA.make_config(name.removeprefix("mvqa-"), scan=scan, frames=frames)).cuda().eval()
    return model, lambda x: model({"video": x})["score"]


def markdown(result: dict) -> str:
    lines = [
        f"# MVQA benchmark ({result['env']['gpu']}, scan path: {result['env']['scan_path']})",
        "",
        f"Inputs: {result['inputs']}, {result['frames']} frames x 224 x 224, bf16 autocast, inference mode.",
        "",
    ]
    if "scan_agreement" in result:
        lines += ["## Fused scan vs pure PyTorch reference (relative L2 error)", "", "| check | value |", "|---|---|"]
        for section in ("scan_agreement", "model_agreement"):
            for key, value in result[section].items():
                if isinstance(value, float):
                    lines.append(f"| {section}: {key} | {value:.3g} |")
        lines.append("")
    lines += ["## Throughput and peak memory", "", "| model | params (M) | batch | videos/s | frames/s | peak MiB |", "|---|---|---|---|---|---|"]
    for name, entry in result["models"].items():
        for batch, m in entry["batches"].items():
            if m["status"] == "ok":
                lines.append(f"| {name} | {entry['params_m']} | {batch} | {m['videos_per_s']} | {m['frames_per_s']} | {m['peak_mib']} |")
            else:
                lines.append(f"| {name} | {entry['params_m']} | {batch} | {m['status']} | | |")
    lines += ["", "## MVQA vs swin3d_t (speed x, memory fraction) at equal batch", "", "| model | batch | speed vs swin3d_t | memory vs swin3d_t |", "|---|---|---|---|"]
    for name in ("mvqa-tiny", "mvqa-middle"):
        for batch, m in result["models"].get(name, {}).get("batches", {}).items():
            base = result["models"]["swin3d_t"]["batches"].get(batch, {})
            if m["status"] == base.get("status") == "ok":
                lines.append(
                    f"| {name} | {batch} | {m['videos_per_s'] / base['videos_per_s']:.2f}x | {m['peak_mib'] / base['peak_mib']:.2f} |"
                )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batches", default="1,4,8,16")
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--budget-s", type=float, default=20.0, help="max timed seconds per model and batch")
    parser.add_argument("--scan", default="auto", choices=mamba.IMPLS)
    parser.add_argument("--video", type=Path, default=DEFAULT_VIDEO)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/mvqa.py needs a CUDA GPU")
    torch.backends.cudnn.benchmark = True
    kernels = mamba.fused_kernels()
    video, source = inputs(args.video, args.frames)
    result = {
        "env": {
            "gpu": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "mamba_ssm": version("mamba_ssm") or version("mamba-ssm"),
            "causal_conv1d": version("causal_conv1d") or version("causal-conv1d"),
            "scan_path": mamba.scan_path("cuda", args.scan),
            "fused_unavailable_because": kernels.reason or None,
        },
        "inputs": source,
        "frames": args.frames,
        "models": {},
    }
    if kernels.selective_scan is not None:
        result["scan_agreement"] = scan_agreement()
        result["model_agreement"] = model_agreement(video)
    for name in CONTENDERS:
        model, forward = build(name, args.scan, args.frames)
        entry = {"params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2), "batches": {}}
        for batch in map(int, args.batches.split(",")):
            clips = video.cuda().repeat(batch, 1, 1, 1, 1, 1)
            entry["batches"][str(batch)] = measure(forward, clips, args.iters, args.budget_s)
            print(name, batch, entry["batches"][str(batch)], flush=True)
            del clips
        result["models"][name] = entry
        del model, forward  # free it before the next contender is measured
        torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mvqa.json").write_text(json.dumps(result, indent=2))
    (args.out / "mvqa.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
