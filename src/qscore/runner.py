"""The one batched inference engine: every model scores through ``Engine``, in a scoring run
(``run``: rows, artefacts, Parquet) and in evaluation alike (``train.loop.evaluate``: metrics).

plan -> discover -> build -> resume filter -> DataLoader workers (model.preparer: decode +
sample on the CPU) -> collate -> pinned, non-blocking copy -> precompute (kept in the model's
cache) + forward under autocast -> postprocess -> the consumer (scoring: sinks).

The GPU is kept busy by a one-batch lookahead: batch n+1 is collated and copied while batch n's
forward runs, and batch n's results are fetched and written after n+1 is launched. On the CPU
the forward is synchronous, so there is nothing to overlap: each batch is written when it is done.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
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
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from qscore import __version__
from qscore.cache import ArrayCache
from qscore.config import (  # noqa: F401 - callers take the run's vocabulary from here too
    EXIT_FAILED_FILES,
    EXIT_OK,
    EXIT_USAGE,
    ModelPlan,
    RunConfig,
    check,
    parse_sets,
    pick_device,
    plan_run,
)
from qscore.console import Progress
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
from qscore.types import Item, Output, Sample, UsageError, safe_text

log = logging.getLogger("qscore")

# Postprocessing and artefact PNGs of a batch can cost more CPU than its forward (a 512x512
# heatmap overlay and its PNG: ~26 ms per image on one core): writer threads take batches side by side.
WRITERS = min(4, usable_cpus())
MAX_QUEUED = WRITERS + 1  # batches waiting for or in the writer threads
# --workers -1 with the GPU decoder: preparing threads of this process (NVDEC decodes, a thread
# probes, indexes, feeds and samples; they contend for the GIL: benchmarks/nvdec_probe.py gave
# 37-40 videos/s with 8 threads, 31-33 with 16 on the H200, docs/benchmarks.md)
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
    """Items -> Sample or Failure. Runs in DataLoader workers (or the GPU decoder's threads);
    never raises, so one bad file never takes down a batch, and times the decode for the row's
    ``decode_ms``. ``to_cpu``: GPU-decoded inputs leave a worker process on the CPU."""

    def __init__(self, items: Sequence[Item], prepare: Callable[[Item], Sample], to_cpu: bool = True):
        self.items, self.prepare, self.to_cpu = items, prepare, to_cpu

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
        if self.to_cpu:
            sample.inputs = {k: v.cpu() for k, v in sample.inputs.items()}
        return sample


def describe(e: BaseException) -> str:
    """``Type: message`` with file-system errors made readable."""
    if isinstance(e, FileNotFoundError):
        return "FileNotFoundError: file vanished or does not exist"
    if isinstance(e, PermissionError):
        return "PermissionError: permission denied"
    msg = safe_text(str(e)).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else 'no message'}"


def run(cfg: RunConfig, built: tuple[Model, str, str] | None = None) -> int:
    """Score every input; returns the exit code (0 ok, 1 some files failed, 2 usage error).
    ``built``: the planned model already built, to use instead of building (``qscore bench``'s rows)."""
    started = time.time()
    try:
        check(cfg)
        device = torch.device("cpu") if cfg.engine == "ray" else pick_device(cfg.device)  # ray: the actors pick theirs
        cfg = dataclasses.replace(cfg, decoder=pick_decoder(cfg.decoder, device.type) if cfg.task == "video" else "cpu")
        plan = plan_run(cfg)
        with _cluster(cfg, plan) as cluster:
            return _run(cfg, plan, device, built, cluster, started)
    except (UsageError, DiscoveryError, LockedError) as e:  # usage: also a Ray cluster that cannot run what was asked
        log.error("qscore: %s", e)
        return EXIT_USAGE


@contextlib.contextmanager
def _cluster(cfg: RunConfig, plan: ModelPlan) -> Iterator[Any]:
    """``--engine ray``: Ray and its scoring actors, started before discovery and the model build
    so that they come up meanwhile (``qscore.ray_engine``, the one module that imports Ray),
    stopped at the end; ``--engine local``: None."""
    if cfg.engine != "ray":
        yield None
        return
    from qscore.ray_engine import RayCluster

    cluster = RayCluster(cfg, plan)
    try:
        yield cluster
    finally:
        cluster.close()


def _run(cfg: RunConfig, plan: ModelPlan, device: torch.device, built: tuple[Model, str, str] | None, cluster: Any,
         started: float) -> int:
    """Discovery, the model, scoring under the output's lock, the summary: ``run`` once planned."""
    items = discover(cfg.inputs, cfg.task, cfg.exts, ciml=plan.needs_reference, pairs=cfg.pairs)
    model, weights_id, head = built or plan.build(device, cfg.seed, maps=cfg.maps or cfg.save_npz)
    spec = model.spec
    stem = f"{spec.name}-{_mode(model)}" if _mode(model) else spec.name
    sink = TableSink(cfg.out, stem, schema_for(spec.columns))
    with OutputLock(cfg.out / f"{stem}.lock"):
        stats = _score(cfg, model, device, items, sink, weights_id, head, cluster)
        table = sink.compact(csv=cfg.csv)
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
        **stats,  # the Ray executor's stats name its own devices
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
    cfg: RunConfig, model: Model, device: torch.device, items: list[Item], sink: TableSink, weights_id: str,
    head: str, cluster: Any,
) -> dict[str, Any]:
    """Resume filter, then the batched loop. Returns counts and throughput."""
    config_hash = model.config_hash()
    done = set() if cfg.force else done_keys(sink.existing())
    key = lambda it: (safe_text(it.rel_path), it.size, it.mtime, model.spec.name, weights_id, config_hash)  # noqa: E731
    todo = [it for it in items if key(it) not in done]
    if cfg.max_files is not None:
        todo = todo[: cfg.max_files]
    stats = {"discovered": len(items), "skipped": len(items) - len(todo), "ok": 0, "error": 0}
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
    if not cfg.quiet:
        log.info("model %s (preset %s), weights %s (head: %s), device %s", model.spec.name, cfg.preset, weights_id, head,
                 device if cluster is None else "the Ray actors'")
    t0 = time.perf_counter()
    with Progress(enabled=False if cfg.quiet else cfg.progress, log_lines=not cfg.quiet) as progress:
        rows = _Rows(cfg, sink, base, stats, progress.start("scoring", len(todo)))
        engine = _executor(cfg, cluster, model, device, rows)
        if todo:
            engine.drive(todo)
    end = time.perf_counter()
    totals = engine.totals
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
        engine=cfg.engine,
    )
    if cfg.engine == "ray":
        stats.update(device="ray", device_name=engine.device_name, workers=engine.per_worker, ray=cluster.timings,
                     peak_gpu_mb=max((w["peak_gpu_mb"] for w in engine.per_worker), default=None) or None)
    return stats


