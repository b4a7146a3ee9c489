"""The demos' settings: the environment's and `.env`'s, with the demo's own store, home, chain
and wallet in place of the user's."""

from __future__ import annotations

from pathlib import Path

from procure.settings import Settings

SECRET = "demo-secret"  # the demo's mock vendors' bearer secret


def demo_settings(workdir: Path, facilitator_url: str, secret: str = SECRET) -> Settings:
    """A story's settings, on `workdir` and the demo's facilitator. Built once before the story
    starts anything (its chain alone is seconds of CPU) so that a mistake in the environment is
    refused at once, in one line."""
    return Settings(
        PROCURE_DATABASE_URL=f"sqlite:///{workdir / 'procure.db'}",
        PROCURE_HOME=workdir,
        GPU_VENDOR_SECRET=secret,
        X402_FACILITATOR_URL=facilitator_url,
        # The demo pays from the wallet it funds (under its workdir), never from a key the
        # environment or `.env` holds: that one has nothing on the demo's fresh chain
        X402_PRIVATE_KEY=None,
        PLANNER_MODE="heuristic",
    )  # type: ignore[call-arg]
