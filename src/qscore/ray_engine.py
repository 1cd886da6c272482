"""The Ray executor (``--engine ray``): the runner's same run over every GPU of a machine or of a
Ray cluster. Only ``--engine ray`` imports this module, and so Ray.

``RayCluster`` starts Ray and the ``_Scorer`` actors as soon as the run is planned, so that they
come up while the driver (``runner.run``: discovery, resume filter, Parquet, summary) discovers
and builds. The driver cuts the files still to do into batches. Each batch is decoded by a CPU
task anywhere in the cluster (``Prepared``, what a DataLoader worker does locally), then scored
by one of the actors (one per GPU), which builds the model once from the picklable plan and runs
the runner's own ``Engine`` (collate, forward, OOM back-off, per-file isolation, postprocess) and
``RowMaker`` (rows, artefact PNGs written by the worker, so ``--out`` must be shared storage).
The rows come back to the driver, which keeps them as the local runner does (``_Rows.keep``).

Why actors and not Ray Data's ``map_batches``: a worker that dies must cost no file, and a file
that kills its worker twice must become an error row. Ray Data retries whole blocks and then
fails the dataset (or, with ``max_errored_blocks``, drops the block's rows): it has no hook to
find the file and write its row. Here the driver knows which calls each worker held.

Deaths: every file of every call on a worker that died is counted once and retried alone as a
*suspect*, on an actor with nothing else in flight, so a second death is its own; a file counted
``DEATHS`` times gets an error row.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Sequence

import ray
import torch

from qscore.config import ModelPlan, RunConfig
from qscore.runner import Chunk, Engine, Prepared, Result, RowMaker, describe
from qscore.types import Item, UsageError

log = logging.getLogger("qscore")

DEATHS = 2  # a file whose worker died this many times while it was being scored gets an error row
IN_FLIGHT = 4  # calls queued on one actor and run side by side: a forward never waits for a postprocess


@dataclass
class _Call:
    """Files scored in one actor call: a batch, or one suspect file (``deaths`` > 0)."""

    items: list[Item]
    deaths: int = 0


@ray.remote(num_cpus=1, max_retries=0)  # a crash is the driver's to count, not Ray's to retry
def _prepare(prepare: Any, items: list[Item]) -> list:
    """Decode and sample one batch on any CPU of the cluster: Samples and Failures."""
    prepared = Prepared(items, prepare)
    return [prepared[i] for i in range(len(prepared))]


class _Scorer:
    """One per GPU (a single CPU one when the cluster has none): the model built once, then per
    call the runner's Engine over one prepared batch. Calls run side by side (``IN_FLIGHT``
    threads): one call's forwards hold the device while earlier calls postprocess."""

    def __init__(self, plan: ModelPlan, cfg: RunConfig):
        t0 = time.perf_counter()
        self.device = torch.device("cuda" if ray.get_gpu_ids() else "cpu")
        self.model = plan.build(self.device, cfg.seed, maps=cfg.maps or cfg.save_npz)[0]
        self.build_s = round(time.perf_counter() - t0, 3)
        self.batch_size = cfg.batch_size
        self.device_lock = threading.Lock()

    def ready(self) -> dict[str, Any]:
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        return {"node": socket.gethostname(), "pid": os.getpid(), "device": name, "build_s": self.build_s}

    def score(self, prepared: list, make_rows: RowMaker) -> tuple[list[dict], dict[str, float]]:
        chunk = Chunk.make(self.model.collate, prepared)
        if self.device.type == "cuda":
            chunk = chunk.pin_memory()
        rows: list[dict] = []
        engine = Engine(self.model, self.device, self.batch_size, 0, lambda results: rows.extend(make_rows(results)))
        with self.device_lock:
            engine.consume([chunk])
            self.batch_size = engine.batch_size  # an OOM back-off holds for the calls after it
        engine.flush()
        peak = torch.cuda.max_memory_allocated(self.device) / 2**20 if self.device.type == "cuda" else 0.0
        return rows, {**engine.totals, "peak_gpu_mb": peak}


@ray.remote(num_cpus=1, max_retries=0)
def _warm(modules: list[str]) -> None:
    """Import what decoding needs (torch, the runner, the model's module: seconds in a new
    worker) while the driver is still discovering files and building its own copy."""
    for name in modules:
        importlib.import_module(name)


