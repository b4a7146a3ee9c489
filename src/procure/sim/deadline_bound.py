"""A computed lower bound on deadline misses: the least chance that ANY policy without foresight
misses a job's deadline under its hard budget, in the simulated market of `market.py`.

The policy may know everything but the failure times: the vendors' true prices, hazards and
start-ups, the payment fee, the checkpoints, the deadline and the budget. A job misses when it
is not finished by its deadline, out of budget or not (as `engine.simulate` counts it). The
bound is the exact optimum of a *relaxed* model, computed by dynamic programming; every
relaxation only helps the policy, so no policy the simulator can play misses less often.

The relaxed model (each step is in the policy's favour):

- Capacity only at the first start, and no horizon. At a job's first start every vendor has
  capacity for the first quarter hour with its `1 - refuse_rate`, independently, as the
  simulator draws it (`JobCase.has_capacity`); the policy is told which do at once (a real one
  learns it from a refusal, which costs it time and a cool-down), and one without capacity
  cannot start before the next quarter hour. Every later start finds capacity (a policy in
  the simulator may know some vendors' capacity by then, so nothing more is assumed of it).
  The one cool-down kept is the one every policy meets in the simulator after a failure (the
  guard refuses a vendor cooling down): the vendor that just failed cannot be started again
  for `market.cooldown_hours` (rounded down to the grid); an earlier vendor's cool-down is
  forgotten once another runs, and a failure in the free part of a start-up (below) cools
  nothing.
- Money is one fee per start plus price x the hours of work actually done (failed work
  included), never more than the simulator charges (it bills whole slices ahead, with a fee on
  every slice). Start-up time is not billed, as in the simulator.
- The budget is a hard limit on every path, as in the simulator (a quote over what is left is
  refused), not on average. The Lagrangian relaxation (E[cost] <= budget, weak duality over a
  multiplier) would be simpler but bounds almost nothing here: budgets are 1.5 x the money-only
  optimum, about $1.65 per hour of work, so the steady vendors ($1.90, $2.40) cannot be paid
  for a whole job, yet on average they can be paid for after a rare failure; a hard budget
  keeps that rescue from being free.
- Failures are Poisson at each vendor's hazard from the moment it is paid (start-up included),
  independent of everything the policy saw (memoryless): so the state is the checkpoint `m`
  reached, the time, the money left and the vendor now running (if one is), and no policy that
  remembers more can do better. Waiting never helps (time only runs against the deadline), and
  stopping a job between checkpoints is beaten by stopping at the checkpoint before (same
  state, earlier, less paid); restarting the vendor that runs is beaten by running on. So at
  each checkpoint the policy runs on or starts a vendor, and that is the whole action set
  (after a failure: start another vendor, or wait out the failed one's cool-down and start it).
- Time is kept as *lateness*, the hours since the start less the work at the checkpoint
  reached (on time at the end iff lateness <= deadline - hours; it never decreases), on a grid,
  always rounded down. Money is kept as what is left beyond the cheapest possible completion
  (budget left - the cheapest price x the work left; below zero no completion is affordable),
  on a grid chosen so that a checkpoint interval at any vendor costs a whole number of steps
  (prices here differ by multiples of $0.05/h), always rounded up (costs rounded down).
  Float rounding is covered by 3.6 ms of slack and a micro-dollar of budget given on top.
- A failure is placed at the start of the piece of exposure it falls in (pieces of two time
  steps or more): less time lost, less money paid. A failure within the first part of a
  start-up, as long as the shortest start-up (3 minutes here), costs no time and no money at
  all, which keeps the recursion free of loops across time steps (a start-up failure here is
  at most 3.4 % likely, and a later one still costs its time and fee).

The value V (the least chance of a miss) at each (checkpoint, lateness, money, vendor running
or cooling down)
solves, backwards over checkpoints and downwards over lateness in blocks no taller than the
shortest start-up (a start lands no nearer), V = min over actions of the expected V of where
the action leads. A free start-up failure is a self-loop, solved in closed form (the minimum of
affine maps with slopes below one has, as fixed point, the least of their fixed points). The
bound for a job is V at its start; summed over jobs it is a lower bound on the expected number
of misses of any policy without foresight. Tests check it against hand values and against
policies played in the simulator.

Effort goes where the bound can be large. An upper bound on the relaxed optimum is cheap
(`single_vendor_miss`: one vendor restarted after each failure misses only if it fails `k`
times in the time `k - 1` failures need, a Poisson tail). Jobs where it is under `SKIP_BELOW`
are not solved and count 0 (still a lower bound; `MissBound.skipped_at_most` says what they
could add); jobs where it is `FINE_ABOVE` or more (short jobs, little slack: nearly all of the
bound) are solved on the fine grids (within about 4 % of grids three times as fine there),
the rest on coarse ones.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from procure.agent.costmodel import intervals
from procure.sim.market import CAPACITY_PERIOD_HOURS, JobCase, Market, VendorSpec


@dataclass(frozen=True)
class Resolution:
    """The grids: finer is tighter and slower; any of them gives a lower bound."""

    time_step: float  # hours per lateness step, at the finest
    piece_hours: float  # a failure is placed at the start of the piece it falls in (>= 2 steps)
    max_rows: int  # the lateness grid is coarsened past this many steps (large slack)
    max_columns: int  # the money grid likewise


# Jobs whose bound can be large (a single-vendor policy misses them with at least `FINE_ABOVE`:
# short jobs, little slack) get the fine grids; the rest, which add little, coarse ones.
FINE = Resolution(time_step=0.004, piece_hours=0.008, max_rows=96, max_columns=384)
COARSE = Resolution(time_step=0.0125, piece_hours=0.025, max_rows=48, max_columns=96)
FINE_ABOVE = 0.01
SKIP_BELOW = 2e-3  # jobs whose relaxed optimum is provably below this are not solved
TOL = 1e-9  # float rounding, in grid steps: a ratio within this of a whole number is whole
EPS_DEADLINE = 1e-9  # the simulator's tolerance on a finish time (`engine.EPS`)
# Given to the policy on top, so that float rounding in the grids can only help it.
SPARE_HOURS = 1e-6
SPARE_MICROS = 1.0
FLOAT = np.float64


@dataclass(frozen=True)
class JobBound:
    job: int
    hours: float
    miss: float  # a lower bound on P(miss) for any policy without foresight
    solved: bool  # False: the job was skipped (miss = 0) because `cap` is below the threshold
    cap: float  # an upper bound on the relaxed model's optimum (a single-vendor policy)
    first_vendor: str | None  # the bound's optimal first vendor (None when not solved)
    path: tuple[str, ...] = ()  # the optimal vendor per checkpoint interval if nothing fails


@dataclass(frozen=True)
class _Pieces:
    """Failures during one stretch of exposure, each placed at the start of its piece: chance,
    lateness steps added and money steps paid."""

    p: tuple[float, ...]
    row: tuple[int, ...]
    col: tuple[int, ...]


@dataclass(frozen=True)
class _Vendor:
    """One vendor's moves over one interval of `w` hours of work."""

    loop: float  # chance of a start-up failure that costs nothing (the fixed-point term)
    startup: _Pieces  # the start-up failures that cost time (and the fee)
    alive: float  # P(alive when the work begins), from the payment
    up_row: int  # lateness steps of the start-up
    fee_col: int  # money steps of the fee
    work: _Pieces  # failures during the work, from its beginning
    survive: float  # P(no failure during the work)
    run_col: int  # money steps of the interval beyond the cheapest price


