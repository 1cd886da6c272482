"""`qscore train` / `qscore eval` end to end on the CPU with a test-only tiny quality model."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from qscore.media.image import load_image
from qscore.media.sampling import squash_resize, to_tensor
from qscore.models.base import Model, ModelSpec
from qscore.train.labels import LabelError, read_labels
from qscore.train.loop import TrainOptions, WarmupCosine, _param_groups, evaluate, selection_value, train
from qscore.types import Item, Sample, UsageError
from qscore.weights import Registry, load_checkpoint

PRISTINE = Path(__file__).resolve().parents[2] / "shared" / "data" / "pristine"


@dataclass
class TinyConfig:
    size: int = 16
    width: int = 4
    frozen_conv: bool = False  # an "official" pretrained conv that training leaves alone


@dataclass
class TinyPrepare:
    size: int
    train: bool

    def __call__(self, item: Item) -> Sample:
        image, facts = load_image(item.path)
        x = squash_resize(to_tensor(image[None]), (self.size, self.size))[0]
        if self.train and torch.rand(()) < 0.5:  # augmentation from the (reseeded) global RNG
            x = x.flip(-1)
        return Sample(item, {"image": x}, facts)


class TinyQuality(Model):
    spec = ModelSpec(name="tinyq", task="image", summary="test-only", paper="-", licence="none")
    Config = TinyConfig
    presets = {"tiny": {}, "frozen": {"frozen_conv": True}}

    def __init__(self, config: TinyConfig):
        super().__init__(config)
        self.conv = nn.Conv2d(3, config.width, 3, padding=1)
        self.norm = nn.BatchNorm2d(config.width)
        self.head = nn.Linear(config.width, 1)
        self.conv.requires_grad_(not config.frozen_conv)

    def preparer(self, train: bool = False) -> TinyPrepare:
        return TinyPrepare(self.config.size, train)

    def forward(self, batch):
        feat = torch.relu(self.norm(self.conv(batch["image"])))
        return {"score": self.head(feat.mean((2, 3))).squeeze(1)}

    def load_backbone(self, registry):
        g = torch.Generator().manual_seed(123)  # stands in for a pretrained backbone file
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g))

    def load_official(self, registry):
        self.load_backbone(registry)
        return "tiny-official", "zero-shot"


@pytest.fixture(autouse=True)
def tiny_model(monkeypatch):
    monkeypatch.setenv("QSCORE_EXTRA_MODELS", "tinyq=tests.test_train:TinyQuality")


@pytest.fixture
def data(tmp_path) -> Path:
    """12 small images whose MOS is their brightness; train.csv (8) and val.csv (4)."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "data"
    (folder / "img").mkdir(parents=True)
    rows = []
    for i in range(12):
        level = rng.uniform(0.1, 0.9)
        pixels = np.clip(level * 255 + rng.normal(0, 20, (20, 24, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / "img" / f"{i}.png")
        rows.append(f"img/{i}.png,{level:.4f}")
    (folder / "train.csv").write_text("path,mos\n" + "\n".join(rows[:8]) + "\n")
    (folder / "val.csv").write_text("path,mos\n" + "\n".join(rows[8:]) + "\n")
    return folder


def options(data: Path, out: Path, **kw) -> TrainOptions:
    base = dict(model="tinyq", labels=str(data / "train.csv"), val=str(data / "val.csv"), out=out, preset="tiny",
                init="random", epochs=2, batch_size=4, device="cpu", workers=0, seed=3, progress=False)
    return TrainOptions(**(base | kw))


def test_label_formats(tmp_path, data):
    fastvqa = tmp_path / "fastvqa.txt"
    fastvqa.write_text("img/0.png, 8.0, 30.0, 3.42\nimg/1.png, 10.0, 25.0, 1.5\n")
    labels = read_labels(fastvqa, "video", root=data)
    assert [it.rel_path for it in labels.items] == ["img/0.png", "img/1.png"]
    np.testing.assert_allclose(labels.targets, [3.42, 1.5])
    forgery = data / "forgery.csv"
    forgery.write_text("forged,reference,mask\nimg/2.png,img/3.png,img/4.png\nimg/5.png,,\n")
    rows = read_labels(forgery, "forgery")
    assert rows.items[0].reference == str(data / "img/3.png") and rows.items[0].mask == str(data / "img/4.png")
    assert rows.items[1].reference is None and rows.items[1].mask is None
    np.testing.assert_array_equal(rows.targets, [1.0, 0.0])
    (tmp_path / "bad.csv").write_text("path,mos\nimg/0.png,good\n")
    with pytest.raises(LabelError, match=r"bad.csv:2: score 'good'"):
        read_labels(tmp_path / "bad.csv", "image", root=data)
    with pytest.raises(LabelError, match="2 listed file"):
        read_labels(fastvqa, "video")  # wrong root: the files are not there


def test_warmup_then_cosine_to_zero():
    f = WarmupCosine(warmup=4, total=12)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0 and f(8) == pytest.approx(0.5) and f(12) == pytest.approx(0.0)
    assert all(f(s) >= f(s + 1) for s in range(4, 12))


def test_train_one_epoch_and_eval_through_the_cli(tmp_path, data):
    from qscore.cli import app

    run = tmp_path / "run"
    cli = CliRunner()
    result = cli.invoke(app, ["train", "tinyq", "--labels", str(data / "train.csv"), "--val", str(data / "val.csv"),
                              "--out", str(run), "--preset", "tiny", "--init", "random", "--epochs", "1",
                              "--batch-size", "4", "--device", "cpu", "--workers", "0", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "[tinyq-head]" in result.output and "sha256 = " in result.output
    card = json.loads((run / "best.json").read_text())
    assert card["model"] == "tinyq" and card["preset"] == "tiny" and card["backbone"] == "random"
    assert card["epoch"] == 1 and card["metrics"]["srcc"] is not None and card["selected_by"] == "validation srcc + plcc"
    assert card["train"]["n_train"] == 8 and len(card["data_hash"]) == 64 and card["qscore_version"]
    state, _ = load_checkpoint(run / "best.safetensors", expect_model="tinyq")
    assert set(state) == set(TinyQuality(TinyConfig()).state_dict())  # random backbone: every tensor
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert len(history) == 1 and math.isfinite(history[0]["train_loss"])

    out = tmp_path / "eval"
    result = cli.invoke(app, ["eval", "tinyq", "--labels", str(data / "val.csv"), "--weights", str(run / "best.safetensors"),
                              "--out", str(out), "--device", "cpu", "--workers", "0", "--plot", "--quiet"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"srcc", "plcc", "krcc", "rmse"} <= set(metrics) and metrics["n"] == 4 and metrics["n_failed"] == 0
    assert "no logistic fit" in metrics["plcc_convention"] and metrics["weights_id"] == card["weights_id"]
    table = pd.read_parquet(out / "predictions.parquet")
    assert len(table) == 4 and table["status"].eq("ok").all() and np.isfinite(table["prediction"]).all()
    assert metrics["srcc"] == pytest.approx(card["metrics"]["srcc"], abs=1e-6)  # eval reproduces validation
    assert (out / "scatter.png").stat().st_size > 0


def test_usage_errors_exit_2_with_one_line(tmp_path, data):
    from qscore.cli import app

    cli = CliRunner()
    base = ["train", "tinyq", "--labels", str(data / "train.csv"), "--out", str(tmp_path / "r"), "--device", "cpu"]
    for extra, message in ((["--set", "nope=1"], "unknown option"), (["--init", "magic"], "--init"),
                           (["--preset", "huge"], "unknown preset"), (["--resume", "--init", "random"], "--resume")):
        result = cli.invoke(app, base + extra)
        assert result.exit_code == 2, result.output
        assert message in result.output and result.output.count("qscore:") == 1
    result = cli.invoke(app, base[:3] + [str(tmp_path / "missing.csv")] + base[4:])
    assert result.exit_code == 2 and "cannot read labels" in result.output
    result = cli.invoke(app, ["train", "nosuch", "--labels", str(data / "train.csv"), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "unknown model" in result.output


def test_resume_continues_the_same_schedule(tmp_path, data):
    straight = train(options(data, tmp_path / "a"))
    assert straight["epochs_done"] == 2
    half = train(options(data, tmp_path / "b", stop_after=1))
    assert half["epochs_done"] == 1
    with pytest.raises(UsageError, match="already holds"):
        train(options(data, tmp_path / "b"))
    with pytest.raises(UsageError, match="lr was None, now 0.5"):
        train(options(data, tmp_path / "b", resume=True, lr=0.5))
    train(options(data, tmp_path / "b", resume=True))
    a, _ = load_checkpoint(tmp_path / "a" / "last.safetensors")
    b, card = load_checkpoint(tmp_path / "b" / "last.safetensors")
    assert card["epoch"] == 2
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    ra = torch.load(tmp_path / "a" / "last.resume.pt", weights_only=True)
    rb = torch.load(tmp_path / "b" / "last.resume.pt", weights_only=True)
    assert ra["scheduler"] == rb["scheduler"] and ra["best_epoch"] == rb["best_epoch"]
    assert len((tmp_path / "b" / "history.jsonl").read_text().splitlines()) == 2


def test_official_backbone_saves_trained_tensors_and_card_roundtrips_weights_toml(tmp_path, data):
    run = tmp_path / "run"
    summary = train(options(data, run, preset="frozen", init="official", epochs=1))
    state, card = load_checkpoint(run / "best.safetensors", expect_model="tinyq")
    assert card["backbone"] == "official"
    assert not any(k.startswith("conv.") for k in state)  # frozen, comes from the official file
    assert {"head.weight", "norm.weight", "norm.running_mean"} <= set(state)

    toml = tmp_path / "weights.toml"
    toml.write_text(summary["snippet"])
    registry = Registry.load(toml)
    path = registry.path("tinyq-head")
    assert path == (run / "best.safetensors").resolve()
    assert registry.entry("tinyq-head").used_by == ("tinyq",)
    state2, card2 = load_checkpoint(path, expect_model="tinyq")
    assert card2 == card and all(torch.equal(state[k], state2[k]) for k in state)

    model = TinyQuality(TinyQuality.make_config("frozen"))
    weights_id, head = model.load(str(path), registry)
    assert (weights_id, head) == (card["weights_id"], "trained")
    metrics, _ = evaluate(model, read_labels(data / "val.csv", "image"), torch.device("cpu"), 2, 0)
    assert metrics["srcc"] == pytest.approx(card["metrics"]["srcc"], abs=1e-6)


def test_backbone_lr_scale_applies_only_over_a_pretrained_backbone(tmp_path, data):
    class Slowed(TinyQuality):
        def trainable_parameters(self):
            return [{"params": list(self.head.parameters())}, {"params": list(self.conv.parameters()), "lr_scale": 0.1}]

    model = Slowed(Slowed.make_config("tiny"))
    official = _param_groups(model, options(data, tmp_path, init="official", lr=1e-3))
    scratch = _param_groups(model, options(data, tmp_path, init="random", lr=1e-3))
    assert [g["lr"] for g in official] == pytest.approx([1e-3, 1e-4])
    assert [g["lr"] for g in scratch] == pytest.approx([1e-3, 1e-3])


@pytest.mark.skipif(not (PRISTINE / "bsds500").is_dir(), reason="needs ../shared/data/pristine")
def test_forgery_train_and_eval_with_ugdiml_tiny(tmp_path):
    from qscore.train.synth import generate_forgery

    generate_forgery(tmp_path / "f", 6, seed=1, pristine=PRISTINE, authentic_fraction=0.3, workers=0)
    labels = tmp_path / "f" / "labels.csv"
    opts = TrainOptions(model="ugdiml", labels=str(labels), val=str(labels), out=tmp_path / "run", preset="tiny",
                        init="random", epochs=1, batch_size=3, device="cpu", workers=0, progress=False)
    summary = train(opts)
    card = json.loads((tmp_path / "run" / "best.json").read_text())
    assert summary["best_epoch"] == 1 and card["selected_by"] == "validation f1, mean with ciml_f1"
    for key in ("f1", "iou", "pixel_auc", "image_auc", "authentic_fpr", "protocol", "ciml_f1", "ciml_pixel_auc"):
        assert key in card["metrics"]  # one checkpoint serves both modes: validated in both
    assert card["config"]["mode"] == "iml"  # the CIML pass leaves the configured mode as it was
    assert selection_value({"f1": 0.2, "ciml_f1": 0.8}, "forgery") == pytest.approx(0.5)
    assert selection_value({"f1": 0.2}, "forgery") == pytest.approx(0.2)
    assert card["metrics"]["n_manipulated"] + card["metrics"]["n_authentic"] == 6


def test_forgery_metrics_read_the_map_the_row_writes(tmp_path):
    """With image_fit = pad the model's square holds the image and its padding: the metrics read
    the probability map postprocess writes (the image's part, at the file's size), not the square.
    A model whose map is 1 over the image's cells and 0 on the padding scores F1 1 on a fully
    manipulated image."""
    from PIL import Image

    from qscore.models.ugdiml import UGDIML

    Image.fromarray(np.full((40, 60, 3), 80, np.uint8)).save(tmp_path / "f.png")
    Image.fromarray(np.full((40, 60), 255, np.uint8)).save(tmp_path / "m.png")
    (tmp_path / "labels.csv").write_text("forged,reference,mask\nf.png,,m.png\n")
    model = UGDIML(UGDIML.make_config("tiny", image_scale=4, image_fit="pad")).eval()  # 32 cells over a 128 square

    def forward(batch):
        prob = torch.zeros(len(batch["ciml"]), 32, 32)
        prob[:, :12, :17] = 1.0  # the image covers 10 x 15 cells, top-left
        return {"score": prob.flatten(1).amax(1), "prob": prob, "std": torch.zeros_like(prob)}

    model.forward = forward
    metrics, rows = evaluate(model, read_labels(tmp_path / "labels.csv", "forgery"), torch.device("cpu"), 1, 0)
    assert metrics["f1"] == pytest.approx(1.0) and rows[0]["f1"] == pytest.approx(1.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_training_and_eval_on_cuda(tmp_path, data):
    summary = train(options(data, tmp_path / "run", device="cuda", epochs=2))
    _, card = load_checkpoint(summary["best"], expect_model="tinyq")
    assert all(math.isfinite(card["metrics"][k]) for k in ("train_loss", "srcc", "plcc"))
    model = TinyQuality(TinyQuality.make_config("tiny"))
    model.load(summary["best"], None)
    metrics, _ = evaluate(model.cuda(), read_labels(data / "val.csv", "image"), torch.device("cuda"), 2, 0)
    assert metrics["srcc"] == pytest.approx(card["metrics"]["srcc"], abs=1e-6)


def test_workers_hand_over_collated_batches_with_their_targets(data):
    """Training batches are stacked in the loader's workers; a file that fails is dropped with
    its target, so every target stays with its file; the samples arrive without their inputs
    (the batch holds them)."""
    from qscore.train.loop import _loader

    (data / "img" / "broken.png").write_bytes(b"not a png")
    rows = (data / "train.csv").read_text().splitlines()
    (data / "train.csv").write_text("\n".join(rows + ["img/broken.png,0.5"]) + "\n")
    labels = read_labels(data / "train.csv", "image")
    mos = {item.path: float(t) for item, t in zip(labels.items, labels.targets)}
    model = TinyQuality(TinyConfig())
    seen, failed = 0, []
    for part in _loader(model, labels, 3, workers=2):
        chunk = part.chunk
        failed += [f.item.path for f in chunk.failures]
        assert chunk.batch is not None and chunk.batch["image"].shape == (len(chunk.samples), 3, 16, 16)
        assert all(s.inputs == {} for s in chunk.samples)
        assert part.targets.tolist() == pytest.approx([mos[s.item.path] for s in chunk.samples])
        seen += len(chunk.samples)
    assert seen == 8 and [Path(p).name for p in failed] == ["broken.png"]
