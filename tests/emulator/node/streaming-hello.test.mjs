// Issue 9 item 1: the driver's default server monitoring (streaming: an awaitable hello with
// exhaustAllowed, answered by a stream of moreToCome replies, one per maxAwaitTimeMS) must
// hold for the life of a client: no failed heartbeat, no pool clear, the server never
// Unknown. heartbeatFrequencyMS 500 (the driver's minimum) packs ~25 s of default
// (10 s) heartbeats' worth of awaitable hellos into 5 s.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import { DRIVERS, MONGO_URL, SKIP, freshName, sleep } from './lib.mjs';

const ACTIVITY_MS = 5_000;
const HEARTBEAT_MS = 500;

// The drivers' clients run side by side (concurrency), each on its own monitor.
describe('streaming hello', { skip: SKIP, concurrency: true }, () => {
  for (const driver of DRIVERS) {
    describe(driver.label, { concurrency: 1 }, () => {
      const events = [];
      let client;
      const latencies = [];

      before(async () => {
        client = new driver.mongodb.MongoClient(MONGO_URL, {
          heartbeatFrequencyMS: HEARTBEAT_MS,
        });
        const t0 = Date.now();
        for (const name of [
          'serverHeartbeatStarted',
          'serverHeartbeatSucceeded',
          'serverHeartbeatFailed',
          'connectionPoolCleared',
          'serverDescriptionChanged',
        ]) {
          client.on(name, (event) => events.push({ name, at: Date.now() - t0, event }));
        }
        await client.connect();
        const coll = client.db(freshName('hello')).collection('w');
        const end = Date.now() + ACTIVITY_MS;
        for (let n = 0; Date.now() < end; n++) {
          const started = Date.now();
          await coll.insertOne({ n });
          latencies.push(Date.now() - started);
          await sleep(10);
        }
        await coll.drop();
      });

      after(async () => {
        await client?.close();
      });

      const describeEvent = ({ name, at, event }) => {
        let detail = '';
        if (name === 'serverHeartbeatStarted') detail = ` (awaited: ${event.awaited})`;
        if (name === 'serverHeartbeatFailed') detail = ` ${event.failure}`;
        if (name === 'serverDescriptionChanged') {
          detail = ` ${event.previousDescription.type} -> ${event.newDescription.type}`;
        }
        return `${(at / 1000).toFixed(2)} s ${name}${detail}`;
      };

      test(
        'no failed heartbeat, pool clear or Unknown server over 5 s of writes',
        () => {
          const bad = events.filter(
            ({ name, event }) =>
              name === 'serverHeartbeatFailed' ||
              name === 'connectionPoolCleared' ||
              (name === 'serverDescriptionChanged' && event.newDescription.type === 'Unknown'),
          );
          const slowest = Math.max(...latencies);
          assert.deepEqual(
            bad.map(describeEvent),
            [],
            `${bad.length} events, from ${bad.slice(0, 3).map(describeEvent).join('; ')};` +
              ` slowest write ${slowest} ms of ${latencies.length}`,
          );
        },
      );

      test(
        'heartbeats are streamed: awaited, on one monitoring connection',
        () => {
          const succeeded = events.filter(({ name }) => name === 'serverHeartbeatSucceeded');
          const awaited = succeeded.filter(({ event }) => event.awaited);
          // A stream replies every maxAwaitTimeMS (= heartbeatFrequencyMS): ~10 in 5 s.
          assert.ok(
            awaited.length >= ACTIVITY_MS / HEARTBEAT_MS / 2,
            `only ${awaited.length} awaited heartbeats in ${ACTIVITY_MS} ms`,
          );
          // The first check is the connection handshake (awaited: false); a stream never
          // needs another one.
          const handshakes = events.filter(
            ({ name, event }) => name === 'serverHeartbeatStarted' && !event.awaited,
          );
          assert.deepEqual(handshakes.map(describeEvent).slice(1), []);
        },
      );
    });
  }
});
