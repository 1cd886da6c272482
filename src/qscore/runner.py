"""The one batched inference engine: every model runs through ``run``.

discover -> resume filter -> DataLoader workers (model.preparer: decode + sample on the CPU)
-> collate -> pinned, non-blocking copy -> forward under autocast -> postprocess -> sinks.

The GPU is kept busy by a one-batch lookahead: batch n+1 is collated and copied while batch n's
forward runs, and batch n's results are fetched and written after n+1 is launched. On the CPU
the forward is synchronous, so there is nothing to overlap: each batch is written when it is done.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from qscore import __version__, registry
from qscore.config import (  # noqa: F401 - callers take the run's vocabulary from here too
    EXIT_FAILED_FILES,
    EXIT_OK,
    EXIT_USAGE,
    RunConfig,
    check,
    parse_sets,
)
from qscore.cpus import usable_cpus
from qscore.media import video
from qscore.media.discover import DiscoveryError, discover
from qscore.media.video import pick_decoder
from qscore.models.base import Model
from qscore.sinks import (
    LockedError,
    OutputLock,
    TableSink,
    done_keys,
    schema_for,
    write_arrays,
    write_artefacts,
    write_summary,
)
from qscore.types import Item, MissingWeights, Output, Sample, UsageError, safe_text

log = logging.getLogger("qscore")

# Postprocessing and artefact PNGs of a batch can cost more CPU than its forward (a 512x512
# heatmap overlay and its PNG: ~26 ms per image on one core): writer threads take batches side by side.
WRITERS = min(4, usable_cpus())
MAX_QUEUED = WRITERS + 1  # batches waiting for or in the writer threads
# --workers -1 with the GPU decoder: NVDEC does the decoding (an H200 has 7 engines), a worker
# only probes, indexes and samples, and each one holds a CUDA context
GPU_DECODE_WORKERS = 8


def default_workers() -> int:
    """DataLoader workers for ``--workers -1`` (scoring, training and evaluation alike): one per
    CPU this process may use (affinity, cgroup quota), at most 16."""
    return min(16, usable_cpus())


@dataclass
class Failure:
    """A file whose preparation failed in a worker."""

    item: Item
    error: str
    decode_ms: float = 0.0


@dataclass
class Chunk:
    """What a DataLoader worker hands over: failures, samples, and the samples already collated
    (None when collating failed or the worker has no model to collate with: the main thread
    then collates itself)."""

    failures: list[Failure]
    samples: list[Sample]
    batch: dict[str, torch.Tensor] | None

    @staticmethod
    def make(collate: Callable[[list[Sample]], dict[str, torch.Tensor]], chunk: list) -> "Chunk":
        samples = [s for s in chunk if isinstance(s, Sample)]
        try:
            batch = collate(samples) if samples and collate else None
        except Exception:  # noqa: BLE001 - retried per group in the main thread
            batch = None
        return Chunk([f for f in chunk if isinstance(f, Failure)], samples, batch)

    def pin_memory(self) -> "Chunk":
        """Called by the DataLoader's pinning thread (CUDA runs): page-locked, so the copy to
        the GPU is asynchronous."""
        if self.batch is not None:
            self.batch = {k: v.pin_memory() for k, v in self.batch.items()}
        return self


class Prepared(Dataset):
    """Items -> Sample or Failure. Runs in DataLoader workers; never raises, so one bad file
    never takes down a batch, and times the decode for the row's ``decode_ms``."""

    def __init__(self, items: Sequence[Item], prepare: Callable[[Item], Sample]):
        self.items, self.prepare = items, prepare

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Sample | Failure:
        item = self.items[i]
        if item.error:
            return Failure(item, f"InputError: {item.error}")
        t0 = time.perf_counter()
        try:
            sample = self.prepare(item)
        except Exception as e:  # noqa: BLE001 - every failure becomes a row
            return Failure(item, describe(e), (time.perf_counter() - t0) * 1e3)
        sample.facts.setdefault("decode_ms", (time.perf_counter() - t0) * 1e3)
        sample.inputs = {k: v.cpu() for k, v in sample.inputs.items()}  # GPU-decoded: leaves the worker on the CPU
        return sample


