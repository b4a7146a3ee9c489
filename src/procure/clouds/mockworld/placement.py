"""The fleet's scheduler: a FIFO queue of jobs placed on nodes' free GPUs (one job per GPU, a
job's GPUs on one node), driven event by event on simulated time. It yields what production
means by utilisation, saturation and queueing: busy GPUs, queued jobs and their wait times."""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from procure.clouds.mockworld.workload import JobSpec

MAX_LIVE_JOBS = 200_000  # jobs not yet finished, across every workload submitted


@dataclass
class Job:
    id: int
    spec: JobSpec
    submitted_at: float  # absolute simulated time
    queued_at: float = 0.0  # when it (re-)entered the queue
    started_at: float | None = None
    ends_at: float | None = None
    node: str | None = None
    gpus: tuple[int, ...] = ()
    restarts: int = 0
    done_s: float = 0.0  # work kept from earlier placements (checkpointed before a node died)
    waited_s: float = 0.0  # time queued before earlier placements (a moved job waits again)


@dataclass
class Node:
    id: str
    gpus: list[int | None]  # job id per GPU, None when free
    stalled: bool = False  # an unhealthy node: its jobs make no progress, nothing new lands


@dataclass
class Cluster:
    nodes: dict[str, Node] = field(default_factory=dict)
    arrivals: list[tuple[float, int]] = field(default_factory=list)  # heap of (at, job id)
    queue: deque[int] = field(default_factory=deque)
    jobs: dict[int, Job] = field(default_factory=dict)  # not yet finished
    completed: int = 0
    restarts: int = 0
    # Each placed job's whole time queued, all its placements together: one figure per job, so
    # a job moved or restarted counts once, with every wait it had.
    waited: dict[int, float] = field(default_factory=dict)
    busy_gpu_s: float = 0.0
    total_gpu_s: float = 0.0
    now: float = 0.0
    # A job whose node dies keeps the work up to its last checkpoint (0: none, it starts over).
    checkpoint_s: float = 0.0
    # Off: strict FIFO. On: a queued job that fits starts even while the head waits (as
    # Kubernetes' scheduler or Slurm's backfill place whatever fits).
    backfill: bool = False
    lost_gpu_s: float = 0.0  # GPU-seconds of work lost to nodes that died
    _ids: Any = field(default_factory=lambda: itertools.count(1))

    def submit(self, specs: list[JobSpec], offset: float) -> int:
        """Add a workload whose time 0 is `offset` (absolute simulated seconds)."""
        if len(self.jobs) + len(specs) > MAX_LIVE_JOBS:
            raise ValueError(f"more than {MAX_LIVE_JOBS:,} unfinished jobs")
        for spec in specs:
            job = Job(next(self._ids), spec, offset + spec.submit_s)
            self.jobs[job.id] = job
            heapq.heappush(self.arrivals, (job.submitted_at, job.id))
        return len(specs)

    def add_node(self, node_id: str, gpus: int, at: float) -> None:
        self.advance(at)
        self.nodes[node_id] = Node(node_id, [None] * gpus)
        self._place()

    def remove_node(self, node_id: str, at: float) -> None:
        """The node is gone (terminated, preempted): its jobs go back to the queue's head, in
        their order, and start over (their work on it is lost)."""
        self.advance(at)
        node = self.nodes.pop(node_id, None)
        if node is None:
            return
        lost = sorted({j for j in node.gpus if j is not None}, key=lambda j: self.jobs[j].queued_at)
        for job_id in reversed(lost):
            job = self.jobs[job_id]
            ran = at - (job.started_at if job.started_at is not None else at)
            kept = (ran // self.checkpoint_s) * self.checkpoint_s if self.checkpoint_s > 0 else 0.0
            self.lost_gpu_s += (ran - kept) * job.spec.gpus
            job.done_s += kept
            job.started_at = job.ends_at = job.node = None
            job.gpus = ()
            job.queued_at = at
            job.restarts += 1
            self.restarts += 1
            self.queue.appendleft(job_id)
        self._place()

    def stall_node(self, node_id: str, at: float) -> None:
        self.advance(at)
        node = self.nodes.get(node_id)
        if node is not None:
            node.stalled = True

    def job_sizes(self, node_id: str) -> tuple[int, ...]:
        """The GPUs each job placed on the node uses."""
        node = self.nodes.get(node_id)
        if node is None:
            return ()
        placed = dict.fromkeys(j for j in node.gpus if j is not None)
        return tuple(self.jobs[j].spec.gpus for j in placed if j in self.jobs)

    def busy(self, node_id: str) -> list[bool]:
        """Per GPU of the node: does a job run on it now (a stalled job counts as placed but
        not running)."""
        node = self.nodes.get(node_id)
        if node is None:
            return []
        return [j is not None and not node.stalled for j in node.gpus]

    def placed(self, node_id: str) -> list[bool]:
        node = self.nodes.get(node_id)
        return [] if node is None else [j is not None for j in node.gpus]

    def advance(self, until: float) -> None:
        """Play every arrival and completion up to `until`, each at its own time."""
        while True:
            arrival = self.arrivals[0][0] if self.arrivals else None
            finish = self._next_finish()
            times = [t for t in (arrival, finish) if t is not None and t <= until]
            if not times:
                break
            at = min(times)
            self._account(at)
            if finish is not None and finish == at:
                self._finish(at)
            else:
                _, job_id = heapq.heappop(self.arrivals)
                self.jobs[job_id].queued_at = at
                self.queue.append(job_id)
            self._place()
        self._account(max(until, self.now))

    def _next_finish(self) -> float | None:
        ends = [
            self.jobs[j].ends_at
            for n in self.nodes.values()
            if not n.stalled
            for j in n.gpus
            if j is not None
        ]
        return min((e for e in ends if e is not None), default=None)

    def _finish(self, at: float) -> None:
        for node in self.nodes.values():
            if node.stalled:
                continue
            for index, job_id in enumerate(node.gpus):
                if job_id is not None and self.jobs[job_id].ends_at == at:
                    node.gpus[index] = None
                    if job_id in self.jobs and all(j != job_id for j in node.gpus):
                        del self.jobs[job_id]
                        self.completed += 1

    def _place(self) -> None:
        # Strict FIFO: the head waits until some node has enough free GPUs; nothing overtakes.
        # With backfill, each queued job in order takes a slot that fits it, if one does.
        if self.backfill:
            if not self.queue or not any(n.gpus.count(None) for n in self.nodes.values()):
                return
            waiting: deque[int] = deque()
            for job_id in self.queue:
                if not self._start(self.jobs[job_id]):
                    waiting.append(job_id)
            self.queue = waiting
            return
        while self.queue:
            if not self._start(self.jobs[self.queue[0]]):
                return
            self.queue.popleft()

    def _start(self, job: Job) -> bool:
        node = self._fit(job.spec.gpus)
        if node is None:
            return False
        free = [i for i, j in enumerate(node.gpus) if j is None][: job.spec.gpus]
        for i in free:
            node.gpus[i] = job.id
        job.node, job.gpus = node.id, tuple(free)
        job.started_at = self.now
        job.ends_at = self.now + max(0.0, job.spec.duration_s - job.done_s)
        job.waited_s += self.now - job.queued_at
        self.waited[job.id] = job.waited_s
        return True

    def _fit(self, gpus: int) -> Node | None:
        candidates = [
            n for n in self.nodes.values() if not n.stalled and n.gpus.count(None) >= gpus
        ]
        # Fill the fullest node first, so idle nodes stay idle (and can be let go).
        return min(candidates, key=lambda n: (n.gpus.count(None), n.id), default=None)

    def _account(self, at: float) -> None:
        if at <= self.now:
            return
        span = at - self.now
        for node in self.nodes.values():
            self.total_gpu_s += span * len(node.gpus)
            if not node.stalled:
                self.busy_gpu_s += span * sum(1 for j in node.gpus if j is not None)
        self.now = at

    def wait_times(self) -> list[float]:
        """Each job's time queued so far, sorted: one figure per job that was ever placed or is
        queued now (a queued one's as a lower bound: it must not vanish from p95)."""
        queued = {j: self.jobs[j].waited_s + self.now - self.jobs[j].queued_at for j in self.queue}
        return sorted((self.waited | queued).values())

    def figures(self) -> dict[str, Any]:
        """The queue as a benchmark reads it. Wait percentiles count each job once: its whole
        time queued, every placement together (see `wait_times`)."""
        queued_waits = [self.now - self.jobs[j].queued_at for j in self.queue]
        waits = self.wait_times()
        total = sum(len(n.gpus) for n in self.nodes.values())
        busy = sum(sum(self.busy(n)) for n in self.nodes)
        return {
            "now_s": round(self.now, 3),
            "pending": len(self.arrivals),
            "queued": len(self.queue),
            "queued_gpus": sum(self.jobs[j].spec.gpus for j in self.queue),
            "running": sum(1 for j in self.jobs.values() if j.node is not None),
            "completed": self.completed,
            "restarts": self.restarts,
            "gpus_total": total,
            "gpus_busy": busy,
            "utilisation": round(busy / total, 4) if total else 0.0,
            "waits_counted": len(waits),
            "wait_p50_s": round(percentile(waits, 0.50), 3),
            "wait_p95_s": round(percentile(waits, 0.95), 3),
            "wait_max_s": round(waits[-1], 3) if waits else 0.0,
            "oldest_queued_s": round(max(queued_waits, default=0.0), 3),
            "busy_gpu_hours": round(self.busy_gpu_s / 3600, 4),
            "idle_gpu_hours": round((self.total_gpu_s - self.busy_gpu_s) / 3600, 4),
        }


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (0 for none)."""
    if not sorted_values:
        return 0.0
    rank = max(1, min(len(sorted_values), -(-len(sorted_values) * q // 1)))
    return sorted_values[int(rank) - 1]
