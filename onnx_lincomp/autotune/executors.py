"""Where candidates are scored: in this process, in N local worker processes, or on a Ray cluster.

Every backend runs the same :class:`~.judge.Judge` on the same recipes and returns outcomes in the order
of the recipes, so results do not depend on the backend or the number of workers. Workers prepare the
model once (their judge lives as long as the pool) and use one onnxruntime thread each.
"""
from __future__ import annotations

import multiprocessing
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from typing import Literal, Protocol

from ..errors import OptionError
from .judge import Judge, JudgeSpec, Outcome

Backend = Literal["local", "ray"]


class Executor(Protocol):
    def map(self, recipes: Sequence[dict]) -> list[Outcome]: ...

    def close(self) -> None: ...


class InProcess:
    def __init__(self, spec: JudgeSpec):
        self.judge = Judge(spec)

    def map(self, recipes: Sequence[dict]) -> list[Outcome]:
        return [self.judge(r) for r in recipes]

    def close(self) -> None:
        pass


_worker_judge: list[Judge] = []  # the one judge of a worker process (set by the pool initializer)


def _init_worker(spec: JudgeSpec) -> None:
    _worker_judge.append(Judge(spec))


def _score(recipe: dict) -> Outcome:
    return _worker_judge[0](recipe)


class ProcessPool:
    def __init__(self, spec: JudgeSpec, jobs: int):
        ctx = multiprocessing.get_context("spawn")
        self.pool = ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker,
                                        initargs=(replace(spec, threads=1),))

    def map(self, recipes: Sequence[dict]) -> list[Outcome]:
        return list(self.pool.map(_score, recipes))

    def close(self) -> None:
        self.pool.shutdown(cancel_futures=True)


class RayPool:
    """The same judges as Ray actors (``--backend ray [--address ADDR]``; extra ``ray``)."""

    def __init__(self, spec: JudgeSpec, jobs: int, address: str | None):
        ray = require_ray()
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=False,
                     ignore_reinit_error=True, **({} if address else {"num_cpus": jobs}))
        actor = ray.remote(num_cpus=1)(Judge)
        self.ray = ray
        self.actors = [actor.remote(replace(spec, threads=1)) for _ in range(jobs)]

    def map(self, recipes: Sequence[dict]) -> list[Outcome]:
        refs = [self.actors[i % len(self.actors)].__call__.remote(r) for i, r in enumerate(recipes)]
        return list(self.ray.get(refs))

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a)


def require_ray():
    try:
        import ray
    except ImportError as exc:
        raise OptionError("--backend ray needs Ray: pip install 'onnx-lincomp[ray]'") from exc
    return ray


def make_executor(spec: JudgeSpec, jobs: int = 1, backend: Backend = "local", address: str | None = None) -> Executor:
    if jobs < 1:
        raise OptionError(f"--jobs must be at least 1, got {jobs}")
    if backend == "ray":
        return RayPool(spec, jobs, address)
    if backend != "local":
        raise OptionError(f"--backend must be 'local' or 'ray', got {backend!r}")
    return InProcess(spec) if jobs == 1 else ProcessPool(spec, jobs)