@dataclass(frozen=True)
class _Grid:
    dt: float  # hours per lateness step
    db: float  # micro-USD per money step
    piece: float  # hours per failure piece
    rows: int  # lateness steps 0..rows-1 are on time
    cols: int  # money steps 0..cols-1 (the start is the last)
    block: int  # lateness steps solved together: no start lands less far


def _floor(x: float) -> int:
    return math.floor(x + TOL)


def _pieces(v: VendorSpec, hours: float, grid: _Grid, *, startup: bool, fee: float) -> _Pieces:
    """Failures of `v` in the first `hours` of its start-up (they cost the fee; those landing
    within a block are left out: the caller makes them free) or of its work (they cost the
    price of the work done)."""
    fixed = grid.block if startup else 0
    n = max(1, math.ceil(hours / grid.piece - TOL))
    edges = [min(hours, k * grid.piece) for k in range(n + 1)]
    ps, rows, cols = [], [], []
    for a, b in itertools.pairwise(edges):
        p = math.exp(-v.hazard * a) - math.exp(-v.hazard * b)
        if p > 0.0 and _floor(a / grid.dt) >= fixed:
            ps.append(p)
            rows.append(_floor(a / grid.dt))
            cols.append(_floor((fee if startup else v.price_per_hour * a) / grid.db))
    return _Pieces(tuple(ps), tuple(rows), tuple(cols))


