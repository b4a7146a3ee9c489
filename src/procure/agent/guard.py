"""The guard every planner action passes before anything is quoted or paid."""

from __future__ import annotations

from procure.agent.context import PlanContext
from procure.models import Action, Job, Quote, format_usd


def estimated_cost(ctx: PlanContext, action: Action) -> int:
    vendor = ctx.vendor(action.vendor_id)
    hours = action.hours or ctx.state.run.job_spec.hours
    return round(vendor.base_price_per_hour * hours) if vendor else 0


def check_action(ctx: PlanContext, action: Action) -> str | None:
    """Why `action` must not be carried out, or None if it may."""
    if action.action != "start_job":
        return None
    vendor = ctx.vendor(action.vendor_id)
    if vendor is None:
        return f"unknown vendor {action.vendor_id!r}"
    gpu = action.gpu_type or ctx.state.run.job_spec.gpu_type
    if gpu not in vendor.supported_gpu_types:
        return f"{vendor.vendor_id} does not offer GPU type {gpu}"
    if action.hours is not None and action.hours <= 0:
        return f"hours must be positive, got {action.hours}"
    if action.slice_hours is not None and action.slice_hours <= 0:
        return f"slice hours must be positive, got {action.slice_hours}"
    if ctx.cooling_down(vendor):
        return f"{vendor.vendor_id} is cooling down after a failure until {vendor.cooldown_until}"
    cost = estimated_cost(ctx, action)
    if cost > ctx.available:
        return (
            f"{vendor.vendor_id} would cost {format_usd(cost)}, "
            f"over the {format_usd(ctx.available)} left"
        )
    return None


def check_quote(ctx: PlanContext, action: Action, quote: Quote) -> str | None:
    """Why a vendor's quote must not be paid, or None if it may."""
    if quote.vendor_id != action.vendor_id:
        return f"quote is from {quote.vendor_id}, not {action.vendor_id}"
    if quote.amount <= 0:
        return f"quote amount {format_usd(quote.amount)} is not positive"
    if quote.amount > ctx.available:
        return (
            f"quote {format_usd(quote.amount)} from {quote.vendor_id} is over "
            f"the {format_usd(ctx.available)} left"
        )
    return None


def check_renewal(ctx: PlanContext, job: Job, quote: Quote) -> str | None:
    """Why the next slice of a running job must not be paid, or None if it may."""
    if quote.vendor_id != job.vendor_id:
        return f"quote is from {quote.vendor_id}, not {job.vendor_id}"
    if quote.amount <= 0:
        return f"quote amount {format_usd(quote.amount)} is not positive"
    if quote.amount > ctx.available:
        return (
            f"the next slice, {format_usd(quote.amount)} from {quote.vendor_id}, is over "
            f"the {format_usd(ctx.available)} left"
        )
    return None
