"""The one place for ``torch.distributed`` in pyiqa_grmp: launch, rank and device, collectives, sharding, and
how a job ends (warnings shown once, the exit status rank 0 alone carries, for torchrun's report).

Launchers: ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) and SLURM
(``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``, with ``MASTER_ADDR`` / ``MASTER_PORT`` exported by the job
script). Each process uses ``cuda:LOCAL_RANK`` with NCCL, or the CPU with gloo.

Every helper also works without a process group (one process: rank 0 of 1), so callers never branch on
whether they were launched in parallel; a model or a scoring loop asks this module, never the environment.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import socket
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, TypeVar

import torch
import torch.distributed as dist

T = TypeVar('T')

LAUNCHERS = ('torchrun', 'slurm')


@dataclass(frozen=True)
class LaunchEnvironment:
    """Where a launcher put this process: its rank among ``world_size`` and its index on its machine."""

    launcher: str
    rank: int
    world_size: int
    local_rank: int


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job and what it computes on; ``backend`` is None for a single process."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: Optional[str]

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int_variable(environ: Mapping[str, str], name: str) -> int:
    value = environ.get(name)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f'environment variable {name}={value!r} is not an integer') from None


def launch_environment(launcher: Optional[str] = None,
                       environ: Optional[Mapping[str, str]] = None) -> Optional[LaunchEnvironment]:
    """Read the rank variables of ``launcher`` ('torchrun' or 'slurm'); None detects torchrun's, then SLURM's.

    Returns None when no launcher's variables are set (a plain process). With SLURM, a job step of one task
    (``SLURM_NTASKS`` 1) is a plain process too, so ``srun python ...`` of a single task needs nothing else.
    """
    environ = os.environ if environ is None else environ
    if launcher not in (None, *LAUNCHERS):
        raise ValueError(f'unknown launcher {launcher!r}; known: {", ".join(LAUNCHERS)}')
    if launcher in (None, 'torchrun') and 'WORLD_SIZE' in environ and 'RANK' in environ:
        return LaunchEnvironment('torchrun', _int_variable(environ, 'RANK'), _int_variable(environ, 'WORLD_SIZE'),
                                 _int_variable(environ, 'LOCAL_RANK') if 'LOCAL_RANK' in environ else 0)
    if launcher in (None, 'slurm') and 'SLURM_PROCID' in environ and 'SLURM_NTASKS' in environ:
        found = LaunchEnvironment('slurm', _int_variable(environ, 'SLURM_PROCID'),
                                  _int_variable(environ, 'SLURM_NTASKS'),
                                  _int_variable(environ, 'SLURM_LOCALID') if 'SLURM_LOCALID' in environ else 0)
        return found if launcher == 'slurm' or found.world_size > 1 else None
    return None


def _pick_device(device: Optional[str], local_rank: int, distributed: bool) -> torch.device:
    kind = device or ('cuda' if torch.cuda.is_available() else 'cpu')
    chosen = torch.device(kind)
    if chosen.type != 'cuda':
        return chosen
    if not torch.cuda.is_available():
        raise ValueError(f'device {kind!r} was asked for, but CUDA is not available')
    if not distributed:
        return chosen
    if chosen.index is not None:
        raise ValueError(f'under a launcher each process uses cuda:LOCAL_RANK; give device "cuda", not {kind!r}')
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ValueError(f'LOCAL_RANK {local_rank} has no GPU: this machine has {count} CUDA device(s); start at most '
                         f'{count} processes per machine (torchrun --nproc_per_node {count})')
    return torch.device('cuda', local_rank)


def init_distributed(launcher: Optional[str], device: Optional[str] = None,
                     backend: Optional[str] = None) -> DistContext:
    """Join the process group a launcher set up, or describe a single process when there is none.

    ``launcher``: 'torchrun' or 'slurm' (its variables must be set), or None to detect them (a launch with
    world size 1 is a single process). ``device``: 'cpu' or 'cuda' (default: cuda when available); each
    process of a parallel job gets ``cuda:LOCAL_RANK``. ``backend``: default nccl on CUDA, gloo on the CPU.
    Calling it again in a process that already joined returns the same context.
    """
    found = launch_environment(launcher)
    if launcher is not None and found is None:
        needed = 'RANK and WORLD_SIZE' if launcher == 'torchrun' else 'SLURM_PROCID and SLURM_NTASKS'
        raise ValueError(f'launcher {launcher!r} was asked for, but {needed} are not set: start the command with '
                         f'{"torchrun" if launcher == "torchrun" else "srun"}')
    local_rank = found.local_rank if found else 0
    if dist.is_initialized():  # joined already (an earlier call, or the caller's own set-up)
        chosen = _pick_device(device, local_rank, distributed=dist.get_world_size() > 1)
        return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, chosen, dist.get_backend())
    if found is None or found.world_size <= 1:
        return DistContext(0, 1, local_rank, _pick_device(device, local_rank, distributed=False), None)
    chosen = _pick_device(device, found.local_rank, distributed=True)
    backend = backend or ('nccl' if chosen.type == 'cuda' else 'gloo')
    if backend == 'nccl' and chosen.type != 'cuda':
        raise ValueError('the nccl backend needs CUDA devices; use device "cuda" or backend "gloo"')
    if chosen.type == 'cuda':
        torch.cuda.set_device(chosen)
    if found.launcher == 'slurm':
        _export_slurm_variables(found)
    dist.init_process_group(backend=backend, init_method='env://', rank=found.rank, world_size=found.world_size)
    return DistContext(found.rank, found.world_size, found.local_rank, chosen, backend)


def _export_slurm_variables(found: LaunchEnvironment) -> None:
    """``env://`` initialisation reads MASTER_ADDR / MASTER_PORT, which a SLURM job script must export."""
    missing = [name for name in ('MASTER_ADDR', 'MASTER_PORT') if name not in os.environ]
    if missing:
        raise ValueError(f'under SLURM export {" and ".join(missing)} in the job script (the first node\'s host '
                         'name and a free port), so that the processes can meet')
    os.environ.update(RANK=str(found.rank), WORLD_SIZE=str(found.world_size), LOCAL_RANK=str(found.local_rank))