def _vendor(v: VendorSpec, fee: float, cheapest: float, w: float, grid: _Grid) -> _Vendor:
    up = v.startup_hours
    # Start-up failures landing within a block are made free (no time, no fee): a loop.
    startup = _pieces(v, up, grid, startup=True, fee=fee)
    alive = math.exp(-v.hazard * up)
    return _Vendor(
        loop=1.0 - alive - sum(startup.p),
        startup=startup,
        alive=alive,
        up_row=_floor(up / grid.dt),
        fee_col=_floor(fee / grid.db),
        work=_pieces(v, w, grid, startup=False, fee=fee),
        survive=math.exp(-v.hazard * w),
        run_col=_floor((v.price_per_hour - cheapest) * w / grid.db),
    )


def _make_grid(
    market: Market, work: list[float], slack: float, spare: float, res: Resolution
) -> _Grid:
    startup = min(v.startup_hours for v in market.vendors)
    if startup <= 0:
        raise ValueError("the bound needs every vendor's start-up to take time")
    # No start lands within the block it starts from: steps no longer than the shortest start-up.
    dt = min(max(res.time_step, slack / (res.max_rows - 1)), startup)
    # Every price difference is a multiple of g, so with steps of g x (a whole interval) / k
    # an interval run on any vendor costs a whole number of steps: no rounding accumulates.
    prices = [v.price_per_hour for v in market.vendors]
    cheapest = min(prices)
    g = 0
    for p in prices:
        g = math.gcd(g, p - cheapest)
    g = g or cheapest
    db = g * max(work)
    if spare / db > res.max_columns:  # coarser: costs are then rounded down, each on its own
        db *= math.ceil(spare / db / res.max_columns)
    else:  # finer, as long as the grid stays within its size
        db /= max(1, math.floor(res.max_columns / max(spare / db, 1.0)))
    return _Grid(
        dt=dt,
        db=db,
        piece=max(res.piece_hours, 2 * dt),
        rows=_floor(slack / dt) + 1,
        cols=math.ceil(spare / db - TOL) + 1,
        block=max(1, _floor(startup / dt)),
    )


class _Padded:
    """A table over (lateness, money) with `outside` around it: past the deadline, or with
    less money than the cheapest completion (for a value table: a certain miss, 1)."""

    def __init__(self, grid: _Grid, pad_rows: int, pad_cols: int, outside: float = 1.0) -> None:
        self.rows, self.cols, self.pc, self.outside = grid.rows, grid.cols, pad_cols, outside
        self.a = np.full((grid.rows + pad_rows, pad_cols + grid.cols), outside, dtype=FLOAT)

    def set(self, values: np.ndarray, r0: int = 0) -> None:
        self.a[r0 : r0 + values.shape[0], self.pc : self.pc + self.cols] = values

    def view(self, r0: int, r1: int, row: int = 0, col: int = 0) -> np.ndarray:
        """Values at lateness r + row, money c - col, for r in [r0, r1) and every c."""
        c0 = self.pc - col
        return self.a[r0 + row : r1 + row, c0 : c0 + self.cols]


def _expect(pieces: _Pieces, table: _Padded, r0: int, r1: int) -> np.ndarray:
    """The expected value of `table` after a failure among `pieces`, for rows [r0, r1)."""
    out = np.zeros((r1 - r0, table.cols), dtype=FLOAT)
    beyond = 0.0  # the pieces that land past the deadline from every row: a constant
    for p, row, col in zip(pieces.p, pieces.row, pieces.col, strict=True):
        if r0 + row >= table.rows:
            beyond += p
        else:
            out += FLOAT(p) * table.view(r0, r1, row, col)
    if beyond:
        out += FLOAT(beyond * table.outside)
    return out


