"""The `qscore` command line: thin; parses options into a RunConfig and calls the runner."""

from __future__ import annotations

import functools
import inspect
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Callable, Optional

import typer

from qscore import __version__, registry
from qscore.config import EXIT_USAGE, RunConfig, check
from qscore.console import overrides_from, setup_logging, usage
from qscore.media.discover import DiscoveryError
from qscore.types import UsageError

if TYPE_CHECKING:
    from qscore.weights import Registry

app = typer.Typer(
    help=(
        "Batch media quality and image integrity assessment on the GPU.\n\n"
        "Examples:\n\n"
        "  qscore image ./photos --model rsfiqa\n\n"
        "  qscore video ./clips --model mvqa --csv\n\n"
        "  qscore forgery ./images --mode iml\n\n"
        "  qscore forgery --mode ciml --pairs pairs.csv\n\n"
        "  qscore models\n\n"
        "Exit codes: 0 all files ok, 1 some files failed (their rows say why), 2 usage or "
        "configuration error."
    ),
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    rich_markup_mode=None,
)

Paths = Annotated[Optional[list[str]], typer.Argument(help="Files, folders (walked recursively) or .txt/.csv manifests of paths.", show_default=False)]
Model = Annotated[str, typer.Option("--model", "-m", help="Model name (see `qscore models`).")]
Out = Annotated[Path, typer.Option("--out", "-o", help="Output folder.")]
Csv = Annotated[bool, typer.Option("--csv", help="Also write a CSV twin of the Parquet table.")]
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
Batch = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Files per GPU batch (halved on CUDA out-of-memory).")]
Workers = Annotated[int, typer.Option("--workers", "-j", help="CPU decode workers; -1 = one per core (max 16), 0 = in-process.")]
Decoder = Annotated[str, typer.Option("--decoder", help="Video decoding: auto (the CPU: faster than NVDEC as measured, see docs/benchmarks.md), cpu or gpu (NVDEC).")]
Weights = Annotated[Optional[str], typer.Option("--weights", help="'random', a checkpoint from `qscore train` (.safetensors), or omit for the official weights in weights.toml.")]
Registry_ = Annotated[Optional[str], typer.Option("--registry", help="weights.toml to use (default: $QSCORE_WEIGHTS, ./weights.toml, packaged).")]
Preset = Annotated[Optional[str], typer.Option("--preset", help="Model size preset, e.g. default or tiny (see `qscore models`).")]
Set = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Model option KEY=VALUE (repeatable), e.g. --set frames=16.")]
Force = Annotated[bool, typer.Option("--force", help="Re-score files already scored ok with the same model, weights and options.")]
Ext = Annotated[Optional[list[str]], typer.Option("--ext", help="Only these extensions when walking folders (repeatable), e.g. --ext mp4 --ext mkv.")]
Seed = Annotated[int, typer.Option("--seed", help="Run seed: random weights and per-file sampling derive from it.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Only errors that stop the run.")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Log every failed file as a warning, and debug details.")]
MaxFiles = Annotated[Optional[int], typer.Option("--max-files", min=0, help="Score at most this many files (of those not done yet).")]
Npz = Annotated[bool, typer.Option("--npz", help="Also save float maps (probability, uncertainty, heat) as .npz under arrays/.")]
Engine = Annotated[str, typer.Option("--engine", help="local: this machine's one device; ray: every GPU of a Ray cluster (pip install 'qscore[ray]').")]
RayAddress = Annotated[Optional[str], typer.Option("--ray-address", help="Ray cluster to join, e.g. auto or HEAD:6379 (default: start a local Ray on this machine).")]
Maps = Annotated[bool, typer.Option("--maps/--no-maps", help="Write heatmap and mask PNGs; --no-maps writes the rows only (their *_path columns stay empty).")]


# The options every scoring command (image, video, forgery) takes, declared once: name, type, default.
SCORING_OPTIONS = [
    ("out", Out, Path("qscore-out")),
    ("csv", Csv, False),
    ("device", Device, "auto"),
    ("workers", Workers, -1),
    ("weights", Weights, None),
    ("registry_file", Registry_, None),
    ("preset", Preset, None),
    ("sets", Set, None),
    ("force", Force, False),
    ("ext", Ext, None),
    ("seed", Seed, 0),
    ("quiet", Quiet, False),
    ("verbose", Verbose, False),
    ("max_files", MaxFiles, None),
    ("npz", Npz, False),
    ("maps", Maps, True),
    ("engine", Engine, "local"),
    ("ray_address", RayAddress, None),
]


def scoring_command(fn: Callable[..., None]) -> Callable[..., None]:
    """``fn``'s own parameters followed by ``SCORING_OPTIONS``, as the one signature Typer reads;
    ``fn`` is called with its own and the shared ones gathered in ``options`` (a dict)."""
    own = [p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.name != "options"]
    shared = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=kind, default=default)
              for name, kind, default in SCORING_OPTIONS]

    @functools.wraps(fn)
    def command(**values: Any) -> None:
        fn(**{p.name: values[p.name] for p in own}, options={name: values[name] for name, _, _ in SCORING_OPTIONS})

    command.__signature__ = inspect.Signature(own + shared, return_annotation=None)
    command.__annotations__ = {p.name: p.annotation for p in own + shared}
    return command


