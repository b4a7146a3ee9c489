// Lighthouse on several pages with one Chromium and one Node start (each `lighthouse` CLI run
// pays both again: seconds a page on a busy CI machine). Used by tests/test_web_lighthouse.py.
//
//   node audit.mjs PLAN.json OUT.json
//
// PLAN: {"chromePath": ..., "chromeFlags": [...], "categories": [...],
//        "pages": [{"name": ..., "url": ..., "phone": bool, "headers": {...}}]}
// OUT:  [{"name": ..., "url": ..., "phone": ..., "finalUrl": ..., "runtimeError": ...,
//         "warnings": [...], "seconds": ..., "scores": {category: score},
//         "failing": {category: ["audit-id: title elements"]}}]
// Each page loads on loopback only; Lighthouse itself fetches nothing from the internet.
import { readFileSync, writeFileSync } from "node:fs";
import * as chromeLauncher from "chrome-launcher";
import lighthouse, { desktopConfig } from "lighthouse";
import { pageFunctions } from "lighthouse/core/lib/page-functions.js";

// Before every page Lighthouse times a busy loop in it for a second (BenchmarkIndex), a CPU
// figure only the performance category's throttling and a CLI warning read: neither is run
// here, and the second of busy CPU a page was a third of this audit. 0: not measured.
pageFunctions.computeBenchmarkIndex = () => 0;

const [planPath, outPath] = process.argv.slice(2);
const plan = JSON.parse(readFileSync(planPath, "utf8"));

// The audits that cost a category points, with (a few of) the elements each names.
function failing(lhr, category) {
  return lhr.categories[category].auditRefs
    .filter((ref) => ref.weight > 0)
    .map((ref) => lhr.audits[ref.id])
    .filter((audit) => audit.score !== null && audit.score < 1)
    .map((audit) => {
      const items = (audit.details && audit.details.items) || [];
      const where = items
        .slice(0, 5)
        .map((item) => (item.node && item.node.snippet) || item.url || "")
        .filter(Boolean);
      return `${audit.id}: ${audit.title}${where.length ? " " + where.join(" | ") : ""}`;
    });
}

const chrome = await chromeLauncher.launch({
  chromePath: plan.chromePath,
  chromeFlags: plan.chromeFlags,
  logLevel: "error",
});
const results = [];
try {
  for (const page of plan.pages) {
    const flags = {
      port: chrome.port,
      output: "json",
      logLevel: "error",
      onlyCategories: plan.categories,
      disableFullPageScreenshot: true,
      extraHeaders: page.headers || null,
      ignoreStatusCode: true, // the not-found page is a page too: audit it, report its 404
      // Server-rendered pages on loopback: no need to wait seconds for quiet after the load
      // (the defaults are tuned for the performance category, which is not run here).
      skipAboutBlank: true,
      pauseAfterFcpMs: 0,
      pauseAfterLoadMs: 0,
      networkQuietThresholdMs: 0, // the pages are whole when loaded: ~1 s a page less
      cpuQuietThresholdMs: 0,
    };
    const run = await lighthouse(page.url, flags, page.phone ? undefined : desktopConfig);
    const lhr = run.lhr;
    const scores = {};
    const fails = {};
    for (const category of plan.categories) {
      scores[category] = lhr.categories[category].score;
      fails[category] = failing(lhr, category);
    }
    results.push({
      name: page.name,
      url: page.url,
      phone: Boolean(page.phone),
      finalUrl: lhr.finalDisplayedUrl,
      runtimeError: lhr.runtimeError ? lhr.runtimeError.message : null,
      warnings: lhr.runWarnings,
      seconds: Math.round(lhr.timing.total / 100) / 10,
      scores,
      failing: fails,
    });
  }
} finally {
  await chrome.kill();
}
writeFileSync(outPath, JSON.stringify(results, null, 1));
