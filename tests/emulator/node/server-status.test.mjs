// Issue 9 item 2: serverStatus as Rocket.Chat reads it. getMongoInfo
// (apps/meteor/app/utils/server/functions/getMongoInfo.ts) runs `{serverStatus: 1}` on its
// own database and reads `version` and `storageEngine.name`; when that throws (no
// storageEngine) it falls back to buildInfo and reports the engine as "unknown".

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import { DRIVERS, SKIP, connect, freshName } from './lib.mjs';

// MongoDB's engines: WiredTiger (the default), and the Enterprise in-memory engine.
const ENGINES = ['wiredTiger', 'inMemory'];

for (const driver of DRIVERS) {
  describe(`serverStatus, ${driver.label}`, { skip: SKIP }, () => {
    let client;
    let db;

    before(async () => {
      client = await connect(driver);
      db = client.db(freshName('status'));
    });

    after(async () => {
      await client?.close();
    });

    test(
      "storageEngine.name, read as Rocket.Chat's getMongoInfo does",
      async () => {
        const { version, storageEngine } = await db.command({ serverStatus: 1 });
        assert.match(version, /^\d+\.\d+\.\d+/);
        assert.ok(storageEngine, 'serverStatus.storageEngine is missing');
        assert.ok(ENGINES.includes(storageEngine.name), `storageEngine.name ${storageEngine.name}`);
        const admin = await client.db('admin').admin().serverStatus();
        assert.equal(admin.storageEngine?.name, storageEngine.name);
      },
    );

    test('version matches buildInfo (the fallback) and the common fields are there', async () => {
      const status = await client.db('admin').admin().serverStatus();
      const build = await client.db('admin').admin().buildInfo();
      assert.equal(status.version, build.version);
      assert.match(status.version, /^\d+\.\d+\.\d+/);
      assert.equal(status.process, 'mongod');
      assert.equal(typeof status.host, 'string');
      assert.equal(typeof status.uptime, 'number');
      assert.ok(status.localTime instanceof Date);
      assert.equal(typeof status.connections.current, 'number');
      assert.equal(typeof status.opcounters.insert, 'number');
      assert.equal(typeof status.repl?.setName, 'string');
      assert.equal(status.repl?.isWritablePrimary, true);
    });
  });
}
