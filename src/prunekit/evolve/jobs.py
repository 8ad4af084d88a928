"""Where fitness jobs run: in this process, a local process pool (the default) or Ray.

Every job is independent (`fitness.Job`, plain data), so the executors only map `run_job` over a
list and report progress. When a job raises, the jobs not yet handed to a worker are cancelled
(a process pool has already queued a few beyond its workers: those still run) and the error
propagates; a pool worker that dies (killed, out of memory) is one TrainingError. Ray is an
optional extra (`pip install prunekit[distributed]`): with `address=None` it starts a local
cluster with `workers` CPUs, with an address it joins that cluster; each job is a Ray task asking
for `num_cpus` CPUs and `num_gpus` GPUs.

>>> with create_executor("serial") as run:
...     run([]) == []
True
"""
from __future__ import annotations

import contextlib
import multiprocessing
import signal
import socket
import threading
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Iterator

from tqdm.auto import tqdm

from ..core.errors import ConfigError, TrainingError
from .fitness import Job, run_job

Runner = Callable[..., list]


@contextlib.contextmanager
def _own_rng():
    """Keep the caller's random/NumPy/torch RNG states: training seeds them all, and the search
    draws its variations from `random` (a pool or Ray worker has its own states anyway)."""
    import random

    import numpy as np
    import torch

    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


def _bar(total: int, desc: str, progress: bool):
    return tqdm(total=total, desc=desc, unit="job", disable=not progress or total == 0, leave=False)


@contextlib.contextmanager
def create_executor(kind: str, workers: int = 2, address: str | None = None, num_cpus: float = 1.0,
                    num_gpus: float = 0.0, job_fn: Callable[[Any], Any] = run_job) -> Iterator[Runner]:
    """A context giving `run(jobs, desc="", progress=False) -> [job_fn(job) for job in jobs]`
    (in job order); `job_fn` must be importable by name for the process pool."""
    if kind == "serial":
        def run_serial(jobs: list[Job], desc: str = "", progress: bool = False) -> list:
            out = []
            with _bar(len(jobs), desc, progress) as bar:
                for job in jobs:
                    with _own_rng():
                        out.append(job_fn(job))
                    bar.update()
            return out
        yield run_serial
    elif kind == "process":
        # spawn: a forked child would inherit the parent's torch/OpenMP thread state
        with _pool(workers) as pool:
            def run_pool(jobs: list[Job], desc: str = "", progress: bool = False) -> list:
                futures = {pool.submit(job_fn, job): i for i, job in enumerate(jobs)}
                out: list = [None] * len(jobs)
                try:
                    with _bar(len(jobs), desc, progress) as bar:
                        for fut in as_completed(futures):
                            out[futures[fut]] = fut.result()
                            bar.update()
                except BrokenProcessPool:
                    raise TrainingError("a fitness worker process died before its job finished (killed, or out of "
                                        "memory?); run again with fewer workers or threads per job (a search "
                                        "resumes from its last finished generation)") from None
                except BaseException:
                    for fut in futures:  # the pool would otherwise run every queued job before exiting
                        fut.cancel()
                    raise
                return out
            yield run_pool
    elif kind == "ray":
        yield from _ray_runner(workers, address, num_cpus, num_gpus, job_fn)
    else:
        raise ConfigError(f"executor={kind!r} is not allowed; choose one of: process, ray, serial")


@contextlib.contextmanager
def _pool(workers: int) -> Iterator[ProcessPoolExecutor]:
    """A spawn process pool. Left normally it waits for its workers; left by an exception (a
    failed job, Ctrl-C, SIGTERM) it stops them at once instead of waiting for the jobs they run
    (minutes each: a stopped search resumes from its last finished generation anyway)."""
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        yield pool
    except BaseException:
        workers_now = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for proc in workers_now:
            if proc.is_alive():
                proc.terminate()
        for proc in workers_now:
            proc.join(timeout=10)
        raise
    pool.shutdown(wait=True)


