// Issue 9 item 6: a change stream resume token issued by another server life (here: an
// emulator that was stopped, then a fresh one, no snapshot, on another port) names history
// this server does not hold. MongoDB fails the resume with 286 ChangeStreamHistoryLost; it
// must not resume silently against an empty database.
//
// Starts its two emulators itself (`$PRESENCED_PYTHON -m presenced.testing.mongo`), so it
// runs only when the wrapper says the server under test is the emulator.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import { DRIVERS, ROCKETCHAT_DRIVER, SKIP, SKIP_SPAWN, connect, startEmulator } from './lib.mjs';

describe('a resume token from another server life', { skip: SKIP || SKIP_SPAWN, concurrency: true }, () => {
  let token;
  let second;

  before(async () => {
    const first = await startEmulator();
    try {
      const client = await connect(ROCKETCHAT_DRIVER, {}, first.url);
      try {
        const coll = client.db('rocketchat').collection('users');
        const stream = coll.watch();
        await stream.tryNext(); // opens the stream (no event yet)
        await coll.insertOne({ _id: 'u1', username: 'first-life' });
        const event = await stream.next();
        assert.equal(event.operationType, 'insert');
        token = event._id;
        await stream.close();
      } finally {
        await client.close();
      }
    } finally {
      await first.stop();
    }
    second = await startEmulator();
    const client = await connect(ROCKETCHAT_DRIVER, {}, second.url);
    try {
      // The new life has history of its own, of the same namespace.
      await client.db('rocketchat').collection('users').insertOne({ _id: 'u2' });
    } finally {
      await client.close();
    }
  });

  after(async () => {
    await second?.stop();
  });

  for (const driver of DRIVERS) {
    test(
      `${driver.label}: resumeAfter fails with 286 ChangeStreamHistoryLost`,
      async () => {
        const client = await connect(driver, {}, second.url);
        try {
          const stream = client.db('rocketchat').collection('users').watch([], { resumeAfter: token });
          try {
            await assert.rejects(stream.tryNext(), { code: 286, codeName: 'ChangeStreamHistoryLost' });
          } finally {
            await stream.close();
          }
        } finally {
          await client.close();
        }
      },
    );
  }

  test('a token of this life resumes', async () => {
    const client = await connect(ROCKETCHAT_DRIVER, {}, second.url);
    try {
      const coll = client.db('rocketchat').collection('users');
      const stream = coll.watch();
      await stream.tryNext();
      await coll.insertOne({ _id: 'u3' });
      const own = (await stream.next())._id;
      await stream.close();
      await coll.insertOne({ _id: 'u4' });
      const resumed = coll.watch([], { resumeAfter: own });
      try {
        const event = await resumed.next();
        assert.deepEqual(event.documentKey, { _id: 'u4' });
      } finally {
        await resumed.close();
      }
    } finally {
      await client.close();
    }
  });
});
