// Opens vmhost's console page in headless Chromium and checks that noVNC connects and shows
// the VM's screen. Usage: node console-check.mjs <console page URL> <screenshot.png>
// Prints one JSON line: {connected, distinctColours, screenshot}; exits non-zero on failure.
import { chromium } from 'playwright-core';

const [url, screenshot] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
         '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
let result = { connected: false, distinctColours: 0, screenshot };
try {
  const page = await browser.newPage({ viewport: { width: 1024, height: 768 } });
  page.on('console', (m) => console.error(`[page] ${m.text()}`));
  await page.goto(url);
  await page.waitForFunction(() => window.vmhost && window.vmhost.connected, null, { timeout: 20000 });
  result.connected = true;
  // Let a few framebuffer updates arrive, then look at what the canvas shows.
  await page.waitForTimeout(3000);
  result.distinctColours = await page.evaluate(() => {
    const canvas = document.querySelector('#screen canvas');
    const ctx = canvas.getContext('2d');
    const data = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
    const colours = new Set();
    for (let i = 0; i < data.length && colours.size < 64; i += 4 * 7) {
      colours.add((data[i] << 16) | (data[i + 1] << 8) | data[i + 2]);
    }
    return colours.size;
  });
  await page.locator('#screen canvas').screenshot({ path: screenshot });
  result.state = await page.locator('#state').textContent();
} finally {
  await browser.close();
}
console.log(JSON.stringify(result));
process.exit(result.connected && result.distinctColours > 1 ? 0 : 1);
