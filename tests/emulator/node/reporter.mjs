// A node:test reporter for the pytest wrapper (tests/emulator/test_node_driver.py): one JSON
// line per test (suites left out, unless skipped whole) with its path of suite names, its
// outcome, the todo or skip reason, the error's message and a failed assertion's actual
// value, and the diagnostics it printed (t.diagnostic).
//
//   node --test --test-reporter=./reporter.mjs --test-reporter-destination=results.jsonl
//
// outcome: "pass", "fail", "todo" (a todo test that failed: the known gap), "todo-pass" (a
// todo test that passed: its todo can go), "skip".

import { inspect } from 'node:util';

// An assertion's actual value, on one line: what the server did.
function describeActual(error) {
  if (!error || typeof error !== 'object' || !('actual' in error) || !('expected' in error)) {
    return undefined;
  }
  const { actual } = error;
  const text =
    actual instanceof Error
      ? `${actual.name}: ${actual.message}`
      : inspect(actual, { breakLength: Infinity, depth: 4, maxArrayLength: 20 });
  return text.length > 400 ? `${text.slice(0, 400)}...` : text;
}

export default async function* reporter(source) {
  const stacks = new Map(); // file -> names of the open tests, by nesting
  let last = null; // the last test reported, for the diagnostics that follow it

  const flush = function* () {
    if (last) yield `${JSON.stringify(last)}\n`;
    last = null;
  };

  for await (const { type, data } of source) {
    if (type === 'test:start') {
      const stack = stacks.get(data.file) ?? [];
      stack.length = data.nesting;
      stack.push(data.name);
      stacks.set(data.file, stack);
    } else if (type === 'test:pass' || type === 'test:fail') {
      yield* flush();
      const skipped = data.skip !== undefined && data.skip !== false;
      // A suite is left out, unless skipped as a whole (its tests are then never reported).
      if (data.details?.type === 'suite' && !skipped) continue;
      const stack = stacks.get(data.file) ?? [];
      const path = [...stack.slice(0, data.nesting), data.name];
      const failed = type === 'test:fail';
      let outcome = failed ? 'fail' : 'pass';
      if (skipped) outcome = 'skip';
      else if (data.todo !== undefined && data.todo !== false) outcome = failed ? 'todo' : 'todo-pass';
      const reason = (value) => (typeof value === 'string' ? value : value ? '' : undefined);
      const error = data.details?.error;
      const cause = error?.cause ?? error;
      last = {
        file: data.file,
        path,
        outcome,
        todo: reason(data.todo),
        skip: reason(data.skip),
        error: failed && cause ? String(cause.message ?? cause) : undefined,
        actual: failed ? describeActual(cause) : undefined,
        duration_ms: data.details?.duration_ms,
        diagnostics: [],
      };
    } else if (type === 'test:diagnostic') {
      if (last && data.nesting > 0 && data.file === last.file) last.diagnostics.push(data.message);
    }
  }
  yield* flush();
}
