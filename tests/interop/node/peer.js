#!/usr/bin/env node
/*
 * A real Moleculer 0.14 node, configured like Rocket.Chat 7.x's service broker
 * (ee/packages/network-broker), driven by presenced's interop tests over a JSON-lines
 * control protocol: one command a line on stdin, one reply or event a line on stdout.
 *
 * Usage:
 *   node peer.js --url nats://127.0.0.1:4222 --node-id peer-a [options]
 *
 * Options (each falls back to the environment variable Rocket.Chat reads, then to
 * Rocket.Chat's default):
 *   --url URL                 NATS server (TRANSPORTER or NATS_URL; required)
 *   --node-id ID              Moleculer nodeID (NODE_ID; default: Moleculer's hostname-pid)
 *   --namespace NS            MS_NAMESPACE (default "")
 *   --serializer EJSON|JSON   SERIALIZER (default EJSON: Rocket.Chat's EJSONSerializer)
 *   --heartbeat-interval S    HEARTBEAT_INTERVAL, seconds (default 10)
 *   --heartbeat-timeout S     HEARTBEAT_TIMEOUT, seconds (default 30)
 *   --request-timeout S       REQUEST_TIMEOUT, seconds (default 60)
 *   --log-level LEVEL         MOLECULER_LOG_LEVEL (default warn); logs go to stderr
 *   --listen EVENT            run a service "listener-<nodeID>" declaring EVENT (repeatable)
 *   --offer echo              run a service "echo" with action echo.ping (returns its params)
 *
 * The control protocol uses the wire's codec: with the EJSON serializer, stdin lines are
 * read with EJSON.parse and stdout lines written with EJSON.stringify (a Date prints as
 * {"$date": ms}); with JSON, plain JSON both ways. So what the tests write and read is
 * exactly what travels over NATS.
 *
 * Commands (each carries an "id" echoed in its result):
 *   {"cmd":"call","id":1,"action":"presence.newConnection","params":[...],"opts":{...}}
 *   {"cmd":"waitForServices","id":2,"services":["presence"],"timeout":5000}
 *   {"cmd":"nodes","id":3}
 *   {"cmd":"broadcast","id":4,"event":"watch.instanceStatus","data":[...]}
 *   {"cmd":"stop","id":5}
 * Output:
 *   {"type":"ready","nodeID":"..."}                      once broker.start() resolved
 *   {"type":"result","id":1,"ok":true,"data":...}         ("undefined":true when it was undefined)
 *   {"type":"result","id":1,"ok":false,"error":{name,message,code,type,data,retryable,nodeID}}
 *   {"type":"event","event":"...","data":...,"sender":"...","at_ms":1700000000000}
 * EOF on stdin stops the broker (it sends DISCONNECT) and exits 0, like "stop".
 */

"use strict";

const { EJSON, keepStdoutForProtocol, rocketChatBroker } = require("./rocketchat-broker");

keepStdoutForProtocol();

const readline = require("node:readline");
const { Errors } = require("moleculer");

function usage(message) {
	process.stderr.write(`peer.js: ${message}\n`);
	process.exit(2);
}

function parseArgs(argv) {
	const env = process.env;
	const opts = {
		url: env.TRANSPORTER || env.NATS_URL || "",
		nodeID: env.NODE_ID || "",
		namespace: env.MS_NAMESPACE || "",
		serializer: env.SERIALIZER || "EJSON",
		heartbeatInterval: env.HEARTBEAT_INTERVAL || "10",
		heartbeatTimeout: env.HEARTBEAT_TIMEOUT || "30",
		requestTimeout: env.REQUEST_TIMEOUT || "60",
		logLevel: env.MOLECULER_LOG_LEVEL || "warn",
		listen: [],
		offer: []
	};
	const single = {
		"--url": "url",
		"--node-id": "nodeID",
		"--namespace": "namespace",
		"--serializer": "serializer",
		"--heartbeat-interval": "heartbeatInterval",
		"--heartbeat-timeout": "heartbeatTimeout",
		"--request-timeout": "requestTimeout",
		"--log-level": "logLevel"
	};
	for (let i = 0; i < argv.length; i++) {
		let arg = argv[i];
		let value;
		const eq = arg.indexOf("=");
		if (arg.startsWith("--") && eq > 0) {
			value = arg.slice(eq + 1);
			arg = arg.slice(0, eq);
		}
		const known = arg in single || arg === "--listen" || arg === "--offer";
		if (!known) usage(`unknown option ${arg}`);
		if (value === undefined) {
			if (i + 1 >= argv.length) usage(`${arg} needs a value`);
			value = argv[++i];
		}
		if (arg === "--listen") opts.listen.push(value);
		else if (arg === "--offer") opts.offer.push(value);
		else opts[single[arg]] = value;
	}
	if (!opts.url) usage("--url (or TRANSPORTER) is required");
	if (!["EJSON", "JSON"].includes(opts.serializer)) usage("--serializer is EJSON or JSON");
	for (const name of ["heartbeatInterval", "heartbeatTimeout", "requestTimeout"]) {
		const n = Number(opts[name]);
		if (!Number.isFinite(n) || n <= 0) usage(`${name} must be a positive number of seconds`);
		opts[name] = n;
	}
	for (const o of opts.offer) if (o !== "echo") usage(`unknown --offer ${o} (only "echo")`);
	return opts;
}

const opts = parseArgs(process.argv.slice(2));

