"""Server-side SVG charts of a run: the budget burn (spent over time against the budget) and its
progress (each job's stretch of it over time). Colours come from the page's CSS classes."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from html import escape

from markupsafe import Markup

from procure.models import Job, JobStatus, Payment, PaymentStatus, format_usd

W, H = 600, 200
LEFT, RIGHT, TOP, BOTTOM = 56, 12, 14, 26


def _frame(start: datetime, end: datetime) -> tuple[float, float]:
    t0 = start.timestamp()
    return t0, max(end.timestamp() - t0, 1.0)


def _x(t: datetime, t0: float, span: float) -> float:
    share = min(max((t.timestamp() - t0) / span, 0.0), 1.0)
    return LEFT + share * (W - LEFT - RIGHT)


def _y(share: float) -> float:
    return TOP + (1 - min(max(share, 0.0), 1.0)) * (H - TOP - BOTTOM)


TICKS = (0.25, 0.5, 0.75)
"""Intermediate ticks on both axes, as shares of the axis: a value can be read off the chart."""


def _svg(
    label: str,
    body: list[str],
    start: datetime,
    end: datetime,
    top: str,
    y_label: Callable[[float], str] = lambda share: f"{share:.0%}",
) -> Markup:
    """The frame: axes with 0, the top and intermediate values (and light grid lines across),
    the start and end times and the times between."""
    t0, span = _frame(start, end)
    axis = [
        f'<line class="axis" x1="{LEFT}" y1="{_y(0):.1f}" x2="{W - RIGHT}" y2="{_y(0):.1f}"/>',
        f'<line class="axis" x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{_y(0):.1f}"/>',
        f'<text class="tick" x="{LEFT - 6}" y="{_y(0):.1f}" text-anchor="end">0</text>',
        f'<text class="tick" x="{LEFT - 6}" y="{_y(1) + 4:.1f}" text-anchor="end">'
        f"{escape(top)}</text>",
        f'<text class="tick" x="{LEFT}" y="{H - 6}">{start:%H:%M:%S}</text>',
        f'<text class="tick" x="{W - RIGHT}" y="{H - 6}" text-anchor="end">{end:%H:%M:%S} UTC'
        "</text>",
    ]
    for share in TICKS:
        y = _y(share)
        axis += [
            f'<line class="grid" x1="{LEFT}" y1="{y:.1f}" x2="{W - RIGHT}" y2="{y:.1f}"/>',
            f'<text class="tick y-tick" x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">'
            f"{escape(y_label(share))}</text>",
        ]
        if span >= 4:  # a run of a few seconds: its start and end say it all
            x = LEFT + share * (W - LEFT - RIGHT)
            at = datetime.fromtimestamp(t0 + share * span, tz=UTC)
            axis += [
                f'<line class="axis" x1="{x:.1f}" y1="{_y(0):.1f}" x2="{x:.1f}" '
                f'y2="{_y(0) + 4:.1f}"/>',
                f'<text class="tick x-tick" x="{x:.1f}" y="{H - 6}" text-anchor="middle">'
                f"{at:%H:%M:%S}</text>",
            ]
    return Markup(
        f'<svg class="chart" viewBox="0 0 {W} {H}" role="img" aria-label="{escape(label)}"'
        f' xmlns="http://www.w3.org/2000/svg"><title>{escape(label)}</title>'
        + "".join(axis + body)
        + "</svg>"
    )


def budget_burn(budget: int, payments: list[Payment], start: datetime, end: datetime) -> Markup:
    """Cumulative settled spend as a step line under the budget line; a dot per payment."""
    settled = sorted(
        (p for p in payments if p.status == PaymentStatus.completed), key=lambda p: p.updated_at
    )
    top = max(budget, sum(p.amount for p in settled), 1)
    t0, span = _frame(start, end)
    points = [(LEFT, _y(0))]
    dots: list[str] = []
    total = 0
    for p in settled:
        x = _x(p.updated_at, t0, span)
        points.append((x, _y(total / top)))
        total += p.amount
        y = _y(total / top)
        points.append((x, y))
        tip = f"{format_usd(p.amount)} to {p.vendor_id}, tx {p.x402_tx_id or 'none'}"
        dots.append(
            f'<circle class="pay" cx="{x:.1f}" cy="{y:.1f}" r="4"><title>{escape(tip)}</title>'
            "</circle>"
        )
    points.append((W - RIGHT, _y(total / top)))
    line = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
    budget_y = _y(budget / top)
    spent_y = min(_y(total / top) + 14, _y(0) - 4)  # under the line, above the time axis
    body = [
        f'<line class="budget" x1="{LEFT}" y1="{budget_y:.1f}" x2="{W - RIGHT}" '
        f'y2="{budget_y:.1f}"/>',
        f'<text class="tick budget-label" x="{W - RIGHT}" y="{budget_y - 4:.1f}" '
        f'text-anchor="end">budget {format_usd(budget)}</text>',
        f'<polyline class="spent" points="{line}"/>',
        *dots,
        f'<text class="tick spent-label" x="{W - RIGHT}" y="{spent_y:.1f}" '
        f'text-anchor="end">spent {format_usd(total)}</text>',
    ]
    return _svg(
        "Budget burn: spent over time against the budget",
        body,
        start,
        end,
        format_usd(top),
        lambda share: format_usd(round(top * share)),
    )


def _label(x: float, y: float) -> str:
    """A label's opening tag beside a point at `x`: to its left, unless the point is in the
    plot's left half (then to its right, so that it is never cut at the axis)."""
    if x < (LEFT + W - RIGHT) / 2:
        return f'<text class="tick" x="{x + 6:.1f}" y="{y:.1f}" text-anchor="start">'
    return f'<text class="tick" x="{x - 6:.1f}" y="{y:.1f}" text-anchor="end">'


def progress(jobs: list[Job], start: datetime, end: datetime) -> Markup:
    """Each job as a segment from where it started (time, progress) to where it got."""
    t0, span = _frame(start, end)
    body: list[str] = []
    for job in jobs:
        until = job.completed_at or job.progressed_at or job.updated_at
        x1, x2 = _x(job.created_at, t0, span), _x(until, t0, span)
        y1, y2 = _y(job.start_progress), _y(max(job.progress, job.start_progress))
        kind = {JobStatus.failed: "bad", JobStatus.completed: "good"}.get(job.status, "live")
        tip = f"{job.vendor_id}: {job.status}, {job.start_progress:.0%} → {job.progress:.0%}"
        body.append(
            f'<g class="job {kind}"><title>{escape(tip)}</title>'
            f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}"/>'
            f'<circle cx="{x2:.1f}" cy="{y2:.1f}" r="4"/>'
            f"{_label(x2, max(y2 - 8, 12))}{escape(job.vendor_id)} {job.progress:.0%}</text></g>"
        )
    return _svg("Progress over time, per job", body, start, end, "100%")
