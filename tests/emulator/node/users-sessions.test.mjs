// Rocket.Chat's UsersSessionsRaw (packages/models/src/models/UsersSessions.ts), every write
// and find exactly as Rocket.Chat sends them, with their results: both the 7.x shapes
// (updateConnectionStatusById with arrayFilters) and the earlier ones (positional `$`,
// updateConnectionById, removeConnectionsByConnectionIds, clearConnectionsFromInstanceId,
// findStaleConnections). BaseRaw passes them to the driver unchanged (preventSetUpdatedAt).

import assert from 'node:assert/strict';
import { after, before, beforeEach, describe, test } from 'node:test';

import { DRIVERS, SKIP, connect, freshName } from './lib.mjs';

// The model's methods, over a driver collection.
function usersSessions(col) {
  return {
    addConnectionById(userId, { id, instanceId, status }) {
      const now = new Date();
      return col.updateOne(
        { _id: userId },
        { $push: { connections: { id, instanceId, status, _createdAt: now, _updatedAt: now } } },
        { upsert: true },
      );
    },
    // 7.x: every entry with the connection id.
    updateConnectionStatusById(uid, connectionId, status) {
      return col.updateOne(
        { '_id': uid, 'connections.id': connectionId },
        {
          $set: {
            'connections.$[connection].status': status,
            'connections.$[connection]._updatedAt': new Date(),
          },
        },
        { arrayFilters: [{ 'connection.id': connectionId }] },
      );
    },
    // Earlier: the first entry with the connection id.
    updateConnectionStatusByIdPositional(uid, connectionId, status) {
      return col.updateOne(
        { '_id': uid, 'connections.id': connectionId },
        { $set: { 'connections.$.status': status, 'connections.$._updatedAt': new Date() } },
      );
    },
    updateConnectionById(uid, connectionId) {
      return col.updateOne(
        { '_id': uid, 'connections.id': connectionId },
        { $set: { 'connections.$._updatedAt': new Date() } },
      );
    },
    removeConnectionByConnectionId(connectionId) {
      return col.updateMany(
        { 'connections.id': connectionId },
        { $pull: { connections: { id: connectionId } } },
      );
    },
    removeConnectionsByConnectionIds(connectionIds) {
      return col.updateMany(
        { 'connections.id': { $in: connectionIds } },
        { $pull: { connections: { id: { $in: connectionIds } } } },
      );
    },
    removeConnectionsFromInstanceId(instanceId) {
      return col.updateMany(
        { 'connections.instanceId': instanceId },
        { $pull: { connections: { instanceId } } },
      );
    },
    removeConnectionsFromOtherInstanceIds(instanceIds) {
      return col.updateMany({}, { $pull: { connections: { instanceId: { $nin: instanceIds } } } });
    },
    findByInstanceId(instanceId) {
      return col.find({ 'connections.instanceId': instanceId });
    },
    findByOtherInstanceIds(instanceIds, options) {
      return col.find({ 'connections.instanceId': { $exists: true, $nin: instanceIds } }, options);
    },
    findStaleConnections(cutoff) {
      return col.find({ 'connections._updatedAt': { $lt: cutoff } }, { projection: { _id: 1 } });
    },
  };
}

const result = (matchedCount, modifiedCount, upsertedId = null) => ({
  acknowledged: true,
  matchedCount,
  modifiedCount,
  upsertedCount: upsertedId === null ? 0 : 1,
  upsertedId,
});

// A result without the driver-version-specific extras, to compare.
const plain = (r) => ({
  acknowledged: r.acknowledged,
  matchedCount: r.matchedCount,
  modifiedCount: r.modifiedCount,
  upsertedCount: r.upsertedCount,
  upsertedId: r.upsertedId,
});