def _run(task: str, paths: list[str] | None, model: str, batch_size: int, options: dict[str, Any],
         pairs: str | None = None, decoder: str = "auto", **extra: Any) -> None:
    """Scoring: the options as a RunConfig, checked before torch is imported, then the runner."""
    o = options
    setup_logging(o["quiet"], o["verbose"])
    overrides = {**overrides_from(o["sets"]), **{k: v for k, v in extra.items() if v}}
    if not paths and not pairs:
        usage("give at least one PATH" + (" (or --pairs CSV)" if task == "forgery" else ""))
    cfg = RunConfig(
        task=task, model=model, inputs=list(paths or []), out=o["out"], preset=o["preset"], overrides=overrides,
        weights=o["weights"], registry=o["registry_file"], device=o["device"], batch_size=batch_size,
        workers=o["workers"], exts=tuple(o["ext"] or ()) or None, pairs=pairs, force=o["force"], seed=o["seed"],
        max_files=o["max_files"], csv=o["csv"], save_npz=o["npz"], maps=o["maps"], quiet=o["quiet"], verbose=o["verbose"],
        engine=o["engine"], ray_address=o["ray_address"], decoder=decoder,
    )
    try:
        check(cfg)  # before torch is imported: a usage error comes at once
    except (UsageError, DiscoveryError) as e:
        usage(str(e))
    from qscore.runner import run

    raise typer.Exit(run(cfg))


@app.command(no_args_is_help=True)
@scoring_command
def image(
    paths: Paths = None, model: Model = "rsfiqa", batch_size: Batch = 16,
    backbone: Annotated[Optional[str], typer.Option("--backbone", help="RSFIQA feature backbone (any timm or torchvision name), e.g. resnet50.")] = None,
    *, options: dict[str, Any],
) -> None:
    """Score image quality, one row per image.

    Examples:

      qscore image ./photos --model rsfiqa

      qscore image list.txt --model rsfiqa --backbone resnet50 --csv --out results/
    """
    _run("image", paths, model, batch_size, options, backbone=backbone)


@app.command(no_args_is_help=True)
@scoring_command
def video(
    paths: Paths = None, model: Model = "clifvqa", batch_size: Batch = 8, decoder: Decoder = "auto",
    sampler: Annotated[Optional[str], typer.Option("--sampler", help="Frame sampler: uniform or framediff (models that sample frames).")] = None,
    *, options: dict[str, Any],
) -> None:
    """Score video quality, one row per video (clifvqa, mvqa, qclip). The default, clifvqa, is the
    one that ships a starter checkpoint, so it scores with nothing else installed.

    Examples:

      qscore video ./clips

      qscore video ./clips --model mvqa

      qscore video ./clips --model qclip --sampler framediff --batch-size 16
    """
    _run("video", paths, model, batch_size, options, decoder=decoder, sampler=sampler)


