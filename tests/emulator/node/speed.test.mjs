// Issue 9 item 7, a smoke (the benchmarks, `make bench`, judge speed): scans, `_id $in` and
// Rocket.Chat's disconnect write on 1,000 users with Rocket.Chat's index. Each gets a
// generous absolute bound, and a check of how its cost grows, which does not depend on the
// machine: a scan twice as long may cost ~2x (not 4x), an `$in` with 4x the ids ~4x (not
// 16x), and an update found by the `connections.id` index about what one by `_id` costs.
// Timings are the best of a few runs; they are printed as diagnostics.
//
// Rocket.Chat's driver only: what is measured is the server.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import { ROCKETCHAT_DRIVER, SKIP, connect, freshName } from './lib.mjs';

const RUNS = 3;

async function best(f, runs = RUNS) {
  let min = Infinity;
  for (let i = 0; i < runs; i++) {
    const start = performance.now();
    await f();
    min = Math.min(min, performance.now() - start);
  }
  return min;
}

const ms = (x) => `${x.toFixed(0)} ms`;

describe(`speed smoke, ${ROCKETCHAT_DRIVER.label}`, { skip: SKIP }, () => {
  let client;
  let db;
  let docs;
  let sessions;

  before(async () => {
    client = await connect(ROCKETCHAT_DRIVER);
    db = client.db(freshName('speed'));
    docs = db.collection('docs');
    const batch = (from, n) =>
      Array.from({ length: n }, (_, i) => ({
        _id: `d${from + i}`,
        i: from + i,
        username: `user${from + i}`,
        roles: ['user'],
        status: 'offline',
      }));
    for (let from = 0; from < 20_000; from += 5_000) await docs.insertMany(batch(from, 5_000));
    await db.collection('half').insertMany(batch(0, 10_000));

    sessions = db.collection('usersSessions');
    // Rocket.Chat's indexes on usersSessions (sparse, on the array's fields).
    await sessions.createIndex({ 'connections.id': 1 }, { sparse: true });
    await sessions.createIndex({ 'connections.instanceId': 1 }, { sparse: true });
    const now = new Date();
    await sessions.insertMany(
      Array.from({ length: 1_000 }, (_, i) => ({
        _id: `u${i}`,
        connections: [
          { id: `c${i}`, instanceId: 'instance-1', status: 'online', _createdAt: now, _updatedAt: now },
        ],
      })),
    );
  });

  after(async () => {
    await db?.dropDatabase();
    await client?.close();
  });

  test('find of 10,000 documents: under 2 s', async (t) => {
    const took = await best(async () => {
      assert.equal((await db.collection('half').find().toArray()).length, 10_000);
    });
    t.diagnostic(`find 10,000: ${ms(took)}`);
    assert.ok(took < 2_000, `find of 10,000 documents took ${ms(took)}`);
  });

  test(
    'a scan twice as long costs at most 3x',
    async (t) => {
      const tenK = await best(() => db.collection('half').find().toArray());
      const twentyK = await best(() => docs.find().toArray());
      t.diagnostic(`find 10,000: ${ms(tenK)}; 20,000: ${ms(twentyK)} (${(twentyK / tenK).toFixed(1)}x)`);
      assert.ok(twentyK / tenK <= 3, `10,000: ${ms(tenK)}, 20,000: ${ms(twentyK)}`);
    },
  );

  test('find({_id: {$in: 1,000 ids}}): under 1 s', async (t) => {
    const ids = Array.from({ length: 1_000 }, (_, i) => `d${i * 17}`);
    const took = await best(async () => {
      assert.equal((await docs.find({ _id: { $in: ids } }).toArray()).length, 1_000);
    });
    t.diagnostic(`$in 1,000 ids: ${ms(took)}`);
    assert.ok(took < 1_000, `$in of 1,000 ids took ${ms(took)}`);
  });

  test(
    '$in with 4x the ids costs at most 8x',
    async (t) => {
      const ids = (n) => Array.from({ length: n }, (_, i) => `d${i * 7}`);
      const small = ids(500);
      const large = ids(2_000);
      const tSmall = await best(() => docs.find({ _id: { $in: small } }).toArray());
      const tLarge = await best(() => docs.find({ _id: { $in: large } }).toArray());
      t.diagnostic(`$in 500: ${ms(tSmall)}; 2,000: ${ms(tLarge)} (${(tLarge / tSmall).toFixed(1)}x)`);
      assert.ok(tLarge / tSmall <= 8, `500 ids: ${ms(tSmall)}, 2,000 ids: ${ms(tLarge)}`);
    },
  );

  // Rocket.Chat's disconnect (removeConnectionByConnectionId), then its connect
  // (addConnectionById) to put the connection back, 100 of each.
  const disconnect = (i) =>
    sessions.updateMany({ 'connections.id': `c${i}` }, { $pull: { connections: { id: `c${i}` } } });
  const reconnect = (i) =>
    sessions.updateOne(
      { _id: `u${i}` },
      {
        $push: {
          connections: {
            id: `c${i}`,
            instanceId: 'instance-1',
            status: 'online',
            _createdAt: new Date(),
            _updatedAt: new Date(),
          },
        },
      },
      { upsert: true },
    );

  test('updateMany({"connections.id": x}) on 1,000 users: at least 100/s', async (t) => {
    let pulled = 0;
    const took = await best(async () => {
      for (let i = 0; i < 100; i++) pulled += (await disconnect(i)).modifiedCount;
      for (let i = 0; i < 100; i++) await reconnect(i);
    }, 1);
    t.diagnostic(`100 disconnects + 100 connects: ${ms(took)}`);
    assert.equal(pulled, 100);
    assert.ok(took < 2_000, `100 disconnects and 100 connects took ${ms(took)}`);
  });

  test(
    'an update found by the connections.id index costs at most 3x one found by _id',
    async (t) => {
      const byIndex = await best(async () => {
        for (let i = 100; i < 200; i++) await disconnect(i);
        for (let i = 100; i < 200; i++) await reconnect(i);
      });
      const byId = await best(async () => {
        for (let i = 100; i < 200; i++) {
          await sessions.updateMany({ _id: `u${i}` }, { $pull: { connections: { id: `c${i}` } } });
        }
        for (let i = 100; i < 200; i++) await reconnect(i);
      });
      t.diagnostic(
        `100 disconnects + 100 connects: by connections.id ${ms(byIndex)}, by _id ${ms(byId)}` +
          ` (${(byIndex / byId).toFixed(1)}x)`,
      );
      assert.ok(byIndex / byId <= 3, `by connections.id ${ms(byIndex)}, by _id ${ms(byId)}`);
    },
  );
});