def describe(e: BaseException) -> str:
    """``Type: message`` with file-system errors made readable."""
    if isinstance(e, FileNotFoundError):
        return "FileNotFoundError: file vanished or does not exist"
    if isinstance(e, PermissionError):
        return "PermissionError: permission denied"
    msg = safe_text(str(e)).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else 'no message'}"


def pick_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as e:
        raise UsageError(f"bad --device {spec!r}: use auto, cpu or cuda[:N]") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {spec} asked for, but CUDA is not available on this machine")
    return device


def build_model(cfg: RunConfig, device: torch.device) -> tuple[Model, str, str]:
    """Model class + config + weights -> (model on device in eval mode, weights_id, head).

    Weights: ``--weights FILE`` or ``random``; else a trained head in the ``<model>-head`` slot;
    else the starter checkpoint shipped in the package (``<model>-starter``, head "starter"),
    unless another ``--preset`` is asked for; else the model's official weights."""
    from qscore.weights import Registry

    try:
        cls = registry.get(cfg.model)
    except KeyError as e:
        raise UsageError(str(e.args[0])) from e
    except ImportError as e:
        raise UsageError(f"model {cfg.model!r} cannot be loaded: {e}") from e
    if cls.spec.task != cfg.task:
        raise UsageError(f"model {cfg.model!r} is a {cls.spec.task} model; use `qscore {cls.spec.task}`")
    try:
        reg = Registry.load(cfg.registry)
        starter = reg.starter(cfg.model) if cfg.weights is None else None
    except MissingWeights as e:
        raise UsageError(str(e)) from e
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read weights registry: {e}") from e
    weights, card = cfg.weights, None
    if weights not in (None, "random"):
        if not Path(weights).is_file():
            raise UsageError(f"--weights {weights}: no such file (or use 'random')")
        card = _card(Path(weights), f"--weights {weights}")
    elif starter is not None:
        card = _card(starter[1], starter[0])
        if cfg.preset not in (None, card.get("preset")):
            starter, card = None, None  # another preset asked for: the starter does not fit it
        else:
            weights = str(starter[1])
    elif weights is None:
        card = _head_card(reg, f"{cfg.model}-head")
    overrides = dict(cfg.overrides)
    preset = cfg.preset
    if card is not None:
        preset = preset or card.get("preset")
        overrides = {**card.get("config", {}), **overrides}
    cfg.preset = preset or next(iter(cls.presets))  # a checkpoint's card names its preset
    if "seed" in {f.name for f in dataclasses.fields(cls.Config)}:
        overrides["seed"] = cfg.overrides.get("seed", cfg.seed)  # --seed drives per-file sampling
    try:
        config = cls.settle(cls.make_config(cfg.preset, **overrides), reg)
        torch.manual_seed(cfg.seed)  # random weights are reproducible too
        model = cls(config)
        weights_id, head = model.load(weights, reg)
    except MissingWeights as e:
        raise UsageError(str(e)) from e
    except OSError as e:
        raise UsageError(f"cannot read {e.filename}: {e.strerror}") from e
    except (ValueError, TypeError) as e:
        raise UsageError(f"{cfg.model}: {e}") from e
    if starter is not None:
        weights_id, head = f"{starter[0]}@{weights_id}", "starter"
    return model.to(device).eval(), weights_id, head


def _head_card(reg: Any, key: str) -> dict | None:
    """The card of the checkpoint in a model's head slot, if the slot holds one with a card (its
    preset and config are the ones the head was trained with)."""
    try:
        path = reg.path(key) if key in reg.keys() and reg.entry(key).kind != "none" else None
    except MissingWeights:
        return None  # load_official reports it
    from qscore.weights import card_path

    return _card(path, key) if path is not None and card_path(path).is_file() else None


