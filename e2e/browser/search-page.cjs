// Drives the search page in headless Chromium (Debian's, through playwright-core): upload a query
// image, expect the original first among the results, save a screenshot.
// env: BASE_URL, QUERY_IMAGE, EXPECTED_KEY, SCREENSHOT
const { chromium } = require("playwright-core");

const { BASE_URL, QUERY_IMAGE, EXPECTED_KEY, SCREENSHOT } = process.env;

(async () => {
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"],
  });
  try {
    const page = await browser.newPage({ viewport: { width: 1200, height: 900 } });
    const failed = [];
    page.on("requestfailed", (r) => failed.push(r.url()));
    await page.goto(BASE_URL);
    // The header shows the catalog's counts once /progress answers.
    await page.waitForFunction(() => /indexed of/.test(document.getElementById("stats").textContent));
    await page.setInputFiles("#file", QUERY_IMAGE);
    await page.waitForSelector("#results li", { timeout: 30000 });
    const first = await page.getAttribute("#results li:first-child", "data-key");
    if (first !== EXPECTED_KEY) throw new Error(`first result is ${first}, expected ${EXPECTED_KEY}`);
    // Thumbnails come from /img/object and must have loaded.
    await page.waitForFunction(() => [...document.querySelectorAll("#results img")].every((i) => i.complete && i.naturalWidth > 0));
    const status = await page.textContent("#status");
    await page.screenshot({ path: SCREENSHOT, fullPage: true });
    if (failed.length) throw new Error("requests failed: " + failed.join(", "));
    console.log(`browser test: ok (first result ${first}; ${status.trim()}); screenshot ${SCREENSHOT}`);
  } finally {
    await browser.close();
  }
})().catch((e) => { console.error("browser test failed:", e.message); process.exit(1); });
