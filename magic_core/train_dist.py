"""torch.distributed for the trainer: one process per device, started by ``torchrun``. Pure torch.

- ``DistContext.from_env()`` reads what torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
  ``MASTER_PORT``) and joins the process group: NCCL on CUDA, gloo on the CPU. Without those variables (a ComfyUI
  server, a plain ``python``) it is ``DistContext.single()``: world size 1, no process group, nothing to join.
- Rank 0 alone writes (checkpoints, loss log, the final file): ``is_main``.
- Liveness: every rank bumps a counter in the rendezvous store each second (a daemon thread) and records the step it
  works on. When a collective fails (a peer died: gloo sees its sockets close; NCCL's watchdog or the timeout
  fires), ``stopped()`` waits a few beats, names the ranks whose counter stood still (dead), the ranks that
  reported an error of their own, or the rank furthest behind (stuck), and builds one message with the last
  checkpoint, which every surviving rank raises as ``TrainingStopped``.
"""

from __future__ import annotations

import datetime
import os
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
STORE_PREFIX = "magic_portrait/train/"
HEARTBEAT_SECONDS = 1.0
DEAD_AFTER_BEATS = 4  # a counter that stood still this many beats belongs to a dead process


class TrainingStopped(RuntimeError):
    """A distributed run ended because a rank died, failed or hung; the message names it and the last checkpoint."""

    def __init__(self, message: str, *, ranks: Sequence[int] = (), checkpoint: str | None = None):
        super().__init__(message)
        self.ranks = list(ranks)
        self.checkpoint = checkpoint


def launched_by_torchrun(environ=None) -> bool:
    env = os.environ if environ is None else environ
    return all(v in env for v in TORCHRUN_VARIABLES) and int(env.get("WORLD_SIZE", "1")) >= 1


