"""`qscore forgery` end to end on the CPU (tiny UGD-IML, random weights): CIML pair discovery by
folder convention and by --pairs, error rows for missing references, masks at original size."""

from __future__ import annotations

import numpy as np
import pandas as pd
from PIL import Image
from typer.testing import CliRunner

from qscore.cli import app


def image(path, size=(50, 34), seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def run(*args) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["forgery", *map(str, args), "--preset", "tiny", "--weights", "random",
                                      "--device", "cpu", "-j", "0", "-q"])
    return result.exit_code, result.output


def test_ciml_folder_convention_and_missing_reference(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    image(folder / "a.png", seed=1)
    image(folder / "a.ref.png", size=(40, 30), seed=2)  # another size: resized, and said so
    image(folder / "b.png", seed=3)  # no reference beside it
    out = tmp_path / "out"
    code, output = run(folder, "--mode", "ciml", "--out", out)
    assert code == 1, output
    df = pd.read_parquet(out / "ugdiml-ciml.parquet").set_index("rel_path")
    assert sorted(df.index) == ["a.png", "b.png"]  # the .ref. file is never scored itself
    assert df.loc["a.png", "status"] == "ok" and df.loc["a.png", "reference_path"].endswith("a.ref.png")
    assert "resized" in df.loc["a.png", "decode_warnings"]
    assert df.loc["b.png", "status"] == "error" and "b.ref.<ext>" in df.loc["b.png", "error"]
    for kind in ("mask", "probability", "uncertainty"):
        png = Image.open(out / df.loc["a.png", f"{kind}_path"])
        assert png.size == (50, 34) and png.mode == "L"
    assert 0.0 <= df.loc["a.png", "manipulated_fraction"] <= 1.0


def test_pairs_csv_without_paths_and_iml_mode(tmp_path):
    image(tmp_path / "f.png", seed=4)
    image(tmp_path / "r.png", seed=5)
    (tmp_path / "pairs.csv").write_text("forged,reference\nf.png,r.png\nf2.png,gone.png\n")
    image(tmp_path / "f2.png", seed=6)
    out = tmp_path / "out"
    code, output = run("--mode", "ciml", "--pairs", tmp_path / "pairs.csv", "--out", out)
    assert code == 1, output
    df = pd.read_parquet(out / "ugdiml-ciml.parquet").set_index("rel_path")
    assert df.loc["f.png", "status"] == "ok"
    assert df.loc["f2.png", "status"] == "error" and "reference" in df.loc["f2.png", "error"].lower()
    code, output = run(tmp_path / "f.png", "--mode", "iml", "--out", out)
    assert code == 0, output
    iml = pd.read_parquet(out / "ugdiml-iml.parquet")
    assert list(iml.rel_path) == ["f.png"] and iml.reference_path.isna().all()
    code, output = run(tmp_path / "f.png", "--mode", "iml", "--pairs", tmp_path / "pairs.csv", "--out", out)
    assert code == 2 and "--pairs is for --mode ciml" in output


def test_pairs_outside_the_csv_folder_keep_their_artefacts_under_out(tmp_path):
    """A --pairs entry with an absolute path elsewhere gets the manifest rule: rel_path is that
    path without its leading separator, so its PNGs land inside --out, never beside the input."""
    images, lists = tmp_path / "images", tmp_path / "lists"
    images.mkdir()
    lists.mkdir()
    image(images / "f.png", seed=7)
    image(images / "r.png", seed=8)
    (lists / "pairs.csv").write_text(f"forged,reference\n{images / 'f.png'},{images / 'r.png'}\n")
    out = tmp_path / "out"
    code, output = run("--mode", "ciml", "--pairs", lists / "pairs.csv", "--out", out)
    assert code == 0, output
    row = pd.read_parquet(out / "ugdiml-ciml.parquet").iloc[0]
    assert row.rel_path == str(images / "f.png").lstrip("/") and not row.rel_path.startswith("..")
    mask = (out / row.mask_path).resolve()
    assert mask.is_file() and mask.is_relative_to(out.resolve())
    assert sorted(p.name for p in images.iterdir()) == ["f.png", "r.png"]  # the input folder is untouched