@app.command(no_args_is_help=True)
@scoring_command
def forgery(
    paths: Paths = None,
    mode: Annotated[str, typer.Option("--mode", help="iml: find manipulated pixels in an image; ciml: given its authentic source too.")] = "iml",
    pairs: Annotated[Optional[str], typer.Option("--pairs", help="CIML manifest CSV with columns forged,reference (then no PATH is needed).")] = None,
    batch_size: Batch = 8,
    *, options: dict[str, Any],
) -> None:
    """Localise image manipulations (UGD-IML): mask, uncertainty and forgery score per image.

    CIML pairs come from --pairs CSV or the folder convention: <stem>.ref.<ext> beside
    <stem>.<ext> is the authentic source (.ref. files are never scored themselves).

    Examples:

      qscore forgery ./images --mode iml --weights run/best.safetensors

      qscore forgery --mode ciml --pairs pairs.csv --npz
    """
    if mode not in ("iml", "ciml"):
        usage(f"--mode must be iml or ciml, not {mode!r}")
    if pairs and mode != "ciml":
        usage("--pairs is for --mode ciml")
    _run("forgery", paths, "ugdiml", batch_size, options, pairs=pairs, mode=mode)


@app.command()
def models() -> None:
    """List the models: task, parameters (total / trainable), presets, weights keys, licence.

    Example:

      qscore models
    """
    from rich.console import Console

    from qscore.weights import Registry

    try:
        reg = Registry.load()
    except Exception:  # noqa: BLE001 - a broken registry must not hide the models
        reg = None
    rows, notes = [], []
    for name in registry.names():
        try:
            cls = registry.get(name)
        except Exception as e:  # noqa: BLE001 - a broken optional dependency must not hide the rest
            rows.append([name, "?", "", "", "", f"unavailable: {e}"])
            continue
        total, trainable = _count(cls)
        s = cls.spec
        rows.append([name, s.task, total, trainable, ", ".join(cls.presets), "\n".join(reg.used_by(name) if reg else [])])
        notes.append(f"{name}: {s.summary}\n  paper: {s.paper}\n  licence: {s.licence}\n  score: {s.score_range}"
                     + _starter_note(name, reg))
    console = Console()
    console.print(_table("qscore models", ["model", "task", "params", "trainable", "presets", "weights keys"], rows,
                         whole=("model", "weights keys")))
    console.print("params: default preset; trainable: what `qscore train` optimises.\n", highlight=False)
    console.print("\n".join(notes), highlight=False, soft_wrap=True)