def is_peer_failure(exc: BaseException) -> bool:
    """Whether an exception comes from communication with other ranks (not from this rank's own work)."""
    if getattr(exc, "dist_peer_failure", False):
        return True
    names = {t.__name__ for t in type(exc).__mro__}
    if names & {"DistError", "DistBackendError", "DistNetworkError", "DistStoreError"}:
        return True
    text = str(exc).lower()
    return any(s in text for s in ("connection closed by peer", "connection reset", "broken pipe", "gloo",
                                   "nccl", "timed out", "timeout", "socket", "connection refused", "end of file"))


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None
    host: str = field(default_factory=socket.gethostname)
    _store: Any = None
    _beat_store: Any = None
    _beat_thread: threading.Thread | None = None
    _beat_stop: threading.Event = field(default_factory=threading.Event)
    _owns_group: bool = False
    reporting: bool = False  # set while stopped() finds out why the run ended: signal handlers should not interrupt

    # ------------------------------------------------------------------------------------------------ creation

    @classmethod
    def single(cls, device: str | torch.device = "cpu") -> DistContext:
        return cls(device=torch.device(device))

    @classmethod
    def from_env(cls, *, device: str | torch.device | None = None, timeout_minutes: float = 30.0,
                 environ=None) -> DistContext:
        """Join the process group torchrun describes (or return ``single``). ``device``: "cpu", "cuda" (this
        rank's ``cuda:LOCAL_RANK``) or None (CUDA when available)."""
        env = os.environ if environ is None else environ
        if not launched_by_torchrun(env):
            if device is None:
                device = "cuda" if torch.cuda.is_available() else "cpu"
            return cls.single(device if str(device) != "cuda" else "cuda:0")
        import torch.distributed as dist

        rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])
        kind = str(device) if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        if kind.startswith("cuda"):
            if not torch.cuda.is_available():
                raise RuntimeError(f"rank {rank}: --gpu was asked but CUDA is not available on {socket.gethostname()}")
            if local >= torch.cuda.device_count():
                raise RuntimeError(f"rank {rank}: LOCAL_RANK {local} but {socket.gethostname()} has "
                                   f"{torch.cuda.device_count()} GPU(s); start at most that many processes per node "
                                   "(torchrun --nproc-per-node)")
            dev = torch.device("cuda", local)
            torch.cuda.set_device(dev)
            backend = "nccl"
        else:
            dev, backend = torch.device("cpu"), "gloo"
        timeout = datetime.timedelta(minutes=float(timeout_minutes))
        owns = not dist.is_initialized()
        if owns:
            dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=timeout,
                                    **({"device_id": dev} if backend == "nccl" else {}))
        ctx = cls(rank=rank, world_size=world, local_rank=local, device=dev, backend=backend, _owns_group=owns)
        if world > 1:
            ctx._store = ctx._new_store(env, timeout)
            ctx._beat_store = ctx._new_store(env, timeout)
        return ctx

    @staticmethod
    def _new_store(env, timeout):
        import torch.distributed as dist

        store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False, timeout=timeout,
                              wait_for_workers=False)
        run = env.get("TORCHELASTIC_RUN_ID", "") + ":" + env.get("TORCHELASTIC_RESTART_COUNT", "0")
        return dist.PrefixStore(STORE_PREFIX + run + "/", store)

    # ---------------------------------------------------------------------------------------------- properties

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def describe(self) -> str:
        if not self.is_distributed:
            return f"1 process on {self.device}"
        return f"rank {self.rank} of {self.world_size} ({self.backend}, {self.device} on {self.host})"

    # ----------------------------------------------------------------------------------------------- collectives

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        if not self.is_distributed:
            return value
        import torch.distributed as dist

        out = value.detach().to(self.device, torch.float64).clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (an exception object is re-raised everywhere)."""
        if self.is_distributed:
            import torch.distributed as dist

            box = [obj if self.is_main else None]
            dist.broadcast_object_list(box, src=0, device=self._object_device())
            obj = box[0]
        if isinstance(obj, BaseException):
            raise obj
        return obj

    def all_gather_object(self, obj: Any) -> list:
        if not self.is_distributed:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_tensors(self, tensors: list[torch.Tensor]) -> None:
        """Rank 0's values into ``tensors`` (same shapes on every rank), in place."""
        if not self.is_distributed:
            return
        import torch.distributed as dist

        for t in tensors:
            dist.broadcast(t, src=0)

    def _object_device(self):
        return self.device if self.backend == "nccl" else torch.device("cpu")

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """DistributedDataParallel over ``module`` (the trained parameters only; the base model is never wrapped).
        Its construction broadcasts rank 0's parameters, so every rank starts from the same weights."""
        if not self.is_distributed:
            return module
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        # gradients as views into DDP's buckets: one copy of them, not two
        return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=False,
                                       gradient_as_bucket_view=True)

    # -------------------------------------------------------------------------------------------------- liveness

    def start_heartbeat(self) -> None:
        if not self.is_distributed or self._beat_thread is not None:
            return
        key = f"beat/{self.rank}"
        self._beat_store.add(key, 1)

        def beat():
            while not self._beat_stop.wait(HEARTBEAT_SECONDS):
                try:
                    self._beat_store.add(key, 1)
                except Exception:  # the store is gone: the run is ending anyway
                    return

        self._beat_thread = threading.Thread(target=beat, name="magic-portrait-heartbeat", daemon=True)
        self._beat_thread.start()

    def mark_step(self, step: int) -> None:
        if self.is_distributed:
            self._store.set(f"step/{self.rank}", str(int(step)))

    def record_failure(self, exc: BaseException) -> None:
        """Tell the other ranks why this one stops (before it leaves)."""
        if not self.is_distributed:
            return
        try:
            first_line = (str(exc).splitlines() or [""])[0][:300]
            self._store.set(f"failed/{self.rank}", f"{type(exc).__name__}: {first_line}")
        except Exception:  # best effort: the store may be gone
            return

    def _read(self, key: str) -> str | None:
        try:
            if self._store.check([key]):
                return self._store.get(key).decode(errors="replace")
        except Exception:
            return None
        return None

    def _beats(self) -> list[int | None]:
        out = []
        for r in range(self.world_size):
            try:
                out.append(int(self._store.add(f"beat/{r}", 0)))
            except Exception:
                out.append(None)
        return out

    def stopped(self, exc: BaseException, *, step: int, checkpoint: str | None) -> TrainingStopped:
        """Why the run stopped (called on every rank whose collective failed), as one actionable message."""
        where = (f"the last checkpoint is {checkpoint}; resume from it (Train RepControlNet: resume on; the command "
                 "line: the same command, --resume is the default) with any number of processes"
                 if checkpoint else "no checkpoint had been written yet, so a new run starts from the beginning")
        if not self.is_distributed:
            return TrainingStopped(f"training stopped at step {step + 1}: {exc}; {where}", checkpoint=checkpoint)
        self.reporting = True
        own = not is_peer_failure(exc)
        if own:  # this rank's own error: tell the others, nothing to find out
            self.record_failure(exc)
            return TrainingStopped(f"training stopped at step {step + 1} ({self.world_size} processes): rank "
                                   f"{self.rank} failed: {type(exc).__name__}: {exc}. {where[0].upper()}{where[1:]}.",
                                   ranks=[self.rank], checkpoint=checkpoint)
        first = self._beats()
        if all(b is None for b in first):
            return TrainingStopped(
                f"training stopped at step {step + 1} on rank {self.rank}: the rendezvous store is unreachable, so "
                f"the process hosting it died (rank 0, or the torchrun agent on the master node) ({exc}); {where}",
                ranks=[0], checkpoint=checkpoint)
        deadline = time.monotonic() + HEARTBEAT_SECONDS * DEAD_AFTER_BEATS
        failed = {}
        while time.monotonic() < deadline:
            failed = {r: self._read(f"failed/{r}") for r in range(self.world_size) if r != self.rank}
            failed = {r: m for r, m in failed.items() if m}
            if failed:
                break
            time.sleep(HEARTBEAT_SECONDS / 4)
        second = self._beats()
        dead = [r for r in range(self.world_size) if r != self.rank and
                (second[r] is None or first[r] is None or second[r] == first[r]) and r not in failed]
        steps = {r: self._read(f"step/{r}") for r in range(self.world_size)}
        parts = []
        for r, message in sorted(failed.items()):
            parts.append(f"rank {r} failed: {message}")
        if dead and not failed:
            parts.append(", ".join(f"rank {r}" for r in dead) + (" is" if len(dead) == 1 else " are") +
                         " gone (the process was killed or crashed: no heartbeat for "
                         f"{HEARTBEAT_SECONDS * DEAD_AFTER_BEATS:.0f} s)" +
                         "".join(f"; rank {r} was last seen at step {int(steps[r]) + 1}" for r in dead if steps.get(r)))
        if not parts:
            known = {r: int(s) for r, s in steps.items() if s is not None}
            laggard = min(known, key=known.get) if known else None
            parts.append(f"a collective failed ({exc})" + (
                f"; rank {laggard} is alive but behind (step {known[laggard] + 1}): it hangs or is much slower"
                if laggard is not None and known[laggard] < max(known.values()) else ""))
        named = sorted(set(failed) | set(dead))
        return TrainingStopped(f"training stopped at step {step + 1} ({self.world_size} processes): "
                               + "; ".join(parts) + f". {where[0].upper()}{where[1:]}.",
                               ranks=named, checkpoint=checkpoint)

    def close(self) -> None:
        self._beat_stop.set()
        if self._beat_thread is not None:
            self._beat_thread.join(timeout=2 * HEARTBEAT_SECONDS)
            self._beat_thread = None
        if self.is_distributed and self._owns_group:
            import torch.distributed as dist

            if dist.is_initialized():
                try:
                    dist.destroy_process_group()
                except Exception:  # a broken group after a failure: the process is ending
                    return