// Rocket.Chat's errors cross the broker as Meteor.Error (errorType, reason, details,
// isClientSafe on the plain error); restore them the way its CustomRegenerator does.
class MeteorError extends Error {
	constructor(error, reason, details) {
		super(String(error));
		this.error = error;
		this.reason = reason;
		this.details = details;
		this.errorType = "Meteor.Error";
		this.isClientSafe = true;
	}
}

class MeteorAwareRegenerator extends Errors.Regenerator {
	restoreCustomError(plain) {
		if (plain && plain.errorType === "Meteor.Error") {
			const err = new MeteorError(plain.message, plain.reason, plain.details);
			if (typeof plain.isClientSafe !== "undefined") err.isClientSafe = plain.isClientSafe;
			return err;
		}
		return undefined;
	}

	extractPlainError(err) {
		const plain = super.extractPlainError(err);
		if (err && err.errorType === "Meteor.Error") {
			Object.assign(plain, {
				isClientSafe: err.isClientSafe,
				errorType: err.errorType,
				reason: err.reason,
				details: err.details
			});
		}
		return plain;
	}
}

const codec =
	opts.serializer === "EJSON"
		? { parse: EJSON.parse, stringify: value => EJSON.stringify(value) }
		: { parse: JSON.parse, stringify: value => JSON.stringify(value) };

function emit(obj) {
	let line;
	try {
		line = codec.stringify(obj);
	} catch (err) {
		line = JSON.stringify({ type: "protocol-error", message: `unprintable: ${err.message}` });
	}
	// Writes to a pipe are synchronous on Linux: each line is out before the next command.
	process.stdout.write(line + "\n");
}

const broker = rocketChatBroker({
	url: opts.url,
	nodeID: opts.nodeID,
	namespace: opts.namespace,
	serializer: opts.serializer,
	logLevel: opts.logLevel,
	requestTimeout: opts.requestTimeout,
	heartbeatInterval: opts.heartbeatInterval,
	heartbeatTimeout: opts.heartbeatTimeout,
	extra: { errorRegenerator: new MeteorAwareRegenerator() }
});

if (opts.listen.length) {
	const events = {};
	for (const name of opts.listen) {
		// The first parameter must be named ctx for Moleculer 0.14 to pass a Context.
		events[name] = function (ctx) {
			emit({
				type: "event",
				event: ctx.eventName,
				data: ctx.params === undefined ? null : ctx.params,
				sender: ctx.nodeID,
				at_ms: Date.now()
			});
		};
	}
	broker.createService({ name: `listener-${broker.nodeID}`, events });
}

if (opts.offer.includes("echo")) {
	broker.createService({
		name: "echo",
		actions: {
			ping(ctx) {
				return ctx.params;
			}
		}
	});
}

function plainError(err) {
	const e = err || {};
	const out = {
		name: e.name,
		message: e.message,
		code: e.code,
		type: e.type,
		data: e.data,
		retryable: e.retryable,
		nodeID: e.nodeID
	};
	// A Meteor.Error's own fields, as Rocket.Chat's regenerator carries them.
	for (const key of ["errorType", "error", "reason", "details", "isClientSafe"]) {
		if (e.errorType === "Meteor.Error" && e[key] !== undefined) out[key] = e[key];
	}
	for (const key of Object.keys(out)) if (out[key] === undefined) out[key] = null;
	return out;
}

function trimmedNodes() {
	const list = broker.registry.getNodeList({ onlyAvailable: false, withServices: true });
	return list.map(node => ({
		id: node.id,
		available: node.available,
		local: node.local,
		services: (node.services || []).map(svc => ({
			name: svc.name,
			actions: Object.keys(svc.actions || {}),
			events: Object.keys(svc.events || {})
		}))
	}));
}

let stopping = null;

function stopAndExit(id) {
	if (!stopping) {
		stopping = broker
			.stop()
			.then(
				() => null,
				err => err
			)
			.then(err => {
				if (id !== undefined) {
					if (err) emit({ type: "result", id, ok: false, error: plainError(err) });
					else emit({ type: "result", id, ok: true, data: null });
				}
				process.exit(0);
			});
	}
	return stopping;
}

async function run(cmd) {
	switch (cmd.cmd) {
		case "call":
			return broker.call(cmd.action, cmd.params, cmd.opts || {});
		case "waitForServices":
			return broker.waitForServices(cmd.services, cmd.timeout).then(() => null);
		case "nodes":
			return trimmedNodes();
		case "broadcast":
			return broker.broadcast(cmd.event, cmd.data).then(() => null);
		default:
			throw new Error(`unknown command ${JSON.stringify(cmd.cmd)}`);
	}
}

function handleLine(line) {
	if (!line.trim()) return;
	let cmd;
	try {
		cmd = codec.parse(line);
	} catch (err) {
		emit({ type: "protocol-error", message: `unparsable command: ${err.message}` });
		return;
	}
	if (cmd.cmd === "stop") {
		stopAndExit(cmd.id);
		return;
	}
	run(cmd).then(
		data =>
			emit(
				data === undefined
					? { type: "result", id: cmd.id, ok: true, data: null, undefined: true }
					: { type: "result", id: cmd.id, ok: true, data }
			),
		err => emit({ type: "result", id: cmd.id, ok: false, error: plainError(err) })
	);
}

broker
	.start()
	.then(() => {
		emit({ type: "ready", nodeID: broker.nodeID });
		const rl = readline.createInterface({ input: process.stdin, terminal: false });
		rl.on("line", handleLine);
		rl.on("close", () => stopAndExit());
	})
	.catch(err => {
		process.stderr.write(`peer.js: broker did not start: ${err && err.stack}\n`);
		process.exit(1);
	});