class RayCluster:
    """Ray and its scoring actors, one per GPU, started as soon as the run is planned: Ray's
    start, the actors' model builds and the CPU workers' imports then overlap the driver's
    discovery and model build. ``close()`` stops a Ray this started."""

    def __init__(self, cfg: RunConfig, plan: ModelPlan):
        t0 = time.perf_counter()
        self.owned = not ray.is_initialized()
        if self.owned:  # else the caller's own Ray session (tests, notebooks) is used
            _connect(cfg)
        self.timings = {"connect_s": round(time.perf_counter() - t0, 3)}
        self._t0 = t0
        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
        if cfg.device.startswith("cuda") and not gpus:
            self.close()
            raise UsageError(f"--device {cfg.device}: the Ray cluster has no GPU")
        use_gpu = bool(gpus) and cfg.device != "cpu"
        scorer = ray.remote(_Scorer).options(
            num_gpus=1 if use_gpu else 0, num_cpus=1, max_concurrency=IN_FLIGHT, max_restarts=-1, max_task_retries=0
        )
        self.actors = [scorer.remote(plan, cfg) for _ in range(gpus if use_gpu else 1)]
        self._ready = [a.ready.remote() for a in self.actors]
        self.cpus, self.quiet = cpus, cfg.quiet
        if not cfg.quiet:
            how = "this process's session" if not self.owned else f"joined {cfg.ray_address}" if cfg.ray_address else "started"
            log.info("ray: %s in %.1f s (%d CPUs, %d GPUs); %d scoring actor(s) building the model", how,
                     self.timings["connect_s"], cpus, gpus, len(self.actors))
        modules = ["torch", "qscore.runner", plan.cls.__module__]
        for _ in range(max(cpus - len(self.actors), 1)):  # not awaited: a failed import shows again when decoding
            _warm.remote(modules)

    def wait_ready(self) -> list[dict[str, Any]]:
        """Each actor's node, pid, device and model build time, once every model is built."""
        try:
            workers = ray.get(self._ready)
        except ray.exceptions.RayError as e:
            raise UsageError(f"a Ray worker could not build the model: {e}") from e
        self.timings["workers_ready_s"] = round(time.perf_counter() - self._t0, 3)
        if not self.quiet:
            log.info("ray: %d scoring actor(s) ready after %.1f s (model built in %s s)", len(workers),
                     self.timings["workers_ready_s"], ", ".join(f"{w['build_s']:.1f}" for w in workers))
        return workers

    def close(self) -> None:
        if self.owned and ray.is_initialized():
            ray.shutdown()


