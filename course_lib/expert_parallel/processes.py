"""Starting W cooperating processes from a notebook or a test, and never leaving one behind.

`launch(job, world_size, *args)` spawns W fresh Python processes (`torch.multiprocessing`, start method
"spawn": it works from Jupyter, macOS and Windows alike), joins them into one gloo process group on
127.0.0.1 at a free port, runs `job(ctx, *args)` on each and returns each rank's result. Every collective
has a timeout (`init_process_group(timeout=...)`), and the launcher has a deadline of its own: when a rank
raises, dies or hangs, the others are stopped and killed, and the error says which rank and why.
Results travel back as bytes (`torch.save`), so no shared-memory tensor outlives the process that made it.
"""

from __future__ import annotations

import datetime
import io
import queue as queue_lib
import socket
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

try:
    import psutil
except ImportError:  # optional: only the memory sampler needs it (Jupyter's kernel brings it)
    psutil = None

COLLECTIVE_TIMEOUT_S = 30.0  # any one collective (and joining the group) gives up after this long
HOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def check_port(port: int) -> int:
    """`port` if it is free on 127.0.0.1, else a RuntimeError saying what to do."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError as e:
            raise RuntimeError(f"port {port} on {HOST} is taken ({e.strerror}): another process group or server "
                               f"uses it. Leave port=None to pick a free port, or choose another one.") from None
    return port


def pack(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def unpack(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=True)


@dataclass
class RankContext:
    """What a job sees: its rank, the world size, and `post` to send a small message to the parent live."""

    rank: int
    world_size: int
    queue: Any

    def post(self, message: Any) -> None:
        self.queue.put(("message", self.rank, pack(message)))


class MemorySampler:
    """Peak memory of this process and its ranks together, sampled while `launch` waits (pass as `on_poll`).

    Counts each process's proportional set size (PSS: pages shared between processes, such as torch's
    libraries, split between them), so the sum is what the processes take together. Needs psutil (on Linux);
    elsewhere `peak_mb` stays None.
    """

    def __init__(self) -> None:
        self.peak_mb: float | None = None

    def __call__(self, pids: list[int]) -> None:
        if psutil is None:
            return
        total = 0.0
        for pid in [None, *pids]:
            try:
                info = psutil.Process(pid).memory_full_info()
            except (psutil.Error, OSError):
                continue
            total += getattr(info, "pss", info.rss) / 2**20
        self.peak_mb = max(self.peak_mb or 0.0, total)


def init_group(rank: int, world_size: int, port: int, timeout_s: float = COLLECTIVE_TIMEOUT_S,
               backend: str = "gloo") -> None:
    dist.init_process_group(backend, init_method=f"tcp://{HOST}:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))


def _entry(rank: int, job: Callable, world_size: int, port: int, timeout_s: float, queue, args: tuple) -> None:
    torch.set_num_threads(1)  # W processes share the machine's cores
    try:
        init_group(rank, world_size, port, timeout_s)
        result = job(RankContext(rank, world_size, queue), *args)
        queue.put(("result", rank, pack(result)))
    except BaseException:
        queue.put(("error", rank, traceback.format_exc()))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


KNOCK_ON = ("Connection closed by peer", "Connection reset by peer", "Timed out", "timed out")


def _failure(world_size: int, rank: int, what: str, errors: dict[int, str]) -> RuntimeError:
    """The error to raise: about the rank that failed first in substance, not one that only lost its peer."""
    causes = [r for r, text in sorted(errors.items()) if not any(k in text for k in KNOCK_ON)]
    if rank in errors and any(k in errors[rank] for k in KNOCK_ON) and causes:
        rank, what = causes[0], "raised an error"
    tail = errors.get(rank, "").strip().splitlines()
    detail = f"\n--- rank {rank}'s traceback (last lines) ---\n" + "\n".join(tail[-6:]) if tail else ""
    return RuntimeError(f"rank {rank} of {world_size} {what}; the other ranks were stopped and no process is left "
                        f"running.{detail}")


def launch(job: Callable, world_size: int, *args, port: int | None = None, deadline_s: float = 120.0,
           timeout_s: float = COLLECTIVE_TIMEOUT_S, on_message: Callable | None = None,
           on_poll: Callable | None = None) -> list[Any]:
    """Run `job(ctx, *args)` on `world_size` spawned processes in one gloo group; returns the results by rank.

    `job` must be importable (defined in a module, not in a notebook cell): spawned processes import it by name.
    `on_message(rank, message)` receives what jobs `ctx.post`, while they run (for live views); `on_poll(pids)` is
    called about every 50 ms with the ranks' process ids (e.g. a `MemorySampler`).
    """
    port = free_port() if port is None else check_port(port)
    queue = mp.get_context("spawn").Queue()
    procs = mp.start_processes(_entry, args=(job, world_size, port, timeout_s, queue, args), nprocs=world_size,
                               join=False, start_method="spawn")
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}

    def drain(wait: float) -> None:
        try:
            while True:
                kind, rank, data = queue.get(timeout=wait)
                wait = 0.0
                if kind == "error":
                    errors[rank] = data
                elif kind == "result":
                    results[rank] = unpack(data)
                elif on_message is not None:
                    on_message(rank, unpack(data))
        except queue_lib.Empty:
            pass

    start = time.monotonic()
    try:
        while True:
            drain(0.05)
            if on_poll is not None:
                on_poll([p.pid for p in procs.processes])
            try:
                done = procs.join(timeout=0.01)
            except mp.ProcessRaisedException as e:
                drain(0.5)
                raise _failure(world_size, e.error_index, "raised an error", errors) from None
            except mp.ProcessExitedException as e:
                drain(0.5)
                raise _failure(world_size, e.error_index, f"died (exit code {e.exit_code})", errors) from None
            if done:
                break
            if time.monotonic() - start > deadline_s:
                raise TimeoutError(f"the {world_size} processes did not finish within {deadline_s:.0f} s; they were "
                                   f"killed. A rank waiting forever in a collective is the usual cause.")
        while len(results) < world_size and time.monotonic() - start < deadline_s:
            drain(0.1)
    finally:
        for p in procs.processes:
            if p.is_alive():
                p.kill()
            p.join(5)
        queue.close()
    missing = sorted(set(range(world_size)) - set(results))
    if missing:
        raise RuntimeError(f"ranks {missing} finished without sending a result")
    return [results[r] for r in range(world_size)]