def _ray_runner(workers: int, address: str | None, num_cpus: float, num_gpus: float,
                job_fn: Callable[[Any], Any]) -> Iterator[Runner]:
    try:
        import ray
    except ImportError:
        raise ConfigError("executor='ray' needs Ray: pip install 'prunekit[distributed]', or use executor='process'") from None
    started = not ray.is_initialized()
    if started:
        kwargs = {"address": address} if address else {"num_cpus": workers}
        if address:
            _check_reachable(address)
        handlers = _signal_handlers()  # ray.init sets its own SIGTERM handler and never restores it
        try:
            with _own_rng():  # ray.init draws from `random`: a resumed search would vary differently
                ray.init(ignore_reinit_error=True, include_dashboard=False, log_to_driver=False, **kwargs)
        except (ConnectionError, TimeoutError, RuntimeError, ValueError) as err:
            if not address:
                raise
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(f"ray_address={address!r}: Ray could not join a cluster there ({first}); fix what that "
                              "says (a cluster is started with `ray start --head` on its head machine), or leave "
                              "ray_address unset to start a local Ray with `workers` CPUs") from None
        finally:
            _restore_signal_handlers(handlers)
    remote = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=0)(job_fn)

    def run_ray(jobs: list[Job], desc: str = "", progress: bool = False) -> list:
        refs = [remote.remote(job) for job in jobs]
        index = {ref: i for i, ref in enumerate(refs)}
        out: list = [None] * len(jobs)
        pending = list(refs)
        try:
            with _bar(len(jobs), desc, progress) as bar:
                while pending:
                    done, pending = ray.wait(pending, num_returns=1)
                    out[index[done[0]]] = _result(ray, done[0])
                    bar.update()
        except BaseException:
            for ref in pending:  # a joined cluster would otherwise keep running them
                ray.cancel(ref)
            raise
        return out

    try:
        _check_feasible(ray, num_cpus, num_gpus, workers if started and not address else None, address)
        yield run_ray
    finally:
        if started:
            with _own_rng():
                ray.shutdown()


def _check_feasible(ray, num_cpus: float, num_gpus: float, workers: int | None, address: str | None) -> None:
    """ConfigError when no live node of the Ray cluster has `num_cpus` CPUs and `num_gpus` GPUs:
    Ray would queue every fitness job for ever (its warning goes to a log the search does not show)."""
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive", True)]
    if any(r.get("CPU", 0) >= num_cpus and r.get("GPU", 0) >= num_gpus for r in nodes):
        return
    cpus = max((r.get("CPU", 0) for r in nodes), default=0)
    gpus = max((r.get("GPU", 0) for r in nodes), default=0)
    where = (f"the local Ray started with workers={workers} CPUs" if workers is not None
             else f"the Ray cluster at {address}" if address else "the running Ray")
    fix = "lower num_cpus/num_gpus" + (" or raise workers" if workers is not None and num_cpus > cpus else "")
    raise ConfigError(f"a fitness job asks for num_cpus={num_cpus:g} and num_gpus={num_gpus:g}, which no node of {where} "
                      f"has (the largest: {cpus:g} CPUs, {gpus:g} GPUs), so Ray would wait for ever; {fix}")


def _result(ray, ref):
    """ray.get(ref), raising a failed job's own exception (a ConfigError reads as one line) rather
    than Ray's wrapper, whose message starts with the remote traceback."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as err:
        cause = getattr(err, "cause", None)
        if isinstance(cause, Exception):
            raise cause from None
        raise


def _signal_handlers() -> dict:
    """SIGTERM's and SIGINT's handlers, where this thread may read and set them."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.getsignal(sig) for sig in (getattr(signal, "SIGTERM", None), signal.SIGINT) if sig is not None}


def _restore_signal_handlers(handlers: dict) -> None:
    for sig, handler in handlers.items():
        if handler is not None and signal.getsignal(sig) is not handler:
            signal.signal(sig, handler)


def _check_reachable(address: str) -> None:
    """A ConfigError within seconds when a "host:port" (or "ray://host:port") address does not
    answer; Ray itself retries such an address for minutes. "auto" and other forms are left to Ray."""
    rest = address.split("://", 1)[-1]
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
    except OSError as err:
        raise ConfigError(f"ray_address={address!r}: nothing answers at {host}:{port} ({err.strerror or err}); start "
                          "the Ray cluster there first (`ray start --head` on its head machine), check the address, or "
                          "leave ray_address unset to start a local Ray with `workers` CPUs") from None
