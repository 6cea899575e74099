// Rocket.Chat's change streams: a database-level `db.watch` with fullDocument
// "updateLookup", and DatabaseWatcher's own (apps/meteor/server/database/DatabaseWatcher.ts):
// `db.watch([{$match: {operationType: {$in: [insert, update, delete]}, 'ns.coll': {$in:
// watchCollections}}}])`, resumed with `startAfter` the last event's token after an error.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import { DRIVERS, SKIP, connect, freshName } from './lib.mjs';

// The stream's aggregate runs on the first tryNext (which then waits maxAwaitTimeMS, 1 s by
// default, for an event): the writes that follow are certain to be seen.
async function open(stream) {
  assert.equal(await stream.tryNext(), null);
  return stream;
}

// The drivers' suites run side by side (each opening waits ~1 s), each in its own database.
describe('change streams', { skip: SKIP, concurrency: true, timeout: 60_000 }, () => {
  for (const driver of DRIVERS) {
    describe(driver.label, { concurrency: 1 }, () => {
      let client;
      let db;

      before(async () => {
        client = await connect(driver);
        db = client.db(freshName('watch'));
        await db.createCollection('users');
      });

      after(async () => {
        await db?.dropDatabase();
        await client?.close();
      });

      test("db.watch([], {fullDocument: 'updateLookup'}): inserts and updates carry the document", async () => {
        const stream = await open(db.watch([], { fullDocument: 'updateLookup' }));
        try {
          const users = db.collection('users');
          await users.insertOne({ _id: 'u1', username: 'one', status: 'offline' });
          await users.updateOne({ _id: 'u1' }, { $set: { status: 'online' } });
          await users.deleteOne({ _id: 'u1' });

          const inserted = await stream.next();
          assert.equal(inserted.operationType, 'insert');
          assert.deepEqual(inserted.ns, { db: db.databaseName, coll: 'users' });
          assert.deepEqual(inserted.documentKey, { _id: 'u1' });
          assert.deepEqual(inserted.fullDocument, { _id: 'u1', username: 'one', status: 'offline' });

          const updated = await stream.next();
          assert.equal(updated.operationType, 'update');
          assert.deepEqual(updated.documentKey, { _id: 'u1' });
          assert.deepEqual(updated.updateDescription.updatedFields, { status: 'online' });
          assert.deepEqual(updated.updateDescription.removedFields, []);
          // The lookup ran after the delete was written: MongoDB then gives null.
          assert.ok(
            updated.fullDocument === null ||
              JSON.stringify(updated.fullDocument) ===
                JSON.stringify({ _id: 'u1', username: 'one', status: 'online' }),
            `fullDocument ${JSON.stringify(updated.fullDocument)}`,
          );

          const deleted = await stream.next();
          assert.equal(deleted.operationType, 'delete');
          assert.deepEqual(deleted.documentKey, { _id: 'u1' });
          assert.equal(deleted.fullDocument, undefined);
        } finally {
          await stream.close();
        }
      });

      test('updateLookup returns the document as it is now', async () => {
        const stream = await open(db.watch([], { fullDocument: 'updateLookup' }));
        try {
          const users = db.collection('users');
          await users.insertOne({ _id: 'u2', status: 'offline' });
          await users.updateOne({ _id: 'u2' }, { $set: { status: 'away' } });
          assert.equal((await stream.next()).operationType, 'insert');
          const updated = await stream.next();
          assert.deepEqual(updated.fullDocument, { _id: 'u2', status: 'away' });
        } finally {
          await stream.close();
        }
      });

      test("DatabaseWatcher's pipeline, and its resume with startAfter", async () => {
        const pipeline = [
          {
            $match: {
              'operationType': { $in: ['insert', 'update', 'delete'] },
              'ns.coll': { $in: ['users', 'usersSessions'] },
            },
          },
        ];
        const stream = await open(db.watch(pipeline));
        let last;
        try {
          await db.collection('ignored').insertOne({ _id: 'x' });
          await db.collection('usersSessions').insertOne({ _id: 'u3', connections: [] });
          await db.collection('users').insertOne({ _id: 'u3', status: 'offline' });
          const first = await stream.next();
          assert.deepEqual([first.operationType, first.ns.coll], ['insert', 'usersSessions']);
          const second = await stream.next();
          assert.deepEqual([second.operationType, second.ns.coll], ['insert', 'users']);
          assert.deepEqual(second.fullDocument, { _id: 'u3', status: 'offline' });
          last = first._id;
        } finally {
          await stream.close();
        }
        await db.collection('users').updateOne({ _id: 'u3' }, { $set: { status: 'online' } });
        const resumed = db.watch(pipeline, { startAfter: last });
        try {
          const again = await resumed.next();
          assert.deepEqual([again.operationType, again.ns.coll], ['insert', 'users']);
          const update = await resumed.next();
          assert.equal(update.operationType, 'update');
          assert.equal(update.fullDocument, undefined); // no updateLookup
          assert.deepEqual(update.updateDescription.updatedFields, { status: 'online' });
        } finally {
          await resumed.close();
        }
      });
    });
  }
});