def solve(
    market: Market,
    hours: float,
    checkpoint_every: float,
    deadline_hours: float,
    budget: float,
    *,
    resolution: Resolution = FINE,
    explain: bool = False,
    progress: float = 0.0,
    now: float = 0.0,
    refusals: bool = False,
) -> tuple[float, str | None, tuple[str, ...]]:
    """(the least P(miss) in the relaxed model, its optimal first vendor, its vendor per
    interval if nothing fails (with `explain`)). Money in micro-USD, time in hours; from a run
    at `progress` (a checkpoint) at hour `now` with `budget` left, no vendor running. With
    `refusals`, the first start meets the market's capacity (`_with_refusals`: a job just
    submitted, nothing tried yet); the first vendor and the path are then those if every
    vendor has capacity."""
    work = intervals(hours, checkpoint_every, progress)
    left = sum(work)
    vendors = market.vendors
    fee = float(market.payment_fee)
    cheapest = min(v.price_per_hour for v in vendors)
    slack = deadline_hours + EPS_DEADLINE + SPARE_HOURS - now - left
    spare = budget + SPARE_MICROS - cheapest * left
    if slack < 0 or spare < 0:
        return 1.0, None, ()
    grid = _make_grid(market, work, slack, spare, resolution)
    rows, cols = grid.rows, grid.cols
    # The failed vendor's cool-down, in whole steps (none if shorter than a block: then every
    # failure is followed at once by any vendor, which only helps the policy).
    cool = _floor(market.cooldown_hours / grid.dt)
    cool = cool if cool >= grid.block else 0
    pad_rows = _floor((max(v.startup_hours for v in vendors) + max(work)) / grid.dt) + 2
    pad_rows = max(pad_rows, cool + 2)
    most = fee + max(v.price_per_hour for v in vendors) * (max(work) + grid.piece)
    pad_cols = _floor(most / grid.db) + 2
    shapes: dict[float, list[_Vendor]] = {}
    # running[i]: the least chance of a miss at the next checkpoint with vendor i running.
    running = [_Padded(grid, pad_rows, pad_cols) for _ in vendors]
    for t in running:
        t.set(np.zeros((rows, cols), dtype=FLOAT))  # the end reached on time, within budget
    choices: list[tuple[np.ndarray, np.ndarray]] = []
    idle = running[0]
    start_pick = np.zeros((rows, cols), dtype=np.int8)
    for m in range(len(work) - 1, -1, -1):
        w = work[m]
        if w not in shapes:
            shapes[w] = [_vendor(v, fee, cheapest, w, grid) for v in vendors]
        vs = shapes[w]
        idle = _Padded(grid, pad_rows, pad_cols)  # no vendor running at checkpoint m
        # starts[i]: idle, then start vendor i; cooled[i]: idle with vendor i cooling down
        # after its failure (start another at once, or wait it out and start it again).
        starts = [_Padded(grid, pad_rows, pad_cols) for _ in vs]
        cooled = [_Padded(grid, pad_rows, pad_cols) for _ in vs] if cool else [idle] * len(vs)
        # lost[i]: the chance of a miss after a failure of vendor i during the work of this
        # interval (outside the grid: every failure misses).
        lost = [_Padded(grid, pad_rows, pad_cols, 1.0 - s.survive) for s in vs]
        start_pick = np.zeros((rows, cols), dtype=np.int8)
        for r1 in range(rows, 0, -grid.block):
            r0 = max(0, r1 - grid.block)
            block = np.empty((len(vs), r1 - r0, cols), dtype=FLOAT)
            for i, s in enumerate(vs):
                # Everything a start leads to lies at least a block later: already solved.
                value = (
                    s.alive * s.survive * running[i].view(r0, r1, s.up_row, s.fee_col + s.run_col)
                )
                value += _expect(s.startup, cooled[i], r0, r1)
                value += s.alive * lost[i].view(r0, r1, s.up_row, s.fee_col)
                value /= 1.0 - s.loop
                block[i] = np.minimum(value, 1.0)
                starts[i].set(block[i], r0)
            pick = np.argmin(block, axis=0).astype(np.int8)
            start_pick[r0:r1] = pick
            ranked = np.sort(block, axis=0)
            idle.set(ranked[0], r0)
            if cool:
                for i in range(len(vs)):
                    others = np.where(pick == i, ranked[1], ranked[0]) if len(vs) > 1 else 1.0
                    again = starts[i].view(r0, r1, cool, 0)  # its cool-down waited out
                    cooled[i].set(np.minimum(others, again), r0)
            for i, s in enumerate(vs):
                lost[i].set(_expect(s.work, cooled[i], r0, r1), r0)
        start_value = idle.view(0, rows)
        nxt, stay = [], []
        for i, s in enumerate(vs):
            cont = s.survive * running[i].view(0, rows, 0, s.run_col) + lost[i].view(0, rows)
            table = _Padded(grid, pad_rows, pad_cols)
            table.set(np.minimum(start_value, cont))
            nxt.append(table)
            if explain:
                stay.append(cont < start_value)
        running = nxt
        if explain:
            choices.append((start_pick, np.array(stay)))
    value = float(idle.view(0, 1)[0, -1])
    if refusals:
        value = _with_refusals(market, grid, [t.view(0, rows)[:, -1] for t in starts])
    first = vendors[int(start_pick[0, -1])].vendor_id
    return value, first, _path(market, work, grid, choices[::-1]) if explain else ()