def _card(path: Path, what: str) -> dict:
    """The JSON card beside a checkpoint (its preset and config)."""
    from qscore.weights import card_path

    card = card_path(path)
    try:
        return json.loads(card.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{what}: cannot read its card {card}: {e}") from e


def run(cfg: RunConfig, built: tuple[Model, str, str] | None = None) -> int:
    """Score every input; returns the exit code (0 ok, 1 some files failed, 2 usage error).
    ``built``: ``build_model``'s result to use instead of building (``qscore bench``'s rows)."""
    started = time.time()
    try:
        check(cfg)
        device = pick_device(cfg.device)
        cfg = dataclasses.replace(cfg, decoder=pick_decoder(cfg.decoder, device.type) if cfg.task == "video" else "cpu")
        model, weights_id, head = built or build_model(cfg, device)
        items = discover(cfg.inputs, cfg.task, cfg.exts, ciml=_mode(model) == "ciml", pairs=cfg.pairs)
    except (UsageError, DiscoveryError) as e:
        log.error("qscore: %s", e)
        return EXIT_USAGE
    spec = model.spec
    stem = spec.name if spec.task != "forgery" else f"{spec.name}-{_mode(model)}"
    sink = TableSink(cfg.out, stem, schema_for(spec.columns))
    try:
        with OutputLock(cfg.out / f"{stem}.lock"):
            stats = _score(cfg, model, device, items, sink, weights_id, head)
            table = sink.compact(csv=cfg.csv)
    except LockedError as e:
        log.error("qscore: %s", e)
        return EXIT_USAGE
    code = EXIT_FAILED_FILES if stats["error"] else EXIT_OK
    summary = {
        "model": spec.name,
        "mode": _mode(model),
        "task": spec.task,
        "preset": cfg.preset,
        "weights_id": weights_id,
        "head": head,
        "config_hash": model.config_hash(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "decoder": cfg.decoder,
        **stats,
        "rows_in_table": 0 if table is None else table.num_rows,
        "table": str(sink.table_path),
        "started": datetime.fromtimestamp(started, timezone.utc).isoformat(timespec="seconds"),
        "elapsed_s": round(time.time() - started, 3),
        "exit_code": code,
        "qscore_version": __version__,
    }
    write_summary(cfg.out / f"{stem}.summary.json", summary)
    report(summary, quiet=cfg.quiet)
    return code


def _mode(model: Model) -> str | None:
    return getattr(model.config, "mode", None)


def _score(
    cfg: RunConfig, model: Model, device: torch.device, items: list[Item], sink: TableSink, weights_id: str, head: str
) -> dict[str, Any]:
    """Resume filter, then the batched loop. Returns counts and throughput."""
    config_hash = model.config_hash()
    done = set() if cfg.force else done_keys(sink.existing())
    key = lambda it: (safe_text(it.rel_path), it.size, it.mtime, model.spec.name, weights_id, config_hash)  # noqa: E731
    todo = [it for it in items if key(it) not in done]
    if cfg.max_files is not None:
        todo = todo[: cfg.max_files]
    stats = {"discovered": len(items), "skipped": len(items) - len(todo), "ok": 0, "error": 0}
    totals = {"model_ms": 0.0, "decode_ms": 0.0, "stage_ms": 0.0}
    base = {
        "task": model.spec.task,
        "model": model.spec.name,
        "mode": _mode(model),
        "preset": cfg.preset,
        "weights_id": weights_id,
        "head": head,
        "config_hash": config_hash,
        "lower_better": model.spec.lower_better,
        "qscore_version": __version__,
    }
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.maps = cfg.maps or cfg.save_npz
    if not cfg.quiet:
        log.info("model %s (preset %s), weights %s (head: %s), device %s", model.spec.name, cfg.preset, weights_id, head, device)
    engine = _Engine(cfg, model, device, sink, base, stats, totals)
    t0 = time.perf_counter()
    with Progress(len(todo), enabled=cfg.progress, quiet=cfg.quiet) as progress:
        engine.progress = progress
        if todo:
            engine.drive(todo)
    end = time.perf_counter()
    elapsed = end - t0
    scored = stats["ok"] + stats["error"]
    stats.update(
        scored=scored,
        # the run's fixed costs: until the first forward is launched (worker start, first
        # decodes) and after the last one is back (its postprocessing and writes, shutdown)
        startup_s=round(engine.first_launch - t0, 3) if engine.first_launch else None,
        drain_s=round(end - engine.last_done, 3) if engine.last_done else None,
        files_per_s=round(scored / elapsed, 3) if elapsed > 0 else None,
        batch_size=engine.batch_size,
        gpu_busy=round(totals["model_ms"] / (elapsed * 1e3), 3) if elapsed > 0 and device.type == "cuda" else None,
        **{f"{k}_mean": round(v / scored, 3) if scored else None for k, v in totals.items()},
        peak_gpu_mb=round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None,
    )
    return stats


def chunk_size(n_files: int, batch_size: int, workers: int) -> int:
    """Files per DataLoader task. A worker prepares its whole chunk before handing it over, so a
    run with fewer files than workers x batch gets smaller chunks (and GPU batches) to keep every
    worker decoding: 64 videos, batch 16, 16 workers -> 4 per worker, not 16 on 4 workers."""
    return max(1, min(batch_size, math.ceil(n_files / max(workers, 1))))


class _Engine:
    """The loop over batches: lookahead, OOM back-off, per-file isolation of model errors."""

    def __init__(self, cfg, model, device, sink, base, stats, totals):
        self.cfg, self.model, self.device, self.sink, self.base = cfg, model, device, sink, base
        self.stats, self.totals = stats, totals  # counts by status; summed decode/stage/model ms
        self.batch_size = max(1, cfg.batch_size)
        self.autocast = device.type == "cuda"
        self.progress: Progress | None = None
        self._writer = ThreadPoolExecutor(max_workers=WRITERS, thread_name_prefix="qscore-writer")
        self._counting = threading.Lock()  # stats and progress, updated by the writer threads
        self.first_launch: float | None = None  # perf_counter at the first forward's launch
        self.last_done: float | None = None  # perf_counter when the latest forward was back
        self._queued: deque[Future] = deque()

    def drive(self, todo: list[Item]) -> None:
        gpu = self.cfg.decoder == "gpu"
        workers = self.cfg.workers if self.cfg.workers >= 0 else default_workers()
        if gpu and self.cfg.workers < 0:
            workers = min(workers, GPU_DECODE_WORKERS)
        # CUDA cannot be used in a forked child: GPU-decoding workers are spawned, and the model
        # (whose collate the fork inherits) stays here, so the main thread collates their chunks
        spawn = gpu and workers > 0
        decoding = functools.partial(video.configure, self.cfg.decoder, max(1, usable_cpus() // max(workers, 1)))
        loader = DataLoader(
            Prepared(todo, self.model.preparer()),
            batch_size=chunk_size(len(todo), self.batch_size, workers),
            num_workers=workers,
            collate_fn=functools.partial(Chunk.make, None if spawn else self.model.collate),
            pin_memory=self.device.type == "cuda",
            prefetch_factor=2 if workers else None,  # 2 batches per worker: bounded host memory
            persistent_workers=False,
            worker_init_fn=decoding,
            multiprocessing_context="spawn" if spawn else None,
        )
        before = decoding()  # this process decodes too where workers == 0
        try:
            self._loop(loader)
        finally:
            video.configure(before.decoder, before.threads)

    def _loop(self, loader: DataLoader) -> None:
        pending = None
        for chunk in loader:
            self._write([self._error_row(f.item, f.error, {"decode_ms": f.decode_ms}) for f in chunk.failures], [])
            whole = chunk.batch is not None and len(chunk.samples) <= self.batch_size
            for group in [chunk.samples] if whole else self._groups(chunk.samples):
                launched = self._launch(group, chunk.batch if whole else None)
                if pending is not None:
                    self._finish(*pending)
                if self.device.type != "cpu":
                    pending = launched
                else:  # the forward has run already: write the batch now (progress, less lost to a kill)
                    self._finish(*launched)
        if pending is not None:
            self._finish(*pending)
        self.flush()

    def _groups(self, samples: list[Sample]):
        for i in range(0, len(samples), self.batch_size):
            yield samples[i : i + self.batch_size]

    def _launch(self, samples: list[Sample], batch: dict[str, torch.Tensor] | None = None):
        """Copy (collating here only when the worker could not) and start the forward; returns
        what ``_finish`` needs."""
        if not samples:
            return [], None, None, None
        try:
            t0 = time.perf_counter()
            if batch is None:
                batch = self.model.collate(samples)
            if self.device.type == "cuda":
                batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            self.totals["stage_ms"] += (time.perf_counter() - t0) * 1e3
            timer = _Timer(self.device)
            self.first_launch = self.first_launch or time.perf_counter()
            with torch.inference_mode(), torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocast):
                outputs = self.model(batch)
                # Queued right behind this batch (into pinned memory), so `_finish` waits for this
                # batch only, not for the next one launched after it: the GPU never idles there.
                outputs = {k: v.float().to("cpu", non_blocking=True) if torch.is_tensor(v) else v for k, v in outputs.items()}
            timer.stop()
            return samples, outputs, timer, None
        except torch.cuda.OutOfMemoryError:
            if len(samples) == 1:
                return samples, None, None, "OutOfMemoryError: one file does not fit in GPU memory"
            torch.cuda.empty_cache()
            self.batch_size = max(1, len(samples) // 2)
            log.warning("CUDA out of memory at batch %d: retrying with batch %d", len(samples), self.batch_size)
            return self._split(samples)
        except Exception as e:  # noqa: BLE001
            if len(samples) == 1:
                return samples, None, None, describe(e)
            return self._split(samples, isolate=True)

    def _split(self, samples: list[Sample], isolate: bool = False):
        """Rerun ``samples`` in halves (OOM) or one by one (to find the file that broke the
        batch); results are finished at once, so this returns an empty launch."""
        size = 1 if isolate else self.batch_size
        for i in range(0, len(samples), size):
            self._finish(*self._launch(samples[i : i + size]))
        return [], None, None, None

    def _finish(self, samples, outputs, timer, error) -> None:
        if not samples:
            return
        if error is not None:
            self._write([self._error_row(s.item, error, s.facts) for s in samples], [])
            return
        batch_ms = timer.elapsed_ms()  # waits for the forward and its copy to the host
        self.last_done = time.perf_counter()
        self.totals["model_ms"] += batch_ms
        self.totals["decode_ms"] += sum(s.facts.get("decode_ms", 0.0) for s in samples)
        self._submit(self._post, samples, outputs, batch_ms / len(samples))

    def _post(self, samples: list[Sample], outputs: dict, per_file_ms: float) -> None:
        """Writer thread: postprocess (maps to images), rows, artefacts, Parquet part. Threads
        run side by side: ``postprocess`` must not keep state between batches."""
        try:
            results = self.model.postprocess(outputs, samples)
        except Exception as e:  # noqa: BLE001
            self._write_now([self._error_row(s.item, f"postprocess: {describe(e)}", s.facts) for s in samples], [])
            return
        self._write_now([self._ok_row(s, r, per_file_ms) for s, r in zip(samples, results)], results)

    def _write(self, rows: list[dict], results: list[Output]) -> None:
        if rows:
            self._submit(self._write_now, rows, results)

    def _submit(self, fn: Callable, *args: Any) -> None:
        """Run ``fn`` on a writer thread, so postprocessing, PNG encoding and Parquet parts
        overlap the next batch; at most ``MAX_QUEUED`` batches wait (a killed run loses little)."""
        while len(self._queued) >= MAX_QUEUED:
            self._queued.popleft().result()
        self._queued.append(self._writer.submit(fn, *args))

    def flush(self) -> None:
        while self._queued:
            self._queued.popleft().result()
        self._writer.shutdown()

    def _write_now(self, rows: list[dict], results: list[Output]) -> None:
        for row, result in zip(rows, results):
            try:
                if self.cfg.maps:
                    for kind, rel in write_artefacts(self.cfg.out, row["rel_path"], result.artefacts).items():
                        row[f"{kind}_path"] = rel
                if self.cfg.save_npz:
                    write_arrays(self.cfg.out, row["rel_path"], result.arrays)
            except OSError as e:
                row.update(status="error", error=f"cannot write artefact: {e.strerror or e}")
        self.sink.append(rows)
        with self._counting:
            for row in rows:
                self.stats[row["status"]] += 1
                if row["status"] == "error" and not self.cfg.quiet:
                    (log.warning if self.cfg.verbose else log.info)("error: %s: %s", row["path"], row["error"])
            if self.progress is not None:
                self.progress.advance(len(rows), sum(r["status"] == "error" for r in rows))

    def _common(self, item: Item, facts: dict) -> dict:
        row = dict(self.base)
        row.update(
            path=safe_text(os.path.abspath(item.path)),
            rel_path=safe_text(item.rel_path),
            size=item.size,
            mtime=item.mtime,
            seed=item.seed(self.cfg.seed),
            reference_path=safe_text(os.path.abspath(item.reference)) if item.reference else None,
            scored_at=datetime.now(timezone.utc),
        )
        row.update({k: v for k, v in facts.items() if k in self.sink.schema.names})
        return row

    def _error_row(self, item: Item, error: str, facts: dict) -> dict:
        row = self._common(item, facts)
        row.update(status="error", error=error, score=None)
        return row

    def _ok_row(self, sample: Sample, result: Output, model_ms: float) -> dict:
        row = self._common(sample.item, sample.facts)
        row.update({k: v for k, v in result.columns.items() if k in self.sink.schema.names})
        row.update(status="ok", error=None, model_ms=model_ms)
        return row


class _Timer:
    """Forward time: CUDA events on the GPU (no sync at launch), wall clock on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            self.end.record()
        else:
            self.t1 = time.perf_counter()

    def elapsed_ms(self) -> float:
        if self.cuda:
            self.end.synchronize()
            return self.start.elapsed_time(self.end)
        return (self.t1 - self.t0) * 1e3


class Progress:
    """A rich bar on a terminal; otherwise (cron, log files) a plain log line every ``EVERY``
    seconds, also while a long batch is still in flight, and one when the last file is done."""

    EVERY = 10.0

    def __init__(self, total: int, enabled: bool | None, quiet: bool):
        self.total, self.quiet = total, quiet
        self.bar = (sys.stderr.isatty() if enabled is None else enabled) and not quiet
        self.done = self.errors = 0
        self.t0 = time.perf_counter()
        self._stop = threading.Event()

    def __enter__(self) -> "Progress":
        if self.bar:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
            from rich.progress import Progress as Bar

            self._bar = Bar(
                TextColumn("scoring"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]} files/s  errors {task.fields[errors]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task("scoring", total=self.total, rate="-", errors=0)
        elif not self.quiet:
            log.info("scoring %d file(s)", self.total)
            threading.Thread(target=self._beat, name="qscore-progress", daemon=True).start()
        return self

    def advance(self, n: int, errors: int) -> None:
        self.done += n
        self.errors += errors
        if self.bar:
            rate = self.done / max(time.perf_counter() - self.t0, 1e-9)
            self._bar.update(self._task, advance=n, rate=f"{rate:.1f}", errors=self.errors)
        elif not self.quiet and self.done == self.total:
            self._line()

    def _beat(self) -> None:
        while not self._stop.wait(self.EVERY):
            self._line()

    def _line(self) -> None:
        elapsed = time.perf_counter() - self.t0
        rate = self.done / max(elapsed, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        log.info(
            "%d/%d files, %d error(s), %.2f files/s, elapsed %s, ETA %s",
            self.done, self.total, self.errors, rate, _hms(elapsed), _hms(eta),
        )

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self.bar:
            self._bar.stop()


def _hms(seconds: float) -> str:
    if seconds != seconds:  # NaN
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def report(summary: dict[str, Any], quiet: bool) -> None:
    """The end-of-run summary: a table on stderr (terminal or log file alike)."""
    if quiet:
        return
    from rich.console import Console
    from rich.table import Table

    random = summary["head"] == "random"
    title = f"qscore {summary['model']}" + (f" ({summary['mode']})" if summary["mode"] else "")
    table = Table(title=title + (", RANDOM WEIGHTS" if random else ""))
    table.add_column("files")
    table.add_column("ok", justify="right")
    table.add_column("errors", justify="right")
    table.add_column("skipped (done)", justify="right")
    table.add_column("files/s", justify="right")
    table.add_column("peak GPU MB", justify="right")
    table.add_row(
        str(summary["discovered"]),
        str(summary["ok"]),
        str(summary["error"]),
        str(summary["skipped"]),
        "-" if summary["files_per_s"] is None else f"{summary['files_per_s']:.2f}",
        "-" if summary["peak_gpu_mb"] is None else f"{summary['peak_gpu_mb']:.0f}",
    )
    console = Console(stderr=True, width=100 if not sys.stderr.isatty() else None)
    console.print(table)
    console.print(
        f"weights {summary['weights_id']} (head: {summary['head']}), device {summary['device_name']}, "
        f"rows in {summary['table']}: {summary['rows_in_table']}"
    )
    if random:
        console.print("RANDOM WEIGHTS: every score is noise from an untrained model, for smoke tests and "
                      "speed only", style="bold red", highlight=False)
