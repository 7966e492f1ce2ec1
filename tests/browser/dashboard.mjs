// Drives Debian's chromium through the dashboard of a running `telemon up`.
// Run by tests/api_browser.rs, which starts telemon, creates the users and patients, and
// publishes readings while this runs. Environment: TELEMON_URL, ARTIFACTS.
import { chromium } from 'playwright-core';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

const url = process.env.TELEMON_URL;
const artifacts = process.env.ARTIFACTS || 'artifacts';
const executablePath = '/usr/bin/chromium';
if (!url) throw new Error('TELEMON_URL is not set');
if (!fs.existsSync(executablePath)) {
  throw new Error(`${executablePath} is missing: run scripts/test.sh (it installs chromium)`);
}
fs.mkdirSync(artifacts, { recursive: true });
const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'telemon-chromium-'));

const context = await chromium.launchPersistentContext(profile, {
  executablePath,
  headless: true,
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
    '--disable-component-update', '--disable-sync', '--no-first-run'],
  viewport: { width: 1280, height: 900 },
});
const page = context.pages()[0] || await context.newPage();
const shot = (name) => page.screenshot({ path: path.join(artifacts, name + '.png'), fullPage: true });
const step = (what) => console.log('step:', what);

try {
  step('log in as ann');
  await page.goto(url + '/#/login');
  await page.fill('input[name=user]', 'ann');
  await page.fill('input[name=password]', 'password-1');
  await page.click('button[type=submit]');
  await page.waitForSelector('[data-patient=p1]', { timeout: 15000 });
  if (await page.$('[data-patient=p2]')) throw new Error("bob's patient p2 is on ann's ward");
  await shot('1-ward');

  step("watch p1's pulse update live");
  const pulse = '[data-patient=p1] [data-metric=heart_rate] b';
  const first = await page.waitForFunction((sel) => {
    const t = document.querySelector(sel)?.textContent;
    return t && t !== '–' ? t : null;
  }, pulse, { timeout: 20000 }).then((h) => h.jsonValue());
  await page.waitForFunction(([sel, before]) => {
    const t = document.querySelector(sel)?.textContent;
    return t && t !== '–' && t !== before;
  }, [pulse, first], { timeout: 20000 });
  const news2 = await page.textContent('[data-patient=p1] .news2');
  if (!/NEWS2 \d+/.test(news2)) throw new Error('no NEWS2 score on the tile: ' + news2);
  await shot('2-ward-live');

  step('acknowledge the alert');
  await page.waitForSelector('#banner button.ack', { timeout: 20000 });
  await shot('3-alert');
  await page.click('#banner button.ack');
  await page.waitForSelector('#banner .alert.acknowledged', { timeout: 20000 });
  const ackText = await page.textContent('#banner .alert.acknowledged .alert-state');
  if (!ackText.includes('by ann')) throw new Error('acknowledgement not by ann: ' + ackText);
  await shot('4-acknowledged');

  step("open p1's charts and watch them update");
  await page.goto(url + '/#/patient/p1');
  await page.waitForSelector('.chart[data-metric=heart_rate] canvas', { timeout: 15000 });
  await page.waitForSelector('.chart[data-metric=heart_rate][data-last]', { timeout: 20000 });
  await shot('5-patient-charts');

  step("try bob's patient p2");
  await page.goto(url + '/#/patient/p2');
  await page.waitForSelector('#denied', { timeout: 15000 });
  if (await page.$('.chart')) throw new Error("a chart of bob's patient was drawn for ann");
  await shot('6-denied');
  console.log('browser test passed');
} catch (e) {
  await shot('failure').catch(() => {});
  console.error('browser test failed:', e);
  process.exitCode = 1;
} finally {
  await context.close();
  fs.rmSync(profile, { recursive: true, force: true });
}
