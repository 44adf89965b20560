"""Tensor parallel under torchrun: every decoder layer's heads and projections split over the processes of
one node, so that all cards compute every step (a device map runs one card at a time).

The model is loaded with transformers' own plan (``DistributedConfig(tp_plan="auto")``: q/k/v and
gate/up projections split by columns, o/down by rows, ``lm_head`` split by vocabulary and its logits
gathered), so every process holds 1/N of the weights and of the KV heads, and every process gets the same
full logits. The engine keeps the processes in step (engine/lockstep.py): process 0 (the leader) runs the
job and sends each engine call to the others (the followers) over a gloo group, before it runs the call
itself.

Process layout: torchrun's RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE; tensor parallel spans every
process of the job, which must all be on one node (the collectives of every layer need a card-to-card link).
"""

from __future__ import annotations

import atexit
import datetime
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import Rank1Error

logger = logging.getLogger(__name__)

#: The leader's messages about whole rankers (engine/lockstep.py sends the engine calls between them):
#: a follower loads ``(LOAD, path, load options, judge options)`` too and follows that ranker until
#: :data:`STOP` (the ranker was closed) or :data:`END` (the leader's job is over).
LOAD = "load"
STOP, END = ("stop",), ("end",)

_LAUNCH = "start it with torchrun --nproc-per-node N -m rank1_hf -- COMMAND ... --tensor-parallel"

# The followers wait on the control group between the leader's engine calls, which may be far apart (a
# long corpus read, an idle library caller): a dead leader ends them through torchrun, not this timeout.
_CONTROL_TIMEOUT = datetime.timedelta(days=7)


@dataclass(frozen=True)
class Layout:
    """This process's place in a tensor-parallel job: ``rank`` of ``size`` processes, all on one node."""

    rank: int
    size: int
    local_rank: int

    @property
    def is_leader(self) -> bool:
        return self.rank == 0


def layout_from_env(env: Mapping[str, str] | None = None) -> Layout:
    """The layout torchrun sets; a Rank1Error without torchrun's environment, or over several nodes."""
    env = os.environ if env is None else env
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in env]
    if missing:
        raise Rank1Error(f"tensor parallel runs under torchrun ({', '.join(missing)} not set): {_LAUNCH}")
    try:
        rank, size = int(env["RANK"]), int(env["WORLD_SIZE"])
        local_rank = int(env.get("LOCAL_RANK", rank))
        local_size = int(env.get("LOCAL_WORLD_SIZE", size))
    except ValueError:
        raise Rank1Error("RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE must be integers") from None
    if size < 1 or not 0 <= rank < size:
        raise Rank1Error(f"bad RANK={rank} / WORLD_SIZE={size}")
    if local_size != size:
        raise Rank1Error(
            f"tensor parallel spans the processes of one node, but WORLD_SIZE={size} over {local_size} per node: "
            "for several replicas of a tensor-parallel model start one torchrun job per replica, each judging "
            "its --shard I/N into its own --store (docs/loading.md)")
    return Layout(rank, size, local_rank)


