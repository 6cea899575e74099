// Issue 9 item 5: a retryable write (one carrying lsid and txnNumber, which the driver sends
// by default: retryWrites=true) that fails with a retryable code gets the
// RetryableWriteError label from the server (MongoDB 4.4+ adds it; drivers retry only on
// it), and the driver retries it once, transparently.
//
// Uses the failCommand fail point, scoped by appName so that no other test's update meets
// it. A real server needs --setParameter enableTestCommands=1; without it the suite skips.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import { DRIVERS, ROCKETCHAT_DRIVER, SKIP, connect, freshName } from './lib.mjs';

// MongoDB's retryable codes (the issue names these), all with Rocket.Chat's driver, one with
// the others. The "not primary" / "node is recovering" ones make the driver mark the server
// Unknown and wait ~500 ms (minHeartbeatFrequencyMS) for it before the retry, as it does
// against MongoDB.
const CODES = [91, 189, 11600, 10107, 13435, 6, 7, 89, 9001];

for (const driver of DRIVERS) {
  describe(`retryable writes, ${driver.label}`, { skip: SKIP }, () => {
    const appName = freshName('retry');
    let client;
    let db;
    let coll;
    let failPoints = true;
    const failed = [];
    const succeeded = [];

    before(async () => {
      client = await connect(driver, { appName, monitorCommands: true });
      client.on('commandFailed', (e) => failed.push(e));
      client.on('commandSucceeded', (e) => succeeded.push(e));
      db = client.db(freshName('retry'));
      coll = db.collection('docs');
      await coll.insertOne({ _id: 1, n: 0 });
      try {
        await client.db('admin').command({ configureFailPoint: 'failCommand', mode: 'off' });
      } catch {
        failPoints = false; // a real server without enableTestCommands
      }
    });

    after(async () => {
      if (failPoints) {
        await client.db('admin').command({ configureFailPoint: 'failCommand', mode: 'off' });
      }
      await db?.dropDatabase();
      await client?.close();
    });

    const failNextUpdate = (errorCode) =>
      client.db('admin').command({
        configureFailPoint: 'failCommand',
        mode: { times: 1 },
        data: { failCommands: ['update'], errorCode, appName },
      });

    for (const code of driver === ROCKETCHAT_DRIVER ? CODES : CODES.slice(0, 1)) {
      test(`error ${code}: labelled RetryableWriteError, retried once, applied once`, async (t) => {
        if (!failPoints) return t.skip('the server refuses configureFailPoint');
        failed.length = 0;
        succeeded.length = 0;
        const before = (await coll.findOne({ _id: 1 })).n;
        await failNextUpdate(code);
        const outcome = await coll.updateOne({ _id: 1 }, { $inc: { n: 1 } }).then(
          (result) => ({ result }),
          (error) => ({ error }),
        );
        assert.ok(
          outcome.result,
          `the update failed: ${outcome.error?.code} ${outcome.error?.message},` +
            ` errorLabels ${JSON.stringify(outcome.error?.errorLabels)}`,
        );
        assert.equal(outcome.result.modifiedCount, 1);
        assert.equal((await coll.findOne({ _id: 1 })).n, before + 1);
        const updates = failed.filter((e) => e.commandName === 'update');
        assert.equal(updates.length, 1, 'one failed attempt');
        assert.equal(updates[0].failure.code, code);
        assert.ok(
          updates[0].failure.hasErrorLabel('RetryableWriteError'),
          `labels ${JSON.stringify(updates[0].failure.errorLabels)}`,
        );
        assert.equal(succeeded.filter((e) => e.commandName === 'update').length, 1, 'one retry');
      });
    }

    test('a non-retryable code is not labelled and not retried', async (t) => {
      if (!failPoints) return t.skip('the server refuses configureFailPoint');
      failed.length = 0;
      await failNextUpdate(2); // BadValue
      await assert.rejects(coll.updateOne({ _id: 1 }, { $inc: { n: 1 } }), (err) => {
        assert.equal(err.code, 2);
        assert.equal(err.hasErrorLabel('RetryableWriteError'), false);
        return true;
      });
      assert.equal(failed.filter((e) => e.commandName === 'update').length, 1);
    });
  });
}