@app.command(no_args_is_help=True)
def bench(
    model: Annotated[str, typer.Argument(help="Model name.")],
    paths: Annotated[Optional[list[str]], typer.Argument(help="Inputs, each file or folder one set of rows (default: synthetic, see --synthetic).", show_default=False)] = None,
    synthetic: Annotated[str, typer.Option("--synthetic", help="image512, video720 or video1080 when no PATH is given; several: comma-separated (one set each).")] = "",
    n: Annotated[int, typer.Option("--n", help="Number of synthetic files per set.")] = 32,
    device: Device = "auto", batch_size: Batch = 8, workers: Workers = -1, weights: Weights = "random",
    preset: Preset = None, sets: Set = None, repeats: Annotated[int, typer.Option("--repeats", help="Timed bare-forward batches.")] = 10,
    warmup: Annotated[Optional[int], typer.Option("--warmup", help="Files in the runner's untimed first pass (default: all, which fills caches such as RSFIQA's regions).", show_default=False)] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the result as JSON here.")] = None,
    maps: Maps = True,
    decoder: Annotated[str, typer.Option("--decoder", help="Video decoding: auto, cpu or gpu; several: comma-separated (one row each).")] = "auto",
    gop: Annotated[str, typer.Option("--gop", help="Frames between keyframes of synthetic videos (250: one per clip; 50: every 2 s); several: comma-separated.")] = "250",
) -> None:
    """Measure a model: bare forward on pre-decoded inputs vs the runner end to end.

    Reports files/s, peak GPU memory, GPU busy fraction, mean decode / stage (collate + copy) /
    model ms per file, and the runner/bare ratio. Several PATHs, comma-separated --synthetic,
    --gop and --decoder make one row each (input set x decoder), the model built once, and a
    Markdown table too.

    Examples:

      qscore bench qclip --synthetic video720 --n 24 --batch-size 8

      qscore bench rsfiqa ./photos --batch-size 16 --json rsfiqa.json

      qscore bench mvqa --preset tiny --synthetic video720,video1080 --gop 50,250 --decoder cpu,gpu -b 16
    """
    import json
    import tempfile

    from qscore.bench import bench as measure, synthesize, table, task_of

    setup_logging(True, False)
    overrides = overrides_from(sets)
    with tempfile.TemporaryDirectory() as tmp:
        if paths:
            inputs = {p: [p] for p in paths}
        else:
            kinds = synthetic.split(",") if synthetic else [{"image": "image512", "forgery": "image512"}.get(task_of(model), "video720")]
            gops = [int(g) for g in gop.split(",")]
            inputs = {f"{k} gop {g}" if k.startswith("video") else k: synthesize(k, n, Path(tmp) / f"{k}-{g}", gop=g)
                      for k in kinds for g in (gops if k.startswith("video") else [250])}
        cfg = RunConfig(task=task_of(model), model=model, inputs=[], preset=preset, overrides=overrides,
                        weights=weights, device=device, batch_size=batch_size, workers=workers, maps=maps)
        rows = measure(cfg, inputs, decoder.split(","), repeats, warmup)
    result = rows[0] if len(rows) == 1 else rows
    text = json.dumps(result, indent=2)
    typer.echo(text)
    if len(rows) > 1:
        typer.echo(table(rows))
    if json_out:
        json_out.write_text(text + "\n")


def _starter_note(name: str, reg: Registry | None) -> str:
    """The starter's model card in a few lines: what it was trained on, how, and how well."""
    import json

    try:
        key = f"{name}-starter"
        if reg is None or key not in reg.keys():
            return ""
        card = json.loads(reg.path(key).with_suffix(".json").read_text())
    except Exception:  # noqa: BLE001 - a broken starter must not hide the list
        return ""
    info = card.get("starter", {})
    held_out = "; ".join(
        f"{split}: " + ", ".join(f"{k} {v:.3f}" for k, v in m.items() if k in ("srcc", "plcc", "f1", "iou", "pixel_auc"))
        + f" (n={m.get('n', m.get('n_manipulated', '?'))})"
        for split, m in info.get("held_out", {}).items()
    )
    epochs = f"epoch {card.get('epoch')} of {card.get('train', {}).get('epochs')}, picked by {card.get('selected_by')}"
    return (f"\n  starter: {key} ({card.get('preset')} preset; {epochs}; trained on {info.get('device')}), "
            f"the default when no trained head is registered\n    data: {info.get('data')}\n"
            f"    licence: {card.get('licence')}\n    held-out: {held_out}\n    remade by: benchmarks/starters.sh")


def _count(cls) -> tuple[str, str]:
    """Parameter counts of the default preset: on the meta device (no memory) where the model
    allows it, else built for real on the CPU."""
    import torch

    logging.getLogger().setLevel(logging.ERROR)  # open_clip warns about random init here
    for device in ("meta", "cpu"):
        try:
            with torch.device(device):
                model = cls(cls.make_config())
        except Exception:  # noqa: BLE001 - e.g. a model doing numpy work at construction
            continue
        groups = model.trainable_parameters()
        trainable = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
        total = sum(p.numel() for p in model.parameters())
        return f"{total / 1e6:.2f} M", f"{sum(p.numel() for p in trainable) / 1e6:.3f} M"
    return "?", "?"