def check_heads(config: Any, size: int) -> None:
    """Each process takes whole attention heads: heads and KV heads must divide by the process count."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if heads % size or kv_heads % size:
        raise Rank1Error(f"tensor parallel over {size} processes needs the attention heads ({heads}) and the KV "
                         f"heads ({kv_heads}) to divide by {size}; use {_divisors(heads, kv_heads)} processes")


def _divisors(heads: int, kv_heads: int) -> str:
    return " or ".join(str(n) for n in range(2, kv_heads + 1) if heads % n == 0 and kv_heads % n == 0) or "1"


class _Group:
    """The process group of the job and the gloo group the leader sends engine calls over."""

    layout: Layout | None = None
    control: Any = None
    owned = False  # this module started the process group (and ends it at exit)
    job = False  # leader: the followers wait for its messages between rankers (a CLI job)
    following = False  # leader: a ranker of its is followed (between its load and its close)
    ended = False  # leader: the followers were told the job is over


def start(layout: Layout) -> None:
    """Join torchrun's process group (gloo on CPU, nccl on CUDA, each process on cuda:LOCAL_RANK) unless the
    caller already did, and make the control group. Idempotent."""
    import torch
    import torch.distributed as dist

    if _Group.layout is not None:
        return
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(layout.local_rank % torch.cuda.device_count())
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        _Group.owned = True
    if dist.get_world_size() != layout.size:
        raise Rank1Error(f"the process group has {dist.get_world_size()} processes, WORLD_SIZE says {layout.size}")
    _Group.control = dist.new_group(backend="gloo", timeout=_CONTROL_TIMEOUT)
    _Group.layout = layout
    atexit.register(end_job)


def layout() -> Layout | None:
    """The layout of the tensor-parallel job this process is in (None outside one)."""
    return _Group.layout


def load_arguments(config: Any) -> dict[str, Any]:
    """``from_pretrained`` keywords that split the model over the job's processes (after :func:`start`)."""
    from transformers.distributed.configuration_utils import DistributedConfig

    size = _Group.layout.size
    check_heads(config, size)
    return {"distributed_config": DistributedConfig(tp_plan="auto", tp_size=size)}


def tp_size(model: Any) -> int:
    """How many processes share ``model``'s heads (1 for a model not split by tensor parallel)."""
    return int(getattr(model, "_tp_size", None) or 1)


def send(message: Any) -> None:
    """Leader: send ``message`` to every follower (nothing in a job of one process, or once it ended)."""
    import torch.distributed as dist

    if _Group.layout is not None and _Group.layout.size > 1 and not _Group.ended:
        dist.broadcast_object_list([message], src=0, group=_Group.control)


def receive() -> Any:
    """Follower: the leader's next message."""
    import torch.distributed as dist

    box = [None]
    dist.broadcast_object_list(box, src=0, group=_Group.control)
    return box[0]


def agree_min(value: int) -> int:
    """The least of every process's ``value`` (sizes that hang on each card's free memory must agree)."""
    import torch
    import torch.distributed as dist

    if _Group.layout is None or _Group.layout.size == 1:
        return value
    box = torch.tensor([value], dtype=torch.long)
    dist.all_reduce(box, op=dist.ReduceOp.MIN, group=_Group.control)
    return int(box.item())


def followed(on: bool, *, job: bool = False) -> None:
    """Leader: the followers now follow a ranker (``on``) or no longer do; ``job``: they also wait between
    rankers, for the next one (the CLI's followers), until :func:`end_job`."""
    _Group.following = on
    _Group.job = _Group.job or job


def abort(error: BaseException) -> None:
    """Leader: its engine failed, perhaps between the collectives of a step the followers are still inside.
    End the process group (a follower waiting in a collective then fails, and torchrun ends the job)
    rather than send anything more."""
    import torch.distributed as dist

    logger.error("tensor parallel process 0 failed (%s: %s): ending the job's process group",
                 type(error).__name__, error)
    _Group.ended = True
    if dist.is_initialized():
        dist.destroy_process_group()
    _Group.owned = False


def is_followed() -> bool:
    """Leader: whether the followers follow a ranker now."""
    return _Group.following


def end_job() -> None:
    """At exit. Leader: tell followers still waiting that the job is over, so that they exit too. Every
    process: end the process group this module started (a live gloo group aborts the interpreter's exit)."""
    import torch.distributed as dist

    layout = _Group.layout
    if layout is not None and layout.is_leader and (_Group.job or _Group.following) and not _Group.ended:
        try:
            send(END)
        except Exception as error:  # noqa: BLE001 - a follower already gone: torchrun ends the job anyway
            logger.debug("could not end the followers: %s", error)
    _Group.ended = True
    if _Group.owned and dist.is_initialized():
        dist.destroy_process_group()
        _Group.owned = False