def _executor(cfg: RunConfig, cluster: Any, model: Model, device: torch.device, rows: _Rows):
    """The one seam between the two executors of the same Engine: here, or in the actors of
    ``cluster`` over a Ray cluster's GPUs."""
    if cluster is not None:
        from qscore.ray_engine import RayEngine

        return RayEngine(cfg, cluster, model.preparer(), rows)
    return Engine(model, device, cfg.batch_size, cfg.workers, rows, cfg.decoder)


def precompute(model: Model, batch: dict[str, torch.Tensor], cache: ArrayCache | None) -> None:
    """The model's cacheable device-side step on ``batch``, its results kept in ``cache`` (the
    model's own, ``model.cache()``) for the next run's preparer: the runner's stage before each
    forward, in scoring, evaluation and training alike."""
    fresh = model.precompute(batch)
    if cache is not None:
        cache.keep(fresh)


def on_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``: copied without blocking, or, made there by a preparing thread on its
    own stream, marked in use by this one (the allocator must not hand its memory back to that
    stream while the forward reads it)."""
    if t.device.type != "cuda":
        return t.to(device, non_blocking=True)
    t.record_stream(torch.cuda.current_stream(t.device))
    return t.to(device, non_blocking=True)


def chunk_size(n_files: int, batch_size: int, workers: int) -> int:
    """Files per DataLoader task. A worker prepares its whole chunk before handing it over, so a
    run with fewer files than workers x batch gets smaller chunks (and GPU batches) to keep every
    worker decoding: 64 videos, batch 16, 16 workers -> 4 per worker, not 16 on 4 workers."""
    return max(1, min(batch_size, math.ceil(n_files / max(workers, 1))))


@dataclass
class Result:
    """One file's outcome, as the engine hands it over: its ``output`` (None for an error) and
    this file's share of its batch's forward time."""

    item: Item
    facts: dict[str, Any]
    output: Output | None = None
    error: str | None = None
    model_ms: float | None = None


class Engine:
    """The loop over batches: lookahead, OOM back-off, per-file isolation of model errors,
    ``postprocess`` on writer threads. Every file's ``Result`` goes to ``emit`` (called on a
    writer thread with one batch's results, several batches side by side), so scoring (rows,
    artefacts, Parquet parts) and evaluation (metrics against labels) share this one loop."""

    def __init__(self, model: Model, device: torch.device, batch_size: int, workers: int,
                 emit: Callable[[list[Result]], None], decoder: str = "cpu"):
        self.model, self.device, self.emit, self.decoder = model, device, emit, decoder
        self.batch_size = max(1, batch_size)
        self.workers = workers if workers >= 0 else default_workers()
        if decoder == "gpu" and workers < 0:
            self.workers = min(self.workers, GPU_DECODE_WORKERS)
        self.autocast = device.type == "cuda"
        self.cache = model.cache()
        self.totals = {"model_ms": 0.0, "decode_ms": 0.0, "stage_ms": 0.0}  # summed over files
        self._writer = ThreadPoolExecutor(max_workers=WRITERS, thread_name_prefix="qscore-writer")
        self.first_launch: float | None = None  # perf_counter at the first forward's launch
        self.last_done: float | None = None  # perf_counter when the latest forward was back
        self._queued: deque[Future] = deque()

    def drive(self, todo: Sequence[Item]) -> None:
        """Prepare ``todo`` and score it (the local executor): in DataLoader worker processes, or
        with the GPU decoder in threads of this process (``_threads``)."""
        size = chunk_size(len(todo), self.batch_size, self.workers)
        decoding = functools.partial(video.configure, self.decoder, max(1, usable_cpus() // max(self.workers, 1)))
        before = decoding()  # this process decodes too where workers == 0, or in threads
        try:
            if self.decoder == "gpu" and self.workers > 0:
                self.consume(self._threads(Prepared(todo, self.model.preparer(), to_cpu=False), size))
            else:
                self.consume(DataLoader(
                    Prepared(todo, self.model.preparer()),
                    batch_size=size,
                    num_workers=self.workers,
                    collate_fn=functools.partial(Chunk.make, self.model.collate),
                    pin_memory=self.device.type == "cuda",
                    prefetch_factor=2 if self.workers else None,  # 2 batches per worker: bounded host memory
                    persistent_workers=False,
                    worker_init_fn=decoding,
                ))
        finally:
            video.configure(before.decoder, before.threads)
        self.flush()

    def _threads(self, prepared: Prepared, size: int) -> Iterator[Chunk]:
        """Chunks of ``size`` files prepared by ``self.workers`` threads, in order, at most two a
        thread ahead. NVDEC decodes while a thread waits with the GIL released, and the frames stay
        on the GPU: in one CUDA context with the model, where worker processes each had their own
        (contexts time-slice the GPU) and sent frames through host memory. Each thread prepares
        on its own CUDA stream and waits for it before handing a chunk over."""
        local = threading.local()

        def make(start: int) -> Chunk:
            if self.device.type == "cuda" and not hasattr(local, "stream"):
                local.stream = torch.cuda.Stream(self.device)
            stream = getattr(local, "stream", None)
            with torch.cuda.stream(stream):  # None (the CPU): no stream to switch to
                chunk = Chunk.make(self.model.collate, [prepared[i] for i in range(start, min(start + size, len(prepared)))])
            if stream is not None:
                stream.synchronize()
            return chunk

        with ThreadPoolExecutor(self.workers, thread_name_prefix="qscore-prepare") as pool:
            ahead: deque[Future] = deque()
            for start in range(0, len(prepared), size):
                ahead.append(pool.submit(make, start))
                if len(ahead) > 2 * self.workers:
                    yield ahead.popleft().result()
            while ahead:
                yield ahead.popleft().result()

    def consume(self, chunks: Iterable[Chunk]) -> None:
        """Score prepared chunks: every forward is back and every batch handed to a writer thread
        when this returns (``flush`` waits for the writers)."""
        pending = None
        for chunk in chunks:
            self._emit([Result(f.item, {"decode_ms": f.decode_ms}, error=f.error) for f in chunk.failures])
            whole = chunk.batch is not None and len(chunk.samples) <= self.batch_size
            for group in [chunk.samples] if whole else self._groups(chunk.samples):
                launched = self._launch(group, chunk.batch if whole else None)
                if pending is not None:
                    self._finish(*pending)
                if self.device.type != "cpu":
                    pending = launched
                else:  # the forward has run already: hand the batch over now (progress, less lost to a kill)
                    self._finish(*launched)
        if pending is not None:
            self._finish(*pending)

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
                batch = {k: on_device(v, self.device) for k, v in batch.items()}
            self.totals["stage_ms"] += (time.perf_counter() - t0) * 1e3
            timer = _Timer(self.device)
            self.first_launch = self.first_launch or time.perf_counter()
            with torch.inference_mode(), torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocast):
                precompute(self.model, batch, self.cache)
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
            self._emit([Result(s.item, s.facts, error=error) for s in samples])
            return
        batch_ms = timer.elapsed_ms()  # waits for the forward and its copy to the host
        self.last_done = time.perf_counter()
        self.totals["model_ms"] += batch_ms
        self.totals["decode_ms"] += sum(s.facts.get("decode_ms", 0.0) for s in samples)
        self._submit(self._post, samples, outputs, batch_ms / len(samples))

    def _post(self, samples: list[Sample], outputs: dict, per_file_ms: float) -> None:
        """Writer thread: postprocess (maps to images), then hand the results over. Threads run
        side by side: ``postprocess`` must not keep state between batches."""
        try:
            outputs_of = self.model.postprocess(outputs, samples)
        except Exception as e:  # noqa: BLE001
            self.emit([Result(s.item, s.facts, error=f"postprocess: {describe(e)}") for s in samples])
            return
        self.emit([Result(s.item, s.facts, r, model_ms=per_file_ms) for s, r in zip(samples, outputs_of)])

    def _emit(self, results: list[Result]) -> None:
        if results:
            self._submit(self.emit, results)

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


class RowMaker:
    """Results -> rows (core columns, the model's, media facts), their artefact PNGs / NPZ
    written. Picklable and shared-nothing, so the Ray executor makes rows where the model ran."""

    def __init__(self, cfg: RunConfig, names: list[str], base: dict[str, Any]):
        self.cfg, self.names, self.base = cfg, names, base
        self.out = Path(cfg.out).absolute()  # a Ray worker's working folder is not the driver's

    def __call__(self, results: list[Result]) -> list[dict]:
        rows = [self._row(r) for r in results]
        for row, result in zip(rows, results):
            if result.output is None:
                continue
            try:
                if self.cfg.maps:
                    for kind, rel in write_artefacts(self.out, row["rel_path"], result.output.artefacts).items():
                        row[f"{kind}_path"] = rel
                if self.cfg.save_npz:
                    write_arrays(self.out, row["rel_path"], result.output.arrays)
            except OSError as e:
                row.update(status="error", error=f"cannot write artefact: {e.strerror or e}")
        return rows

    def _row(self, result: Result) -> dict:
        item = result.item
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
        row.update({k: v for k, v in result.facts.items() if k in self.names})
        if result.output is None:
            row.update(status="error", error=result.error, score=None)
        else:
            row.update({k: v for k, v in result.output.columns.items() if k in self.names})
            row.update(status="ok", error=None, model_ms=result.model_ms)
        return row


class _Rows:
    """Scoring's side of the engine: results -> rows (``make``), then ``keep``: a Parquet part
    per batch, counts and progress."""

    def __init__(self, cfg: RunConfig, sink: TableSink, base: dict[str, Any], stats: dict[str, int], progress: Progress):
        self.cfg, self.sink, self.stats, self.progress = cfg, sink, stats, progress
        self.make = RowMaker(cfg, sink.schema.names, base)
        self._counting = threading.Lock()  # stats and progress, updated by the writer threads

    def __call__(self, results: list[Result]) -> None:
        self.keep(self.make(results))

    def keep(self, rows: list[dict]) -> None:
        self.sink.append(rows)
        with self._counting:
            for row in rows:
                self.stats[row["status"]] += 1
                if row["status"] == "error" and not self.cfg.quiet:
                    (log.warning if self.cfg.verbose else log.info)("error: %s: %s", row["path"], row["error"])
            self.progress.advance(len(rows), sum(r["status"] == "error" for r in rows))


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