weights_app = typer.Typer(help="The weights registry (weights.toml): list, pull, verify, path.")
app.add_typer(weights_app, name="weights")


@weights_app.callback(invoke_without_command=True)
def weights_main(ctx: typer.Context) -> None:
    _help_without_command(ctx)


def _help_without_command(ctx: typer.Context) -> None:
    """A group given no command prints its help and exits 0: asking what is there is no error."""
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())
        raise typer.Exit(0)
RegistryOpt = Annotated[Optional[str], typer.Option("--registry", help="weights.toml to use.")]


def _registry(path: str | None):
    from qscore.weights import Registry

    try:
        return Registry.load(path)
    except Exception as e:  # noqa: BLE001
        usage(f"cannot read weights registry: {e}")


@weights_app.command("list")
def weights_list(registry_file: RegistryOpt = None) -> None:
    """Every entry: key, source, licence, used by, cached or not.

    Example:

      qscore weights list
    """
    from rich.console import Console

    rows = _registry(registry_file).rows()
    header = [str(col) for col in (rows[0] if rows else ())]
    Console().print(_table("weights", header, [[str(v) for v in row.values()] for row in rows], whole=("key",)))


def _table(title: str, header: list[str], rows: list[list[str]], whole: tuple[str, ...]):
    """A rich table that never cuts a cell: the ``whole`` columns (names a user types back, such
    as weights keys) keep every line unbroken, the rest wrap (a URL mid-word) at any width."""
    from rich.table import Table

    table = Table(title=title)
    for i, col in enumerate(header):
        if col in whole:
            width = max([len(col)] + [len(line) for row in rows for line in row[i].splitlines()])
            table.add_column(col, no_wrap=True, min_width=width)
        else:
            table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*row)
    return table


@weights_app.command("pull")
def weights_pull(keys: Annotated[list[str], typer.Argument(help="weights.toml keys")], registry_file: RegistryOpt = None) -> None:
    """Download entries into the cache ($QSCORE_HOME) and verify their sha256.

    Example:

      qscore weights pull sam-vit-b clip-vit-b16-openai
    """
    from qscore.types import MissingWeights

    reg, failed = _registry(registry_file), False
    for key in keys:
        try:
            typer.echo(f"{key}: {reg.pull(key)}")
        except (MissingWeights, KeyError, OSError, ValueError) as e:
            typer.echo(str(e), err=True)
            failed = True
    raise typer.Exit(EXIT_USAGE if failed else 0)


@weights_app.command("verify")
def weights_verify(keys: Annotated[Optional[list[str]], typer.Argument(help="keys (default: every cached one)")] = None, registry_file: RegistryOpt = None) -> None:
    """Re-hash cached files against weights.toml.

    Example:

      qscore weights verify
    """
    reg, bad = _registry(registry_file), False
    for key in keys or [k for k in reg.keys() if reg.cache_path(k).exists()]:
        ok, message = reg.verify(key)
        typer.echo(f"{key}: {message}")
        bad |= not ok
    raise typer.Exit(1 if bad else 0)


@weights_app.command("path")
def weights_path(key: Annotated[str, typer.Argument(help="weights.toml key")], registry_file: RegistryOpt = None) -> None:
    """Print where a weights file is (or must be placed, for offline machines).

    Example:

      qscore weights path sam-vit-b
    """
    reg = _registry(registry_file)
    try:
        typer.echo(str(reg.cache_path(key)))
    except KeyError as e:
        usage(str(e.args[0]))


def _register_training() -> None:
    """`train`, `eval` and `synth` live with the training code."""
    from qscore.train.commands import eval_command, synth_command, train_command

    app.command("train", no_args_is_help=True)(train_command)
    app.command("eval", no_args_is_help=True)(eval_command)
    app.command("synth", no_args_is_help=True)(synth_command)


@app.callback(invoke_without_command=True)
def main(ctx: typer.Context, version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False) -> None:
    if version:
        typer.echo(f"qscore {__version__}")
        raise typer.Exit(0)
    _help_without_command(ctx)


_register_training()