def get_rank() -> int:
    """This process's rank; 0 without a process group."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    """The number of processes in the job; 1 without a process group."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """True on rank 0, which writes files and prints."""
    return get_rank() == 0


def _collective_device_ids() -> Optional[List[int]]:
    if dist.get_backend() == 'nccl':
        return [torch.cuda.current_device()]
    return None


def barrier() -> None:
    """Wait until every process arrives; nothing to wait for in a single process."""
    if get_world_size() > 1:
        dist.barrier(device_ids=_collective_device_ids())


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` (any picklable value) on every rank; the others' argument is ignored."""
    if get_world_size() == 1:
        return obj
    holder = [obj if get_rank() == src else None]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def all_gather_objects(obj: Any) -> List[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if get_world_size() == 1:
        return [obj]
    gathered: List[Any] = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def gather_objects(obj: Any, dst: int = 0) -> Optional[List[Any]]:
    """Every rank's ``obj``, in rank order, on rank ``dst`` only (None elsewhere): for results only one writes."""
    if get_world_size() == 1:
        return [obj]
    gathered: Optional[List[Any]] = [None] * get_world_size() if get_rank() == dst else None
    dist.gather_object(obj, gathered, dst=dst)
    return gathered


def shard(items: Sequence[T], rank: int, world_size: int) -> List[T]:
    """Rank ``rank``'s share of ``items``: every ``world_size``-th item from position ``rank``.

    Deterministic, disjoint and complete over the ranks, with sizes differing by at most one; interleaving
    spreads runs of similar items (e.g. a folder of large photos) over all ranks.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f'rank {rank} is not in a world of size {world_size}')
    return list(items[rank::world_size])


def destroy() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ------------------------------------------------------------------------------ one job's messages and status
def launch_rank() -> int:
    """This process's rank as its launcher set it (0 for a plain process), readable before the job is joined,
    so that a note every rank would print is printed by rank 0 alone."""
    found = launch_environment()
    return found.rank if found is not None and found.world_size > 1 else 0


@contextlib.contextmanager
def warnings_once() -> Iterator[None]:
    """Python warnings of a job's ranks shown once: rank 0 shows its own as they come; the other ranks hold
    theirs, and after the block (which may be where the job is joined; every rank must leave it) rank 0 shows,
    naming the ranks, those it did not show itself.

    Every rank runs the same code, so most warnings come from all of them; a plain process shows them as usual.
    An exception leaving the block skips the exchange (the other ranks may never arrive), as does a block that
    never joined the job; a rank > 0 then shows what it held.
    """
    found = launch_environment()
    if found is None or found.world_size <= 1:
        yield
        return
    held: List[Tuple[str, str, str, int]] = []
    with warnings.catch_warnings():
        show = warnings.showwarning

        def hold(message, category, filename, lineno, file=None, line=None):
            held.append((category.__name__, str(message), filename, lineno))
            if found.rank == 0:
                show(message, category, filename, lineno, file, line)

        warnings.showwarning = hold
        try:
            yield
        except BaseException:
            for warning in held if found.rank > 0 else []:
                _show(warning)
            raise
    _meet_to_end()
    if get_world_size() == 1:  # the block did not join the job: nobody to hand the warnings to
        for warning in held if found.rank > 0 else []:
            _show(warning)
        return
    gathered = gather_objects(held)
    ranks_of: Dict[Tuple[str, str, str, int], List[int]] = {}
    for rank, theirs in enumerate(gathered[1:] if gathered else [], start=1):
        for warning in theirs:
            if warning not in gathered[0]:
                ranks_of.setdefault(warning, []).append(rank)
    for warning, ranks in ranks_of.items():
        _show(warning, f' (rank {", ".join(map(str, ranks))})')


def _show(warning: Tuple[str, str, str, int], ranks: str = '') -> None:
    category, message, filename, lineno = warning
    print(f'{filename}:{lineno}: {category}{ranks}: {message}', file=sys.stderr)


def leave_with_status(status: int, reason: str) -> int:
    """This process's exit status at the end of a job: rank 0 exits with the highest ``status`` of the ranks,
    the others with 0. Every rank calls it with its own ``status`` and ``reason`` (one line saying why when the
    status is not 0); a plain process returns ``status``.

    The ranks' work is done and their results are written (or rank 0's), so one status says how the job went.
    Under torchrun, which reports any rank's nonzero exit as a failed job (``ChildFailedError``: its traceback
    and a block per failed rank, and a restart when ``--max-restarts`` allows one), rank 0 first writes the
    reasons to the error file torchrun reads (``TORCHELASTIC_ERROR_FILE``), so that the block shows them rather
    than a pointer to tracebacks, and waits (at most ``EXIT_WAIT_SECONDS``) for the other ranks of its machine
    (its process-id space) to end, so that the block names rank 0 alone, not ranks torchrun had to stop. Ranks
    that worked alone under torchrun (``score --out``) meet for this first (:func:`_meet_to_end`).
    """
    _meet_to_end()
    if get_world_size() == 1:
        return status
    ends = all_gather_objects((status, reason, _process_space(), os.getpid()))
    if get_rank() != 0:
        return 0
    failed = [(rank, reason) for rank, (code, reason, _, _) in enumerate(ends) if code != 0]
    status = max(code for code, _, _, _ in ends)
    error_file = os.environ.get('TORCHELASTIC_ERROR_FILE')
    if failed and error_file:
        from .checkpointing import write_atomically

        text = failed[0][1] if len(failed) == 1 else '; '.join(f'rank {rank}: {reason}' for rank, reason in failed)
        # torchrun's own format (torch.distributed.elastic's ErrorHandler): the block shows 'message'
        data = {'message': {'message': text, 'extraInfo': {'timestamp': str(int(time.time()))}}}
        write_atomically(error_file, json.dumps(data))
        space = ends[0][2]
        deadline = time.monotonic() + EXIT_WAIT_SECONDS
        for _, _, other_space, pid in ends[1:]:
            while other_space == space and _running(pid) and time.monotonic() < deadline:
                time.sleep(0.02)
    return status


def _meet_to_end() -> None:
    """Join the ranks of a torchrun job (gloo, for a few small objects) when this process worked alone, as
    ``score --out`` does, so that the job ends as one; a rank that finished first waits for the others
    (up to ``MEETING_TIMEOUT``), which torchrun does anyway before it exits."""
    found = launch_environment()
    if (get_world_size() > 1 or found is None or found.world_size <= 1 or found.launcher != 'torchrun'
            or 'TORCHELASTIC_RUN_ID' not in os.environ):
        return
    dist.init_process_group(backend='gloo', init_method='env://', rank=found.rank, world_size=found.world_size,
                            timeout=MEETING_TIMEOUT)


#: How long a rank of a torchrun job that worked alone waits for the others at the end.
MEETING_TIMEOUT = datetime.timedelta(days=7)
#: How long rank 0 waits for the other ranks of its machine to end before it exits with a failure status.
EXIT_WAIT_SECONDS = 30.0


def _process_space() -> str:
    """What names this process's process-id space: the kernel's boot id and the pid namespace (two processes with
    the same space see each other's ids), else the host name."""
    try:
        with open('/proc/sys/kernel/random/boot_id') as handle:
            return f'{handle.read().strip()} {os.readlink("/proc/self/ns/pid")}'
    except OSError:
        return socket.gethostname()


def _running(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie, waiting for its parent to collect its status, has ended);
    False where ``/proc`` cannot tell."""
    try:
        with open(f'/proc/{pid}/stat', 'rb') as handle:
            state = handle.read().rsplit(b')', 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in (b'Z', b'X')


# ------------------------------------------------------------------------------------- training collectives
def _flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).to(torch.float32) for t in tensors]) if tensors else torch.zeros(0)


def _unflatten_into(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    offset = 0
    for tensor in tensors:
        count = tensor.numel()
        tensor.copy_(flat[offset:offset + count].view_as(tensor).to(tensor.dtype))
        offset += count


def broadcast_tensors_(tensors: Sequence[torch.Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` (in place, on every rank) with rank ``src``'s values, in one collective."""
    if get_world_size() == 1 or not tensors:
        return
    flat = _flat(tensors).to(tensors[0].device)
    dist.broadcast(flat, src=src)
    with torch.no_grad():
        _unflatten_into(flat, tensors)


def all_reduce_sum_(tensors: Sequence[torch.Tensor]) -> None:
    """Replace ``tensors`` (in place) by their sums over the ranks, in one collective."""
    if get_world_size() == 1 or not tensors:
        return
    flat = _flat(tensors).to(tensors[0].device)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    with torch.no_grad():
        _unflatten_into(flat, tensors)


def average_gradients(grads: Sequence[Optional[torch.Tensor]]) -> List[Optional[torch.Tensor]]:
    """The mean over the ranks of each gradient (``None`` stays ``None``: every rank has the same graph)."""
    present = [g for g in grads if g is not None]
    if get_world_size() == 1 or not present:
        return list(grads)
    summed = [g.clone() for g in present]
    all_reduce_sum_(summed)
    averaged = iter(s / get_world_size() for s in summed)
    return [None if g is None else next(averaged) for g in grads]


def any_rank(flag: bool, device: Optional[torch.device] = None) -> bool:
    """True on every rank when ``flag`` is true on any rank (e.g. a stop signal that reached one process)."""
    if get_world_size() == 1:
        return bool(flag)
    if device is None:
        device = torch.device('cuda', torch.cuda.current_device()) if dist.get_backend() == 'nccl' else None
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def tensor_digests(tensors: Mapping[str, torch.Tensor]) -> Dict[str, str]:
    """sha256 of each tensor's dtype, shape and bytes, by name: equal digests mean bit-identical tensors."""
    digests = {}
    for name, tensor in tensors.items():
        value = tensor.detach().cpu().contiguous()
        digest = hashlib.sha256(f'{value.dtype} {tuple(value.shape)}'.encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
        digests[name] = digest.hexdigest()
    return digests


def differing_tensors(digests_by_rank: Sequence[Mapping[str, str]]) -> Dict[str, List[int]]:
    """The tensors whose digest on some rank differs from rank 0's (or that a rank lacks), with those ranks."""
    names = sorted(set().union(*digests_by_rank))
    reference = digests_by_rank[0]
    differing = {}
    for name in names:
        ranks = [rank for rank, digests in enumerate(digests_by_rank)
                 if name not in reference or digests.get(name) != reference[name]]
        if ranks:
            differing[name] = ranks
    return differing


def check_ranks_hold_the_same(tensors: Mapping[str, torch.Tensor], what: str = 'weights') -> int:
    """Compare every tensor, bit for bit, across the ranks (by gathered sha256 digests); raise a RuntimeError
    naming the tensors that differ and the ranks they differ on. Returns the number of tensors compared."""
    differing = differing_tensors(all_gather_objects(tensor_digests(tensors)))
    if differing:
        shown = '; '.join(f'{name} on rank(s) {", ".join(map(str, ranks))}'
                          for name, ranks in list(differing.items())[:20])
        more = f' (and {len(differing) - 20} more)' if len(differing) > 20 else ''
        raise RuntimeError(f'the ranks ended training with different {what}: {len(differing)} of {len(tensors)} '
                           f'tensors differ from rank 0: {shown}{more}')
    return len(tensors)


# ------------------------------------------------------------------------------------ tasks without a group
def task_slot(environ: Optional[Mapping[str, str]] = None) -> tuple:
    """(number of tasks, this task's index) a scheduler gives a process that works alone, e.g. on its shards.

    Inside a Slurm array (``SLURM_ARRAY_TASK_ID`` - ``SLURM_ARRAY_TASK_MIN`` of ``SLURM_ARRAY_TASK_COUNT``), each
    array task is one slot, split again over the processes it runs: torchrun's ``RANK`` of ``WORLD_SIZE`` when set,
    else Slurm's ``SLURM_PROCID`` of ``SLURM_NTASKS``; so (A array tasks x P processes) give A*P slots, slot
    ``array index * P + process index``. Without an array, the processes alone (torchrun's variables win over
    Slurm's, as in :func:`launch_environment`); without any, (1, 0).
    """
    environ = os.environ if environ is None else environ
    found = launch_environment(None, environ)
    inner = (found.world_size, found.rank) if found else (1, 0)
    if 'SLURM_ARRAY_TASK_ID' in environ and 'SLURM_ARRAY_TASK_COUNT' in environ:
        count = _int_variable(environ, 'SLURM_ARRAY_TASK_COUNT')
        index = _int_variable(environ, 'SLURM_ARRAY_TASK_ID') - (
            _int_variable(environ, 'SLURM_ARRAY_TASK_MIN') if 'SLURM_ARRAY_TASK_MIN' in environ else 0)
        if not 0 <= index < count:
            raise ValueError(f'SLURM_ARRAY_TASK_ID gives task {index} of {count}: give a contiguous array, e.g. '
                             f'--array=0-{count - 1}, or the shard options')
        return count * inner[0], index * inner[0] + inner[1]
    return inner


def process_device(device: Optional[str] = None) -> torch.device:
    """The device of a process that works alone under a launcher: ``cuda:LOCAL_RANK`` for 'cuda' (default when
    available), else ``device``; no process group is joined."""
    found = launch_environment(None)
    return _pick_device(device, found.local_rank if found else 0, distributed=found is not None and
                        found.world_size > 1)
