// Shared by the *.test.mjs files: which drivers to run, the server's URL, fresh databases,
// and the emulator as a child process (for the tests that need a server life of their own).
//
// Environment:
//   MONGO_URL         the replica set to test (mongodb://127.0.0.1:PORT/?replicaSet=rs0);
//                     without it every suite skips.
//   MONGODB_DRIVERS   comma-separated package names to run (default: every one installed):
//                     mongodb (6.16.0, Rocket.Chat 7.x's), mongodb-6-22, mongodb-7.
//   PRESENCED_PYTHON  a Python that can import presenced; set only when MONGO_URL is the
//                     emulator. The tests that start emulators of their own skip without it.

import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { createRequire } from 'node:module';
import { createInterface } from 'node:readline';

const require = createRequire(import.meta.url);

export const MONGO_URL = (process.env.MONGO_URL ?? '').trim();
export const PRESENCED_PYTHON = (process.env.PRESENCED_PYTHON ?? '').trim();

/** Why every suite skips, or false. */
export const SKIP = MONGO_URL ? false : 'MONGO_URL is not set';

/** Why the tests that spawn emulators skip, or false. */
export const SKIP_SPAWN = PRESENCED_PYTHON
  ? false
  : 'emulator-only: PRESENCED_PYTHON is not set (the server under test is not the emulator)';

const PACKAGES = ['mongodb', 'mongodb-6-22', 'mongodb-7'];

function loadDrivers() {
  const wanted = (process.env.MONGODB_DRIVERS ?? '')
    .split(',')
    .map((s) => s.trim())
    .filter(Boolean);
  const names = wanted.length ? wanted : PACKAGES;
  const drivers = [];
  for (const name of names) {
    let mongodb;
    let version;
    try {
      mongodb = require(name);
      version = require(`${name}/package.json`).version;
    } catch (err) {
      if (wanted.length) throw err; // asked for by name: say so
      continue; // an alias that is not installed
    }
    drivers.push({ name, version, label: `mongodb ${version}`, mongodb });
  }
  if (!drivers.length) throw new Error('no mongodb driver installed: run npm ci');
  return drivers;
}

/** [{name, version, label, mongodb}]: Rocket.Chat's 6.16.0 first. */
export const DRIVERS = loadDrivers();

/** Rocket.Chat 7.x's driver (the first one), for the tests that judge the server alone. */
export const ROCKETCHAT_DRIVER = DRIVERS[0];

/** A client with the driver's defaults (plus `options`), connected. */
export async function connect(driver, options = {}, url = MONGO_URL) {
  const client = new driver.mongodb.MongoClient(url, options);
  await client.connect();
  return client;
}

/** A database name no other test uses. */
export function freshName(prefix = 't') {
  return `${prefix}_${randomBytes(6).toString('hex')}`;
}

export function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/**
 * `python -m presenced.testing.mongo` as a child process (a fresh server life: no snapshot).
 * Resolves to {url, stop()} once it printed "ready URL".
 */
export function startEmulator(args = []) {
  const child = spawn(PRESENCED_PYTHON, ['-m', 'presenced.testing.mongo', '--port', '0', ...args], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  const exited = new Promise((resolve) => child.once('exit', (code, signal) => resolve(code ?? signal)));
  const stop = async () => {
    if (child.exitCode === null && child.signalCode === null) {
      child.kill('SIGINT');
      const timer = setTimeout(() => child.kill('SIGKILL'), 10_000);
      await exited;
      clearTimeout(timer);
    }
  };
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      stop();
      reject(new Error('the emulator did not report ready within 60 s'));
    }, 60_000);
    const lines = createInterface({ input: child.stdout });
    lines.once('line', (line) => {
      clearTimeout(timer);
      child.stdout.resume(); // never block the child on a full pipe
      if (!line.startsWith('ready ')) {
        stop();
        reject(new Error(`the emulator did not report ready (got ${JSON.stringify(line)})`));
        return;
      }
      resolve({ url: line.slice('ready '.length).trim(), stop });
    });
    child.once('error', (err) => {
      clearTimeout(timer);
      reject(err);
    });
    exited.then((code) => {
      clearTimeout(timer);
      reject(new Error(`the emulator exited (${code}) before it was ready`));
    });
  });
}
