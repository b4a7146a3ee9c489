"""Lighthouse (npm, scripts/lighthouse) on every dashboard page in Debian's Chromium: accessibility
and SEO at 100 on each, best practices reported; desktop everywhere, a phone for two pages."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from test_web_a11y import TOKEN, pages, site  # noqa: F401  (site: the seeded dashboard fixture)
from web_browser import CHROMIUM, QUIET

ROOT = Path(__file__).resolve().parents[1]
AUDIT = ROOT / "scripts/lighthouse/audit.mjs"
INSTALLED = ROOT / "scripts/lighthouse/node_modules/lighthouse/package.json"
CATEGORIES = ["accessibility", "seo", "best-practices"]
PHONE_TOO = ("runs", "run")  # Lighthouse's default, a phone, on the pages read most
OFFLINE = "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost"
NOT_INDEXABLE = ("not-found",)  # answers 404 by design, which SEO counts against it


def need_lighthouse() -> str:
    """node, Lighthouse (npm ci --prefix scripts/lighthouse) and Chromium, else a skip; under
    CI=true a failure instead. The path of node."""
    node = shutil.which("node")
    missing = None
    if node is None:
        missing = "node is missing (apt-get install nodejs; .ci/run does)"
    elif not INSTALLED.exists():
        missing = "Lighthouse is missing (npm ci --prefix scripts/lighthouse; .ci/run does)"
    elif not CHROMIUM.exists():
        missing = f"{CHROMIUM} is missing (apt-get install chromium; .ci/run does)"
    if node is not None and missing is None:
        return node
    if os.environ.get("CI") == "true":
        pytest.fail(f"the Lighthouse test cannot skip under CI=true: {missing}")
    pytest.skip(missing or "")


@pytest.fixture(scope="module")
def node() -> str:
    return need_lighthouse()  # asked for before `site`, so nothing starts when it skips


def session_cookie(url: str) -> str:
    """Log in through the login form, as a user does, and keep the session cookie it sets."""
    with httpx.Client(base_url=url, timeout=30) as client:
        answer = client.post("/login", data={"token": TOKEN, "next": "/"})
        assert answer.status_code == 303, answer.text
        return f"procure_session={client.cookies['procure_session']}"


@pytest.mark.timeout(400)  # a dozen Lighthouse runs on a busy 2-core machine
def test_every_page_scores_100_for_accessibility_and_seo(
    node: str,
    site: tuple[str, dict[str, str]],  # noqa: F811
    tmp_path: Path,
) -> None:
    url, ids = site
    headers = {"Cookie": session_cookie(url)}
    plan = [{"name": "login", "url": url + "/login", "phone": False}]
    plan += [{"name": n, "url": url + p, "headers": headers} for n, p in pages(ids).items()]
    plan += [
        {"name": n, "url": url + pages(ids)[n], "headers": headers, "phone": True}
        for n in PHONE_TOO
    ]
    (tmp_path / "plan.json").write_text(
        json.dumps(
            {
                "chromePath": str(CHROMIUM),
                # no sandbox: CI runs as root. Chromium resolves no name but loopback's, so
                # nothing of the run can reach the internet.
                "chromeFlags": [*QUIET, "--headless=new", OFFLINE],
                "categories": CATEGORIES,
                "pages": plan,
            }
        )
    )
    done = subprocess.run(
        [node, str(AUDIT), str(tmp_path / "plan.json"), str(tmp_path / "out.json")],
        capture_output=True,
        text=True,
        timeout=380,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads((tmp_path / "out.json").read_text())
    assert [r["name"] for r in results] == [p["name"] for p in plan]

    problems, lines = [], []
    for r in results:
        where = f"{r['name']} ({'phone' if r['phone'] else 'desktop'})"
        lines.append(
            f"{where}: "
            + ", ".join(f"{c} {round((s or 0) * 100)}" for c, s in r["scores"].items())
            + f" ({r['seconds']} s)"
        )
        if r["runtimeError"] or r["finalUrl"] != r["url"]:
            problems.append(f"{where}: {r['runtimeError']} (ended at {r['finalUrl']})")
        for category in ["accessibility"] + ([] if r["name"] in NOT_INDEXABLE else ["seo"]):
            if r["scores"][category] != 1:  # None too: the category could not be scored
                problems.append(f"{where} {category} {r['scores'][category]}")
                problems += [f"    {f}" for f in r["failing"][category]]
    print("\n".join(["Lighthouse 12:", *lines]))  # with -s, and in the log of a failure
    assert problems == [], "\n".join(problems)