for (const driver of DRIVERS) {
  describe(`UsersSessionsRaw, ${driver.label}`, { skip: SKIP }, () => {
    let client;
    let db;
    let col;
    let model;

    before(async () => {
      client = await connect(driver);
      db = client.db(freshName('sessions'));
      col = db.collection('usersSessions');
      await col.createIndex({ 'connections.instanceId': 1 }, { sparse: true });
      await col.createIndex({ 'connections.id': 1 }, { sparse: true });
      model = usersSessions(col);
    });

    beforeEach(async () => {
      await col.deleteMany({});
    });

    after(async () => {
      await db?.dropDatabase();
      await client?.close();
    });

    const connections = async (uid) => {
      const doc = await col.findOne({ _id: uid });
      return doc?.connections.map(({ id, instanceId, status }) => ({ id, instanceId, status }));
    };

    test('addConnectionById: upsert, then push', async () => {
      assert.deepEqual(
        plain(await model.addConnectionById('u1', { id: 'c1', instanceId: 'i1', status: 'online' })),
        result(0, 0, 'u1'),
      );
      assert.deepEqual(
        plain(await model.addConnectionById('u1', { id: 'c2', instanceId: 'i2', status: 'away' })),
        result(1, 1),
      );
      const doc = await col.findOne({ _id: 'u1' });
      assert.deepEqual(Object.keys(doc), ['_id', 'connections']);
      assert.deepEqual(Object.keys(doc.connections[0]), ['id', 'instanceId', 'status', '_createdAt', '_updatedAt']);
      assert.ok(doc.connections[0]._createdAt instanceof Date);
      assert.deepEqual(await connections('u1'), [
        { id: 'c1', instanceId: 'i1', status: 'online' },
        { id: 'c2', instanceId: 'i2', status: 'away' },
      ]);
    });

    test('updateConnectionStatusById (arrayFilters): every entry with the id', async () => {
      await model.addConnectionById('u1', { id: 'c1', instanceId: 'i1', status: 'online' });
      await model.addConnectionById('u1', { id: 'c2', instanceId: 'i1', status: 'online' });
      await model.addConnectionById('u1', { id: 'c1', instanceId: 'i1', status: 'online' }); // a repeated login
      const before = (await col.findOne({ _id: 'u1' })).connections;
      assert.deepEqual(plain(await model.updateConnectionStatusById('u1', 'c1', 'away')), result(1, 1));
      const after = (await col.findOne({ _id: 'u1' })).connections;
      assert.deepEqual(after.map((c) => c.status), ['away', 'online', 'away']);
      assert.deepEqual(after.map((c) => c._createdAt), before.map((c) => c._createdAt));
      assert.ok(after[0]._updatedAt >= before[0]._updatedAt);
      assert.deepEqual(after[1]._updatedAt, before[1]._updatedAt);
      assert.deepEqual(plain(await model.updateConnectionStatusById('u1', 'nope', 'away')), result(0, 0));
      assert.deepEqual(plain(await model.updateConnectionStatusById('u2', 'c1', 'away')), result(0, 0));
    });

    test('updateConnectionStatusById (positional, earlier): the first entry', async () => {
      await model.addConnectionById('u1', { id: 'c1', instanceId: 'i1', status: 'online' });
      await model.addConnectionById('u1', { id: 'c1', instanceId: 'i1', status: 'online' });
      assert.deepEqual(plain(await model.updateConnectionStatusByIdPositional('u1', 'c1', 'busy')), result(1, 1));
      assert.deepEqual((await connections('u1')).map((c) => c.status), ['busy', 'online']);
    });

    test('updateConnectionById: the heartbeat', async () => {
      await model.addConnectionById('u1', { id: 'c1', instanceId: 'i1', status: 'online' });
      const before = (await col.findOne({ _id: 'u1' })).connections[0];
      await new Promise((resolve) => setTimeout(resolve, 5));
      assert.deepEqual(plain(await model.updateConnectionById('u1', 'c1')), result(1, 1));
      const after = (await col.findOne({ _id: 'u1' })).connections[0];
      assert.ok(after._updatedAt > before._updatedAt);
      assert.deepEqual(after._createdAt, before._createdAt);
      assert.deepEqual(plain(await model.updateConnectionById('u1', 'gone')), result(0, 0));
    });

    test('removeConnectionByConnectionId: every user, every entry', async () => {
      await model.addConnectionById('u1', { id: 'c1', instanceId: 'i1', status: 'online' });
      await model.addConnectionById('u1', { id: 'c1', instanceId: 'i1', status: 'online' });
      await model.addConnectionById('u1', { id: 'c2', instanceId: 'i1', status: 'online' });
      await model.addConnectionById('u2', { id: 'c1', instanceId: 'i1', status: 'online' });
      await model.addConnectionById('u3', { id: 'c3', instanceId: 'i1', status: 'online' });
      assert.deepEqual(plain(await model.removeConnectionByConnectionId('c1')), result(2, 2));
      assert.deepEqual(await connections('u1'), [{ id: 'c2', instanceId: 'i1', status: 'online' }]);
      assert.deepEqual(await connections('u2'), []); // the document stays, its array empty
      assert.deepEqual(plain(await model.removeConnectionByConnectionId('c1')), result(0, 0));
    });

    test('removeConnectionsByConnectionIds (earlier)', async () => {
      await model.addConnectionById('u1', { id: 'c1', instanceId: 'i1', status: 'online' });
      await model.addConnectionById('u1', { id: 'c2', instanceId: 'i1', status: 'online' });
      await model.addConnectionById('u2', { id: 'c3', instanceId: 'i1', status: 'online' });
      assert.deepEqual(plain(await model.removeConnectionsByConnectionIds(['c1', 'c3', 'c9'])), result(2, 2));
      assert.deepEqual(await connections('u1'), [{ id: 'c2', instanceId: 'i1', status: 'online' }]);
      assert.deepEqual(await connections('u2'), []);
    });

    test('removeConnectionsFromInstanceId', async () => {
      await model.addConnectionById('u1', { id: 'c1', instanceId: 'i1', status: 'online' });
      await model.addConnectionById('u1', { id: 'c2', instanceId: 'i2', status: 'online' });
      await model.addConnectionById('u2', { id: 'c3', instanceId: 'i1', status: 'away' });
      await model.addConnectionById('u3', { id: 'c4', instanceId: 'i2', status: 'online' });
      assert.deepEqual(plain(await model.removeConnectionsFromInstanceId('i1')), result(2, 2));
      assert.deepEqual(await connections('u1'), [{ id: 'c2', instanceId: 'i2', status: 'online' }]);
      assert.deepEqual(await connections('u2'), []);
      assert.deepEqual(await connections('u3'), [{ id: 'c4', instanceId: 'i2', status: 'online' }]);
    });

    test('removeConnectionsFromOtherInstanceIds (and clearConnectionsFromInstanceId)', async () => {
      await model.addConnectionById('u1', { id: 'c1', instanceId: 'i1', status: 'online' });
      await model.addConnectionById('u1', { id: 'c2', instanceId: 'dead', status: 'online' });
      await model.addConnectionById('u2', { id: 'c3', instanceId: 'i2', status: 'online' });
      await model.addConnectionById('u3', { id: 'c4', instanceId: 'dead', status: 'online' });
      await col.insertOne({ _id: 'u4' }); // no connections at all
      // Every document matches {}; only those that lost an entry are modified.
      assert.deepEqual(plain(await model.removeConnectionsFromOtherInstanceIds(['i1', 'i2'])), result(4, 2));
      assert.deepEqual(await connections('u1'), [{ id: 'c1', instanceId: 'i1', status: 'online' }]);
      assert.deepEqual(await connections('u3'), []);
      assert.deepEqual(await col.findOne({ _id: 'u4' }), { _id: 'u4' });
    });

    test('findByInstanceId, findByOtherInstanceIds, findStaleConnections', async () => {
      await model.addConnectionById('u1', { id: 'c1', instanceId: 'i1', status: 'online' });
      await model.addConnectionById('u1', { id: 'c2', instanceId: 'dead', status: 'online' });
      await model.addConnectionById('u2', { id: 'c3', instanceId: 'dead', status: 'online' });
      await model.addConnectionById('u3', { id: 'c4', instanceId: 'i2', status: 'online' });
      await col.insertOne({ _id: 'u4', connections: [] });
      const ids = async (cursor) => (await cursor.toArray()).map((d) => d._id).sort();
      assert.deepEqual(await ids(model.findByInstanceId('dead')), ['u1', 'u2']);
      // $nin on an array: no element may be listed, so u1 (one live, one dead) is not found.
      assert.deepEqual(await ids(model.findByOtherInstanceIds(['i1', 'i2'])), ['u2']);
      assert.deepEqual(
        await model.findByOtherInstanceIds(['i1', 'i2'], { projection: { _id: 1 } }).toArray(),
        [{ _id: 'u2' }],
      );
      const cutoff = new Date(Date.now() + 60_000);
      assert.deepEqual(await model.findStaleConnections(cutoff).sort({ _id: 1 }).toArray(), [
        { _id: 'u1' },
        { _id: 'u2' },
        { _id: 'u3' },
      ]);
      assert.deepEqual(await model.findStaleConnections(new Date(0)).toArray(), []);
    });
  });
}
