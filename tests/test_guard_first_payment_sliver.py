"""The guard's renewal price check when the job's first payment was itself a sliver: a vendor
that sold its first payment as seconds of work at its price plus a whole payment fee must not
have that fee-inflated cost per hour become the baseline its later slivers are measured by."""

from __future__ import annotations

from procure.agent.guard import check_quote_hours, check_renewal
from procure.models import usd_to_micros
from procure.sim.market import charge
from test_guard_renewal_sold_in_slivers import _job, _quote, _renewal_ctx
from test_planner_deadlines_failures_and_slivers import FEE, STANDARD


def test_slivers_after_a_first_sliver_are_not_paid() -> None:
    """Before the fix: the renewal's baseline was the cheapest paid slice's amount per hour,
    fee included, so a first payment of 3.6 s at its price plus a fee set the baseline at many
    times the vendor's price, and every later 3.6 s sliver at the same fee passed as no price
    rise: a whole fee paid per sliver, renewal after renewal, until the budget ran out."""
    price = STANDARD.base_price_per_hour
    job = _job(price, hours=2.0, slice_hours=0.25)
    first = _quote("q0", price, 0.001)  # asked for 0.25 h (a sliced job: fewer hours allowed)
    ctx = _renewal_ctx(job, first)

    sliver = _quote("q1", price, 0.001)
    assert sliver.amount / sliver.hours > 3 * price  # what it really costs per hour
    why = check_renewal(ctx, job, sliver)
    assert why is not None and "raised its price" in why, why
    # The slice asked for, at the vendor's price, is still bought after such a start.
    assert check_renewal(ctx, job, _quote("q2", price, 0.25)) is None


def test_a_first_payment_selling_a_sliver_for_a_whole_fee_is_not_paid() -> None:
    """Before the fix: a sliced job's first payment could buy fewer hours than asked, and only
    its amount against hours x price plus a whole fee was checked, so a vendor selling 3.6 s of
    a 15-minute slice for a fee was paid, and after its renewal was refused, paid again by the
    next job the run started there: a fee per job for seconds of work."""
    price = STANDARD.base_price_per_hour
    fee = usd_to_micros(FEE)
    sliver = _quote("q0", price, 0.001)
    why = check_quote_hours(sliver, 0.25, 2.0, sliced=True, fee=fee)
    assert why is not None and "sliver" in why, why
    # Fewer hours than asked at its price (a vendor's capacity) are still bought, as is the
    # slice asked for at its price plus the fee.
    plain = sliver.model_copy(update={"amount": charge(price, 0.001)})
    assert check_quote_hours(plain, 0.25, 2.0, sliced=True, fee=fee) is None
    assert check_quote_hours(_quote("q1", price, 0.25), 0.25, 2.0, sliced=True, fee=fee) is None
