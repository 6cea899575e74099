// Issue 9 item 4: transactions are isolated as on MongoDB 7.0: a transaction's writes are
// invisible outside it until the commit, its reads come from one snapshot, and a second
// transaction writing a document another one wrote gets WriteConflict (112) with the
// TransientTransactionError label, on which session.withTransaction retries.

import assert from 'node:assert/strict';
import { after, afterEach, before, describe, test } from 'node:test';

import { DRIVERS, SKIP, connect, freshName } from './lib.mjs';

for (const driver of DRIVERS) {
  describe(`transactions, ${driver.label}`, { skip: SKIP }, () => {
    let client;
    let db;
    let coll;
    const sessions = [];

    before(async () => {
      client = await connect(driver);
      db = client.db(freshName('txn'));
      coll = db.collection('docs');
      await db.createCollection('docs'); // no implicit create inside a transaction
    });

    afterEach(async () => {
      for (const s of sessions.splice(0)) {
        if (s.inTransaction()) await s.abortTransaction().catch(() => {});
        await s.endSession();
      }
      await coll.deleteMany({});
    });

    after(async () => {
      await db?.dropDatabase();
      await client?.close();
    });

    const session = () => {
      const s = client.startSession();
      sessions.push(s);
      return s;
    };

    test(
      'an uncommitted insert is invisible outside the transaction',
      async () => {
        const s = session();
        s.startTransaction();
        await coll.insertOne({ _id: 'in-txn' }, { session: s });
        assert.deepEqual(await coll.findOne({ _id: 'in-txn' }, { session: s }), { _id: 'in-txn' });
        assert.equal(await coll.findOne({ _id: 'in-txn' }), null, 'seen outside before commit');
        await s.commitTransaction();
        assert.deepEqual(await coll.findOne({ _id: 'in-txn' }), { _id: 'in-txn' });
      },
    );

    test(
      'reads inside a transaction come from its snapshot',
      async () => {
        await coll.insertOne({ _id: 'before' });
        const s = session();
        s.startTransaction({ readConcern: { level: 'snapshot' } });
        assert.equal(await coll.countDocuments({}, { session: s }), 1);
        await coll.insertOne({ _id: 'after' });
        await coll.updateOne({ _id: 'before' }, { $set: { changed: true } });
        assert.equal(await coll.countDocuments({}, { session: s }), 1);
        assert.deepEqual(await coll.findOne({ _id: 'before' }, { session: s }), { _id: 'before' });
        await s.commitTransaction();
        assert.equal(await coll.countDocuments({}), 2);
      },
    );

    test(
      'a second transaction writing the same document gets WriteConflict',
      async () => {
        await coll.insertOne({ _id: 'x', n: 0 });
        const a = session();
        const b = session();
        a.startTransaction();
        b.startTransaction();
        await coll.updateOne({ _id: 'x' }, { $inc: { n: 1 } }, { session: a });
        const err = await coll
          .updateOne({ _id: 'x' }, { $inc: { n: 10 } }, { session: b })
          .then(() => null, (e) => e);
        assert.ok(err, 'the second transaction wrote the document');
        assert.equal(err.code, 112);
        assert.equal(err.codeName, 'WriteConflict');
        assert.ok(err.hasErrorLabel('TransientTransactionError'), `labels ${err.errorLabels}`);
        await a.commitTransaction();
        assert.deepEqual(await coll.findOne({ _id: 'x' }), { _id: 'x', n: 1 });
      },
    );

    test(
      'withTransaction retries after a WriteConflict and succeeds',
      async () => {
        await coll.insertOne({ _id: 'y', n: 0 });
        const a = session();
        a.startTransaction();
        await coll.updateOne({ _id: 'y' }, { $inc: { n: 1 } }, { session: a });
        const b = session();
        let attempts = 0;
        await b.withTransaction(async () => {
          attempts += 1;
          // The first attempt meets a's uncommitted write; commit it before the retry.
          if (attempts === 2) await a.commitTransaction();
          await coll.updateOne({ _id: 'y' }, { $inc: { n: 10 } }, { session: b });
        });
        if (a.inTransaction()) await a.commitTransaction();
        assert.equal(attempts, 2);
        assert.deepEqual(await coll.findOne({ _id: 'y' }), { _id: 'y', n: 11 });
      },
    );

    test('a committed transaction is visible, an aborted one leaves nothing', async () => {
      const s = session();
      s.startTransaction();
      await coll.insertOne({ _id: 'kept' }, { session: s });
      await s.commitTransaction();
      s.startTransaction();
      await coll.insertOne({ _id: 'dropped' }, { session: s });
      await s.abortTransaction();
      assert.deepEqual(await coll.find().toArray(), [{ _id: 'kept' }]);
    });
  });
}
