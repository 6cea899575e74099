// The Meteor-style oplog tail: `local.oplog.rs`, the last entry's `ts` read with a
// `$natural: -1` findOne, then a tailable awaitData cursor on `{ts: {$gt: last}}` that
// receives the entries of later writes. Both selectors in use: Meteor's OplogHandle
// (packages/mongo/oplog_tailing.js, with transactions' applyOps) and Rocket.Chat's own
// (DatabaseWatcher.watchOplog, IGNORE_CHANGE_STREAM=true, with the oplogReplay flag).

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import { DRIVERS, SKIP, connect, freshName } from './lib.mjs';

const escapeRegExp = (s) => s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');

for (const driver of DRIVERS) {
  describe(`oplog tail, ${driver.label}`, { skip: SKIP, timeout: 60_000 }, () => {
    let client;
    let db;
    let oplog;

    before(async () => {
      client = await connect(driver);
      db = client.db(freshName('oplog'));
      await db.createCollection('users');
      oplog = client.db('local').collection('oplog.rs');
    });

    after(async () => {
      await db?.dropDatabase();
      await client?.close();
    });

    const lastTs = async () =>
      (await oplog.findOne({}, { sort: { $natural: -1 }, projection: { _id: 0, ts: 1 } }))?.ts;

    test("Meteor's OplogHandle selector: i, u, d and a transaction's applyOps", async () => {
      const last = await lastTs();
      assert.ok(last, 'the oplog has no entry');
      const selector = {
        ns: new RegExp(`^(?:${[escapeRegExp(`${db.databaseName}.`), escapeRegExp('admin.$cmd')].join('|')})`),
        $or: [
          { op: { $in: ['i', 'u', 'd'] } },
          { op: 'c', 'o.drop': { $exists: true } },
          { op: 'c', 'o.dropDatabase': 1 },
          { op: 'c', 'o.applyOps': { $exists: true } },
        ],
        ts: { $gt: last },
      };
      const cursor = oplog.find(selector, { tailable: true, awaitData: true });
      // Other test files commit transactions too: their applyOps (admin.$cmd) match as well.
      const next = async () => {
        for (;;) {
          const entry = await cursor.next();
          if (entry.op !== 'c' || entry.o.applyOps?.some((o) => o.ns.startsWith(`${db.databaseName}.`))) {
            return entry;
          }
        }
      };
      try {
        const users = db.collection('users');
        await users.insertOne({ _id: 'u1', status: 'offline' });
        await users.updateOne({ _id: 'u1' }, { $set: { status: 'online' } });
        await users.deleteOne({ _id: 'u1' });
        await client.db(freshName('other')).collection('c').insertOne({ _id: 'elsewhere' });
        const session = client.startSession();
        try {
          await session.withTransaction(async () => {
            await users.insertOne({ _id: 'u2' }, { session });
            await users.updateOne({ _id: 'u2' }, { $set: { status: 'away' } }, { session });
          });
        } finally {
          await session.endSession();
        }

        const ns = `${db.databaseName}.users`;
        const insert = await next();
        assert.deepEqual([insert.op, insert.ns, insert.o], ['i', ns, { _id: 'u1', status: 'offline' }]);
        assert.ok(insert.ts.gt(last));
        const update = await next();
        assert.deepEqual([update.op, update.ns, update.o2], ['u', ns, { _id: 'u1' }]);
        assert.deepEqual(update.o, { $v: 2, diff: { u: { status: 'online' } } });
        assert.ok(update.ts.gt(insert.ts));
        const del = await next();
        assert.deepEqual([del.op, del.ns, del.o], ['d', ns, { _id: 'u1' }]);
        const txn = await next();
        assert.deepEqual([txn.op, txn.ns], ['c', 'admin.$cmd']);
        assert.deepEqual(
          txn.o.applyOps.map(({ op, ns: n, o }) => [op, n, o]),
          [
            ['i', ns, { _id: 'u2' }],
            ['u', ns, { $v: 2, diff: { i: { status: 'away' } } }],
          ],
        );
      } finally {
        await cursor.close();
      }
    });

    test("Rocket.Chat's watchOplog: tailable, awaitData, oplogReplay", async () => {
      const last = await lastTs();
      const selector = {
        ns: new RegExp(`^(?:${escapeRegExp(`${db.databaseName}.`)})`),
        op: { $in: ['i', 'u', 'd'] },
        ts: { $gt: last },
      };
      const cursor = oplog.find(selector);
      cursor.addCursorFlag('tailable', true);
      cursor.addCursorFlag('awaitData', true);
      cursor.addCursorFlag('oplogReplay', true);
      try {
        // The tail is open and waiting before the write.
        const first = cursor.next();
        await new Promise((resolve) => setTimeout(resolve, 200));
        await db.collection('users').insertOne({ _id: 'u3' });
        await db.collection('users').updateOne({ _id: 'u3' }, { $set: { status: 'busy' } });
        const insert = await first;
        assert.deepEqual([insert.op, insert.o._id], ['i', 'u3']);
        const update = await cursor.next();
        assert.deepEqual([update.op, update.o2._id], ['u', 'u3']);
      } finally {
        await cursor.close();
      }
    });
  });
}
