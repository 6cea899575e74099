// Issue 9 item 3: a duplicate-key error reads as MongoDB's, word for word. The driver
// throws a MongoServerError whose message is the server's errmsg.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import { DRIVERS, SKIP, connect, freshName } from './lib.mjs';


for (const driver of DRIVERS) {
  describe(`duplicate key, ${driver.label}`, { skip: SKIP }, () => {
    let client;
    let db;
    let users;

    before(async () => {
      client = await connect(driver);
      db = client.db(freshName('dup'));
      users = db.collection('users');
      await users.createIndex({ username: 1 }, { unique: true }); // Rocket.Chat's username_1
      await users.insertOne({ _id: 'u1', username: 'dupname' });
      await users.insertOne({ _id: 'u2', username: 'other' });
    });

    after(async () => {
      await db?.dropDatabase();
      await client?.close();
    });

    const expected = () => ({
      name: 'MongoServerError',
      code: 11000,
      message:
        `E11000 duplicate key error collection: ${db.databaseName}.users index: username_1` +
        ' dup key: { username: "dupname" }',
      keyPattern: { username: 1 },
      keyValue: { username: 'dupname' },
    });

    test('insertOne', async () => {
      await assert.rejects(users.insertOne({ _id: 'u3', username: 'dupname' }), expected());
    });

    test('updateOne', async () => {
      await assert.rejects(
        users.updateOne({ _id: 'u2' }, { $set: { username: 'dupname' } }),
        expected(),
      );
    });

    test('the _id index', async () => {
      await assert.rejects(users.insertOne({ _id: 'u1', username: 'third' }), {
        code: 11000,
        message:
          `E11000 duplicate key error collection: ${db.databaseName}.users index: _id_` +
          ' dup key: { _id: "u1" }',
        keyPattern: { _id: 1 },
        keyValue: { _id: 'u1' },
      });
    });

    test('code, keyPattern and keyValue (what Rocket.Chat tests)', async () => {
      await assert.rejects(users.insertOne({ _id: 'u4', username: 'dupname' }), {
        code: 11000,
        keyPattern: { username: 1 },
        keyValue: { username: 'dupname' },
      });
    });
  });
}