def _with_refusals(market: Market, grid: _Grid, start_at: list[np.ndarray]) -> float:
    """The least chance of a miss from a job's first start when vendors may lack capacity
    (`start_at[i][r]`: start vendor i at lateness step r, all the money left).

    Capacity is drawn per vendor and quarter hour (`market.CAPACITY_PERIOD_HOURS`), with the
    vendor's `refuse_rate`, independent of the failures. The policy is told at once which
    vendors have capacity in the first quarter hour (a real one learns it only from a refusal,
    which costs time); one without it cannot start before the next quarter hour, which it
    reaches at lateness at least that long. Every later start is taken to find capacity."""
    late = _floor(CAPACITY_PERIOD_HOURS / grid.dt)
    waited = min((float(s[late]) for s in start_at if late < len(s)), default=1.0)
    at_once = sorted(
        (min(float(s[0]), waited), v.refuse_rate)
        for s, v in zip(start_at, market.vendors, strict=True)
    )
    value, none_yet = 0.0, 1.0  # none_yet: P(every vendor ranked better has no capacity)
    for v, refused in at_once:
        value += none_yet * (1.0 - refused) * v
        none_yet *= refused
    return value + none_yet * waited


def _path(
    market: Market, work: list[float], grid: _Grid, choices: list[tuple[np.ndarray, np.ndarray]]
) -> tuple[str, ...]:
    """The optimal vendor for each interval along the path on which nothing fails."""
    vendors = market.vendors
    cheapest = min(v.price_per_hour for v in vendors)
    row, col, current = 0, grid.cols - 1, -1
    out = []
    for m, (start_pick, stay) in enumerate(choices):
        if row >= grid.rows or col < 0:
            break
        run = (vendors[current].price_per_hour - cheapest) * work[m] if current >= 0 else 0.0
        if current >= 0 and stay[current][row, col]:
            col -= _floor(run / grid.db)
        else:
            current = int(start_pick[row, col])
            v = vendors[current]
            row += _floor(v.startup_hours / grid.dt)
            col -= _floor(market.payment_fee / grid.db)
            col -= _floor((v.price_per_hour - cheapest) * work[m] / grid.db)
        out.append(vendors[current].vendor_id)
    return tuple(out)


def single_vendor_miss(
    market: Market,
    hours: float,
    checkpoint_every: float,
    deadline_hours: float,
    budget: float,
    *,
    refusals: bool = False,
) -> float:
    """An upper bound on the relaxed model's optimum: the least, over vendors, of the chance
    that a policy running one vendor (restarting it after each failure, once its cool-down is
    over) misses. With `j` failures it ends within (j + 1) start-ups + the work + j intervals
    lost + j cool-downs, and pays at most (j + 1) fees + the price x (the work + j intervals);
    if `k` failures would break the deadline or the budget, a miss needs `k` failures before
    the end that `k - 1` allow, so its chance is at most P(Poisson(hazard x that end) >= k).
    With `refusals` (the model of `solve(refusals=True)`), a vendor without capacity at the
    first start is started a quarter hour later: the same tail with that much less time."""
    longest = max(intervals(hours, checkpoint_every, 0.0))
    best = 1.0
    for v in market.vendors:
        miss = _one_vendor_miss(market, v, hours, longest, deadline_hours, budget)
        if refusals and v.refuse_rate > 0:
            late = deadline_hours - CAPACITY_PERIOD_HOURS
            waited = _one_vendor_miss(market, v, hours, longest, late, budget)
            miss = (1.0 - v.refuse_rate) * miss + v.refuse_rate * waited
        best = min(best, miss)
    return best


