"""Data parallelism across processes (``torchrun`` / ``accelerate launch``): who this process is, which share of
the calibration batches it takes, and how per-process statistics become the statistics of the whole set.

Every function is the identity in a single process (no initialised ``torch.distributed`` process group), so
methods call them unconditionally: a method accumulates over the batches its process sees, then reduces.

- :func:`init_from_environment`: the process group of a ``torchrun`` / ``accelerate launch`` run (gloo on the
  CPU, nccl on CUDA), called by the ``cahp prune`` / ``cahp bench`` entry points when ``WORLD_SIZE > 1``.
- :func:`owns_batch`: batch ``i`` of the GLOBAL batch sequence belongs to process ``i % world_size``.
- :func:`local_rows`: this process's contiguous share of the rows of one global batch (trained gates and the
  recovery fine-tune split every step's batch, so one optimiser step sees the same examples as one process).
- :func:`all_reduce_sum`: element-wise sum of a tensor over processes (gradient sums, counts).
- :func:`merge_moments`: the exact merge of every process's :class:`~cahp.signatures.stats.StreamingMoments`
  (Chan et al.), merged in rank order so every process ends with the same statistics.
- :func:`broadcast_object`: rank 0's value on every process (a keep-plan, a cached fit, a resume decision).
- :func:`check_same`: refuse a run whose processes disagree (different weights or calibration examples).

Every collective is called by every process the same number of times, also by a process that got no batch.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.distributed as dist

from cahp.errors import CahpError

if TYPE_CHECKING:
    from cahp.signatures.stats import StreamingMoments

#: How long a process waits at a collective for the others (rank 0 evaluates alone while the others wait).
DEFAULT_TIMEOUT_MINUTES = 120

T = TypeVar("T")


def is_distributed() -> bool:
    """Whether a process group with more than one process is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 in a single process)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes (1 in a single process)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Whether this process is the one that writes (rank 0, or the only process)."""
    return rank() == 0


def launched_world_size() -> int:
    """``WORLD_SIZE`` set by ``torchrun`` / ``accelerate launch`` (1 when not launched by them)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        raise CahpError(f"WORLD_SIZE must be a whole number of processes, got {os.environ['WORLD_SIZE']!r}") from None


def init_from_environment(timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES) -> bool:
    """Initialise the process group from the launcher's environment when ``WORLD_SIZE > 1``.

    nccl when CUDA is available (each process on the GPU ``LOCAL_RANK``), gloo on the CPU. Nothing happens in a
    single process or when a group is already initialised.

    Returns:
        Whether this run has several processes.

    Raises:
        CahpError: ``WORLD_SIZE > 1`` without the rendezvous variables a launcher sets.
    """
    if launched_world_size() <= 1 or (dist.is_available() and dist.is_initialized()):
        return is_distributed()
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing or not dist.is_available():
        raise CahpError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing) or 'torch.distributed'} is missing: "
            "start several processes with `torchrun --nproc_per_node N -m cahp ...` or `accelerate launch -m cahp ...`"
        )
    backend = "gloo"
    if torch.cuda.is_available():
        backend = "nccl"
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return is_distributed()


def shutdown() -> None:
    """Destroy the process group if one is initialised (at the end of a command)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait until every process gets here (nothing in a single process)."""
    if is_distributed():
        dist.barrier()


def owns_batch(index: int) -> bool:
    """Whether batch ``index`` of the global batch sequence is this process's (``index % world_size == rank``)."""
    return index % world_size() == rank()


def local_batch_count(total: int) -> int:
    """How many of ``total`` global batches this process takes."""
    return len(range(rank(), total, world_size()))


def local_rows(rows: int) -> slice:
    """This process's contiguous share of ``rows`` rows of one global batch (shares differ by at most one row,
    earlier ranks take the extra ones; a share may be empty when ``rows < world_size``)."""
    base, extra = divmod(rows, world_size())
    start = rank() * base + min(rank(), extra)
    return slice(start, start + base + (1 if rank() < extra else 0))


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed element-wise over processes (a new tensor; the input is not modified).

    The sum runs on the tensor's device (gloo: CPU; nccl: CUDA), moved there and back when needed.
    """
    if not is_distributed():
        return tensor
    device = _collective_device()
    reduced = tensor.detach().to(device, copy=True)
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced.to(tensor.device)


def all_reduce_sums(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Several tensors summed over processes in ONE collective (flattened together, float64 on the wire)."""
    if not is_distributed():
        return list(tensors)
    flat = torch.cat([tensor.detach().reshape(-1).to(torch.float64).cpu() for tensor in tensors])
    flat = all_reduce_sum(flat)
    out, start = [], 0
    for tensor in tensors:
        out.append(flat[start : start + tensor.numel()].view(tensor.shape).to(tensor.dtype).to(tensor.device))
        start += tensor.numel()
    return out


