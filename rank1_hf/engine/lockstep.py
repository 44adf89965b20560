"""Tensor-parallel processes in lockstep: the leader sends every engine call to the followers first.

Under tensor parallel (model/tensor_parallel.py) every forward call is a collective: all processes must run
the same calls, with the same inputs, in the same order. Only the leader (process 0) has callers, a queue,
a store and outputs; it wraps its engine in :class:`LeaderEngine`, which sends each call that changes the
engine (step with the requests offered, drop, warmup, close) to the followers before running it. A
follower (:func:`follow`) runs the same calls on its own engine and throws the results away. Both engines
then decide alike: the scheduler sees the same requests and the same tokens (the logits are gathered, so
every process reads the same argmax), and the pool sizes were agreed at start (kv_budget.pool_tokens).

Any error on a follower ends its process, and any error in the leader's engine ends the process group
(torchrun then ends the job): carrying on would leave the other processes in a collective nobody joins.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any, Callable

from ..errors import Rank1Error
from ..model import tensor_parallel
from ..model.tensor_parallel import END, LOAD, STOP

logger = logging.getLogger(__name__)



class LeaderEngine:
    """The leader's engine: each call is sent to the followers, then run here."""

    def __init__(self, engine: Any):
        self.engine = engine
        self.name = engine.name

    @property
    def stats(self):
        return self.engine.stats

    @property
    def rows_stepped(self) -> int:
        return self.engine.rows_stepped

    def wants(self) -> int:
        return self.engine.wants()

    def step(self, waiting: deque) -> list:
        return self._both(("step", list(waiting)), lambda: self.engine.step(waiting))

    def drop(self, ids: set[int]) -> None:
        self._both(("drop", set(ids)), lambda: self.engine.drop(ids))

    def warmup(self) -> None:
        self._both(("warmup",), self.engine.warmup)

    @staticmethod
    def _both(message: tuple, run: Callable[[], Any]) -> Any:
        """Send the call, then run it here. A failure here may leave the followers inside the call's
        collectives, where nothing more reaches them: the job's process group is ended instead."""
        try:
            tensor_parallel.send(message)
            return run()
        except BaseException as error:
            tensor_parallel.abort(error)
            raise

    def close(self) -> None:
        tensor_parallel.send(("close",))
        self.engine.close()


def follow(make_engine: Callable[[], Any]) -> tuple[str, ...]:
    """Follower: run the leader's engine calls on engines made by ``make_engine`` until the leader sends
    :data:`~rank1_hf.model.tensor_parallel.STOP`, :data:`~rank1_hf.model.tensor_parallel.END` or another
    ranker's ``LOAD`` (returned). A failing call raises a Rank1Error naming this process."""
    engine = None
    rank = tensor_parallel.layout().rank
    try:
        while True:
            message = tensor_parallel.receive()
            op = message[0]
            if op in (STOP[0], END[0], LOAD):
                return message
            if op == "close":
                if engine is not None:
                    engine.close()
                engine = None
                continue
            if engine is None:
                engine = make_engine()
            if op == "step":
                engine.step(deque(message[1]))
            elif op == "drop":
                engine.drop(message[1])
            elif op == "warmup":
                engine.warmup()
            else:
                raise Rank1Error(f"unknown message from the leader: {op!r}")
    except Rank1Error as error:
        raise Rank1Error(f"tensor parallel process {rank}: {error}") from error
    except Exception as error:
        logger.error("tensor parallel process %d failed: %s", rank, error)
        raise Rank1Error(f"tensor parallel process {rank} failed: {type(error).__name__}: {error}") from error
    finally:
        if engine is not None:
            engine.close()