def _one_vendor_miss(
    market: Market, v: VendorSpec, hours: float, longest: float, deadline: float, budget: float
) -> float:
    """`single_vendor_miss` for the one vendor `v` (`longest`: the longest interval)."""
    k = 0
    while True:
        ends = (k + 1) * v.startup_hours + hours + k * (longest + market.cooldown_hours)
        paid = (k + 1) * market.payment_fee + v.price_per_hour * (hours + k * longest)
        if ends > deadline or paid > budget:
            break
        k += 1
    if k == 0:
        return 1.0
    # the end with k - 1 failures
    ends = k * v.startup_hours + hours + (k - 1) * (longest + market.cooldown_hours)
    return _poisson_tail(v.hazard * ends, k)


def _poisson_tail(mean: float, k: int) -> float:
    """P(Poisson(mean) >= k), summed from the tail (no cancellation when it is tiny)."""
    term = math.exp(-mean - math.lgamma(k + 1) + k * math.log(mean)) if mean > 0 else 0.0
    total, i = 0.0, k
    while term > 1e-300 and (i < k + 50 or term > total * 1e-17):
        total += term
        i += 1
        term *= mean / i
    return min(1.0, total * (1 + 1e-9))


def job_bound(
    market: Market,
    case: JobCase,
    budget: int,
    *,
    skip_below: float = SKIP_BELOW,
    explain: bool = False,
    resolution: Resolution | None = None,
) -> JobBound:
    """The lower bound on one job's chance to miss its deadline (0 without a deadline); by
    default on the fine grids where a single-vendor policy misses it with `FINE_ABOVE` or
    more, on the coarse ones elsewhere."""
    if case.deadline_hours is None:
        return JobBound(case.index, case.hours, 0.0, False, 0.0, None)
    args = (market, case.hours, case.checkpoint_every, case.deadline_hours, float(budget))
    cap = single_vendor_miss(*args)
    if cap < skip_below:
        # Skipped on the cap without refusals (the same jobs solved as before); the cap it
        # reports is the one with them, which bounds what the job could add.
        return JobBound(
            case.index, case.hours, 0.0, False, single_vendor_miss(*args, refusals=True), None
        )
    if resolution is None:
        resolution = FINE if cap >= FINE_ABOVE else COARSE
    miss, first, path = solve(*args, resolution=resolution, explain=explain, refusals=True)
    return JobBound(case.index, case.hours, miss, True, cap, first, path)


@dataclass(frozen=True)
class MissBound:
    """The bound over a scenario's jobs: a lower bound on the expected number of deadline
    misses of any policy without foresight."""

    scenario: str
    jobs: int  # jobs with a deadline
    expected: float  # the sum of the per-job bounds
    solved: int  # jobs whose programme was solved (the others' bound is taken as 0)
    skipped_at_most: float  # what the skipped jobs' bounds could add, at most
    seconds: float
    per_job: tuple[JobBound, ...]

    @property
    def none_missed_at_most(self) -> float:
        """An upper bound on the chance that a policy without foresight misses no deadline:
        each job's failures are its own, so whatever happened before, a job misses with at
        least its bound, and all are on time with at most the product of (1 - bound)."""
        return math.prod(1.0 - b.miss for b in self.per_job)

    def of(self, job: int) -> JobBound | None:
        return next((b for b in self.per_job if b.job == job), None)


def scenario_bound(
    market: Market,
    cases: Sequence[JobCase],
    budgets: Sequence[int],
    *,
    skip_below: float = SKIP_BELOW,
    explain: Sequence[int] = (),
) -> MissBound:
    """The bound for every job of a scenario (`explain`: jobs whose optimal path to keep)."""
    began = time.monotonic()
    rows = [
        job_bound(market, case, budget, skip_below=skip_below, explain=case.index in explain)
        for case, budget in zip(cases, budgets, strict=True)
    ]
    return MissBound(
        scenario=market.name,
        jobs=sum(1 for c in cases if c.deadline_hours is not None),
        expected=sum(b.miss for b in rows),
        solved=sum(1 for b in rows if b.solved),
        skipped_at_most=sum(b.cap for b in rows if not b.solved),
        seconds=time.monotonic() - began,
        per_job=tuple(rows),
    )