class RayEngine:
    """What ``runner._score`` drives in place of the local ``Engine``: ``drive(todo)`` and the
    same figures (``totals``, ``first_launch``, ``last_done``, ``batch_size``), plus
    ``per_worker`` and the devices used."""

    def __init__(self, cfg: RunConfig, cluster: RayCluster, prepare: Any, rows: Any):
        self.cfg, self.cluster, self.prepare, self.rows = cfg, cluster, prepare, rows
        self.batch_size = cfg.batch_size
        self.totals = {"model_ms": 0.0, "decode_ms": 0.0, "stage_ms": 0.0}
        self.first_launch: float | None = None
        self.last_done: float | None = None
        self.per_worker: list[dict[str, Any]] = []
        self.device_name = "ray"

    def drive(self, todo: Sequence[Item]) -> None:
        todo = [_absolute(it) for it in todo]
        actors, prepare, make_rows = self.cluster.actors, ray.put(self.prepare), ray.put(self.rows.make)
        work = deque(_Call(todo[i : i + self.batch_size]) for i in range(0, len(todo), self.batch_size))
        suspects: deque[_Call] = deque()
        window = self.cluster.cpus + IN_FLIGHT * len(actors)  # batches decoded ahead
        decoding: dict[Any, _Call] = {}
        ready: deque[tuple[Any, _Call]] = deque()  # decoded, waiting for an actor
        busy: list[dict[Any, _Call]] = [{} for _ in actors]  # per actor: its calls in flight
        while work or suspects or decoding or ready or any(busy):
            while work and len(decoding) + len(ready) < window:
                call = work.popleft()
                decoding[_prepare.remote(prepare, call.items)] = call
            if not self.per_worker:  # the first batches decode while the actors finish their builds
                self._started(self.cluster.wait_ready())
            for actor, calls in zip(actors, busy):
                if any(c.deaths for c in calls.values()):
                    continue  # a suspect runs alone
                if suspects:  # drain, then take one
                    if not calls:
                        call = suspects.popleft()
                        calls[actor.score.remote(_prepare.remote(prepare, call.items), make_rows)] = call
                    continue
                while ready and len(calls) < IN_FLIGHT:
                    decoded, call = ready.popleft()
                    calls[actor.score.remote(decoded, make_rows)] = call
                    self.first_launch = self.first_launch or time.perf_counter()
            waiting = list(decoding) + [ref for calls in busy for ref in calls]
            [done], _ = ray.wait(waiting, num_returns=1, fetch_local=False)
            if done in decoding:
                ready.append((done, decoding.pop(done)))
            else:
                self._collect(done, actors, busy, suspects)

    def _started(self, workers: list[dict[str, Any]]) -> None:
        self.per_worker = [{**info, "files": 0, "model_ms": 0.0, "deaths": 0, "peak_gpu_mb": 0.0} for info in workers]
        devices = sorted({w["device"] for w in self.per_worker})
        self.device_name = f"{len(workers)} x {', '.join(devices)} (ray)"

    def _collect(self, done: Any, actors: list, busy: list[dict[Any, _Call]], suspects: deque[_Call]) -> None:
        """Keep a call's rows; or, when a worker died under it, count its files (and, for an actor
        that died, every call it held) and retry them alone."""
        index = next(i for i, calls in enumerate(busy) if done in calls)
        worker = self.per_worker[index]
        try:
            rows, totals = ray.get(done)
        except ray.exceptions.RayActorError as e:
            worker["deaths"] += 1
            lost = list(busy[index].values())
            busy[index].clear()
            self._died(lost, e, suspects)
            worker["pid"] = _restarted(actors[index])["pid"]
            return
        except ray.exceptions.RayError as e:  # its decode task's worker died (or a bug in the call)
            self._died([busy[index].pop(done)], e, suspects)
            return
        busy[index].pop(done)
        self.rows.keep(rows)
        self.last_done = time.perf_counter()
        worker["files"] += len(rows)
        worker["model_ms"] = round(worker["model_ms"] + totals["model_ms"], 3)
        worker["peak_gpu_mb"] = round(max(worker["peak_gpu_mb"], totals.pop("peak_gpu_mb")), 1)
        for k, v in totals.items():
            self.totals[k] += v

    def _died(self, calls: list[_Call], error: Exception, suspects: deque[_Call]) -> None:
        cause = describe(error)
        for call in calls:
            deaths = call.deaths + 1
            if deaths < DEATHS:
                suspects.extend(_Call([item], deaths) for item in call.items)
                continue
            message = f"WorkerDied: its Ray worker died {deaths} times while scoring this file (last: {cause})"
            self.rows([Result(item, {}, error=message) for item in call.items])


def _connect(cfg: RunConfig) -> None:
    """Join the cluster at ``--ray-address``, or start a local Ray using every visible GPU. A
    cluster's workers get the driver's ``QSCORE_*`` settings (weights cache, registry, offline
    mode) through a runtime env; a local Ray's inherit the whole environment, and a runtime env
    would only slow each worker's start (measured: seconds)."""
    env = {"env_vars": {k: v for k, v in os.environ.items() if k.startswith("QSCORE_")}}
    where = {"address": cfg.ray_address, "runtime_env": env} if cfg.ray_address else {"include_dashboard": False}
    ray.init(logging_level=logging.WARNING, log_to_driver=cfg.verbose, **where)


def _restarted(actor: Any) -> dict[str, Any]:
    """Wait for Ray to restart a dead actor (it rebuilds the model): a call sent meanwhile would
    fail unrun (``ActorUnavailableError``), and count against its files."""
    while True:
        try:
            return ray.get(actor.ready.remote())
        except ray.exceptions.RayActorError:
            time.sleep(0.5)


def _absolute(item: Item) -> Item:
    """A worker's working folder is not the driver's: the paths it opens are absolute."""
    return dataclasses.replace(
        item, path=os.path.abspath(item.path), reference=os.path.abspath(item.reference) if item.reference else None
    )
