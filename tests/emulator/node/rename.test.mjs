// Issue 9 item 8: renameCollection (admin command `{renameCollection: "db.a", to: "db.b"}`),
// as the driver's db.renameCollection and collection.rename send it.

import assert from 'node:assert/strict';
import { after, before, beforeEach, describe, test } from 'node:test';

import { DRIVERS, SKIP, connect, freshName } from './lib.mjs';


for (const driver of DRIVERS) {
  describe(`renameCollection, ${driver.label}`, { skip: SKIP }, () => {
    let client;
    let db;

    before(async () => {
      client = await connect(driver);
      db = client.db(freshName('rename'));
    });

    beforeEach(async () => {
      for (const { name } of await db.listCollections({}, { nameOnly: true }).toArray()) {
        await db.collection(name).drop();
      }
      await db.collection('a').insertMany([{ _id: 1 }, { _id: 2 }]);
      await db.collection('a').createIndex({ x: 1 });
    });

    after(async () => {
      await db?.dropDatabase();
      await client?.close();
    });

    const names = async () =>
      (await db.listCollections({}, { nameOnly: true }).toArray()).map((c) => c.name).sort();

    test('db.renameCollection moves the documents and the indexes', async () => {
      const renamed = await db.renameCollection('a', 'b');
      assert.equal(renamed.collectionName, 'b');
      assert.deepEqual(await names(), ['b']);
      assert.deepEqual(await db.collection('b').find().sort({ _id: 1 }).toArray(), [{ _id: 1 }, { _id: 2 }]);
      const indexes = (await db.collection('b').indexes()).map((i) => i.name).sort();
      assert.deepEqual(indexes, ['_id_', 'x_1']);
    });

    test('collection.rename', async () => {
      await db.collection('a').rename('c');
      assert.deepEqual(await names(), ['c']);
      assert.equal(await db.collection('c').countDocuments(), 2);
    });

    test('onto an existing collection: 48 NamespaceExists, unless dropTarget', async () => {
      await db.collection('d').insertOne({ _id: 'd' });
      await assert.rejects(db.renameCollection('a', 'd'), { code: 48, codeName: 'NamespaceExists' });
      await db.renameCollection('a', 'd', { dropTarget: true });
      assert.deepEqual(await names(), ['d']);
      assert.equal(await db.collection('d').countDocuments(), 2);
    });

    test('a missing source: 26 NamespaceNotFound', async () => {
      await assert.rejects(db.renameCollection('missing', 'e'), { code: 26, codeName: 'NamespaceNotFound' });
    });
  });
}