def all_reduce_gradients(parameters: list[torch.Tensor]) -> None:
    """Sum the ``.grad`` of ``parameters`` over processes in place, in one collective per call (a parameter
    without a gradient, e.g. on a process that had no rows, counts as zeros; one without a gradient on EVERY
    process keeps ``grad = None``, so the optimiser skips it as in one process, e.g. no weight decay)."""
    if not is_distributed():
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    device = _collective_device()
    present = torch.tensor([float(p.grad is not None) for p in parameters], device=device)  # [parameters]
    flat = torch.cat([*(g.detach().reshape(-1).float().to(device) for g in grads), present])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    holders = flat[flat.numel() - len(parameters) :].tolist()  # how many processes had each gradient
    start = 0
    for parameter, holders_of_this in zip(parameters, holders, strict=True):
        size = parameter.numel()
        if holders_of_this > 0:
            parameter.grad = flat[start : start + size].view(parameter.shape).to(parameter.device, parameter.dtype)
        start += size


def merge_moments(moments: StreamingMoments) -> StreamingMoments:
    """Every process's moments merged exactly, in rank order (the input itself in a single process)."""
    if not is_distributed():
        return moments
    from cahp.signatures.stats import StreamingMoments

    states: list[dict | None] = [None] * world_size()
    dist.all_gather_object(states, moments.state_dict() if moments.is_fitted else None)
    merged = StreamingMoments(moments.n_groups, device=moments.device)
    for state in states:
        if state is not None:
            merged.merge(StreamingMoments(moments.n_groups).load_state_dict(state))
    return merged


def broadcast_object(value: Any, source: int = 0) -> Any:
    """Rank ``source``'s ``value`` (picklable) on every process; ``value`` itself in a single process."""
    if not is_distributed():
        return value
    holder = [value if rank() == source else None]
    dist.broadcast_object_list(holder, src=source, device=_object_device())
    return holder[0]


def all_gather_object(value: Any) -> list[Any]:
    """Every process's ``value``, in rank order (``[value]`` in a single process)."""
    if not is_distributed():
        return [value]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def check_same(value: Any, what: str) -> None:
    """Refuse a run whose processes hold different ``value`` s (e.g. weight fingerprints).

    Raises:
        CahpError: naming ``what`` and the ranks that differ from rank 0.
    """
    values = all_gather_object(value)
    differ = [index for index, other in enumerate(values) if other != values[0]]
    if differ:
        raise CahpError(
            f"the processes disagree on the {what} (ranks {differ} differ from rank 0): every process must load "
            "the same model and data with the same settings and seed"
        )


def check_same_settings(settings: dict[str, Any], what: str = "run settings") -> None:
    """Refuse a run whose processes were given different settings, naming the keys that differ.

    Args:
        settings: this process's resolved settings, a JSON-ready (nested) dictionary.

    Raises:
        CahpError: on every process, naming each dotted key whose value differs from rank 0's.
    """
    values = all_gather_object(settings)
    differing = sorted({key for other in values[1:] for key in _differing_keys(values[0], other)})
    if differing:
        ranks = [index for index, other in enumerate(values) if other != values[0]]
        raise CahpError(
            f"the processes were given different {what} (ranks {ranks} differ from rank 0 in "
            f"{', '.join(differing)}): start every process with the same command"
        )


def _differing_keys(first: Any, second: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dictionaries."""
    if not isinstance(first, dict) or not isinstance(second, dict):
        return [] if first == second else [prefix or "(the settings)"]
    keys = sorted(set(first) | set(second))
    return [
        key
        for name in keys
        for key in _differing_keys(
            first.get(name), second.get(name), f"{prefix}{name}" if not prefix else f"{prefix}.{name}"
        )
    ]


def together(step: Callable[[], T]) -> T:
    """Run ``step`` on every process; when it raises a :class:`CahpError` on any of them, every process raises it.

    Without this, a process that fails early (a bad setting, an unreadable file) leaves the others waiting at the
    next collective until its timeout. A single process runs ``step`` as it is.
    """
    if not is_distributed():
        return step()
    result: T | None = None
    failure: tuple[int, str, str] | None = None
    try:
        result = step()
    except CahpError as error:
        failure = (rank(), type(error).__name__, str(error))
        own = error
    failures = [item for item in all_gather_object(failure) if item is not None]
    if failure is not None:
        raise own
    if failures:
        where, kind, message = failures[0]
        raise CahpError(f"process {where} stopped with {kind}: {message}")
    return result  # type: ignore[return-value]


def sync_parameters(module: torch.nn.Module) -> None:
    """Overwrite every parameter and buffer with rank 0's (so every process starts from identical weights)."""
    if not is_distributed():
        return
    device = _collective_device()
    for tensor in [*module.parameters(), *module.buffers()]:
        data = tensor.data.to(device)
        dist.broadcast(data, src=0)
        tensor.data.copy_(data.to(tensor.device))


def _collective_device() -> torch.device:
    """Where tensors must be for this backend's collectives (nccl: this process's GPU; gloo: the CPU)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _object_device() -> torch.device | None:
    return _collective_device() if dist.get_backend() == "nccl" else None
