// Drives the built page in Debian's Chromium with playwright-core (no browser download).
//
//   node drive.mjs CONFIG.json
//
// CONFIG (written by tests/e2e/test_browser.py): chromium (executable), userDataDir (fresh),
// allowedPage and blockedPage (the page on an origin the hub allows and on one it does not),
// hubUrl, tokenFile (read here, so the token is never on a command line), cluster, downCluster
// (configured, no agent), namespace,
// timeoutMs, transports, artifacts (a directory), runtime (the Pods and Deployment of the runtime
// steps, optional). Writes artifacts/results.json (the rows the page
// returned per transport, the blocked page's rows, the browser's console lines and failed
// requests) and a full-page screenshot of each page (allowed.png, blocked.png); prints their paths.
// Exits non-zero only when the browser or the page could not be driven; judging the rows is the
// test's job.

import { chromium } from "playwright-core";
import { mkdir, readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";

const config = JSON.parse(await readFile(process.argv[2], "utf8"));
const token = (await readFile(config.tokenFile, "utf8")).trim();
await mkdir(config.artifacts, { recursive: true });

// Without the background-networking flags Chromium dials out at start (updates, safe browsing,
// variations) and, with no network but loopback here, those refused connections only add noise.
const args = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];
const context = await chromium.launchPersistentContext(config.userDataDir, {
  executablePath: config.chromium,
  headless: true,
  args,
  viewport: { width: 1400, height: 900 },
});
const results = { browser: "", runs: {}, blocked: {}, console: [], failedRequests: [] };
try {

  async function open(url) {
    const page = await context.newPage();
    page.setDefaultTimeout(config.timeoutMs * 4);
    page.on("console", (message) => results.console.push({ page: url, type: message.type(), text: message.text() }));
    page.on("requestfailed", (request) =>
      results.failedRequests.push({ page: url, url: request.url(), method: request.method(), failure: request.failure()?.errorText ?? "" }),
    );
    await page.goto(url);
    await page.waitForFunction(() => document.getElementById("status")?.textContent === "ready");
    results.browser = await page.evaluate(() => navigator.userAgent);
    return page;
  }

  const common = {
    hubUrl: config.hubUrl,
    token,
    cluster: config.cluster,
    downCluster: config.downCluster,
    namespace: config.namespace,
    timeoutMs: config.timeoutMs,
    runtime: config.runtime,
  };
  const allowed = await open(config.allowedPage);
  for (const transport of config.transports) {
    results.runs[transport] = await allowed.evaluate((c) => window.otterscale.run(c), { ...common, transport });
  }
  await allowed.screenshot({ path: join(config.artifacts, "allowed.png"), fullPage: true });

  const blocked = await open(config.blockedPage);
  for (const transport of config.transports) {
    results.blocked[transport] = await blocked.evaluate((c) => window.otterscale.blocked(c), { ...common, transport });
  }
  await blocked.screenshot({ path: join(config.artifacts, "blocked.png"), fullPage: true });
} finally {
  await context.close();
  // The token never goes into the results (the test checks).
  await writeFile(join(config.artifacts, "results.json"), JSON.stringify(results, null, 2) + "\n");
}
console.log(`results: ${join(config.artifacts, "results.json")}`);
console.log(`screenshots: ${join(config.artifacts, "allowed.png")} ${join(config.artifacts, "blocked.png")}`);
