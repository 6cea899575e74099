#!/usr/bin/env node
/*
 * The Node.js side of tests/bench/broker.py: one Moleculer 0.14 node, configured like
 * Rocket.Chat 7.x's broker (EJSON serializer, as peer.js), that is both the caller of
 * presenced's presence service and a listener of its presence.status event, so one clock
 * (process.hrtime.bigint) times both ends of every call. It also calls echo.ping on another
 * Node node (peer.js --offer echo) at the same rate, interleaved, for the floor.
 *
 * Usage:
 *   node bench.js --url nats://127.0.0.1:4222 --node-id bench-driver --rate 500 \
 *     --seconds 10 --users 500 --prefix bench-u [--settle 30] [--request-timeout 60]
 *
 * Protocol (JSON lines): prints {"type":"ready"} once presence and echo are reachable,
 * waits for a {"cmd":"go"} line on stdin, runs, prints {"type":"result",...} and exits 0
 * on {"cmd":"stop"} or EOF (leaving the broker with DISCONNECT). Moleculer logs go to stderr.
 *
 * The schedule (open loop: each call goes when due, never waiting for an earlier reply;
 * a call due while the event loop was busy goes at once, its lateness recorded):
 *   warm-up   users/2 calls: presence.newConnection for users 0 .. users/2-1 (all offline);
 *   measured  rate*seconds calls alternating: newConnection of the user offline longest,
 *             removeConnection of the connection online longest. Each user stays online,
 *             then offline, for users/rate seconds (a warm-up user's first spell online:
 *             half that), so every call changes one status.
 *   echo      echo.ping half a period after each presence call, the whole time.
 * A presence call's event is the first presence.status for its user carrying the status
 * it implies (online / offline) not taken by an earlier call of that user; one left over
 * is a duplicate (a call of the user with that status had its event) or unexpected.
 *
 * Result: {"type":"result","calls":[[phase,kind,late_ms,event_ms,reply_ms,error]...],
 *          "echo":[[phase,late_ms,rtt_ms,error]...],"duplicates":n,"unexpected":n,
 *          "bad_payload":n,"samples":[...],"event_before_reply":n,"window_s":s,
 *          "last_reply_s":s,"last_event_s":s,"errors":[first few call errors]}
 * (phase 0 = warm-up, 1 = measured; a null time = never came).
 */

"use strict";

const { keepStdoutForProtocol, rocketChatBroker } = require("./rocketchat-broker");

keepStdoutForProtocol();

const readline = require("node:readline");

function usage(message) {
	process.stderr.write(`bench.js: ${message}\n`);
	process.exit(2);
}

function parseArgs(argv) {
	const opts = {
		url: "", nodeId: "bench-driver", rate: 500, seconds: 10, users: 500, prefix: "bench-u",
		settle: 30, requestTimeout: 60, logLevel: "warn"
	};
	const names = {
		"--url": "url", "--node-id": "nodeId", "--rate": "rate", "--seconds": "seconds",
		"--users": "users", "--prefix": "prefix", "--settle": "settle",
		"--request-timeout": "requestTimeout", "--log-level": "logLevel"
	};
	for (let i = 0; i < argv.length; i += 2) {
		const key = names[argv[i]];
		if (!key) usage(`unknown option ${argv[i]}`);
		if (i + 1 >= argv.length) usage(`${argv[i]} needs a value`);
		opts[key] = argv[i + 1];
	}
	if (!opts.url) usage("--url is required");
	for (const key of ["rate", "seconds", "users", "settle", "requestTimeout"]) {
		const n = Number(opts[key]);
		if (!Number.isFinite(n) || n <= 0) usage(`--${key} must be a positive number`);
		opts[key] = n;
	}
	if (opts.users < 2 || !Number.isInteger(opts.users)) usage("--users must be an integer >= 2");
	return opts;
}

const opts = parseArgs(process.argv.slice(2));

function emit(obj) {
	process.stdout.write(JSON.stringify(obj) + "\n");
}

const now = () => process.hrtime.bigint();
const ms = (from, to) => Number(to - from) / 1e6;

// -- the presence calls and what they expect ------------------------------------------------

const calls = []; // {phase, kind, uid, status, due, sent, event, reply, error}
const byUser = new Map(); // uid -> its calls, in order
let duplicates = 0;
let unexpected = 0;
let badPayload = 0;
let eventBeforeReply = 0;
const samples = []; // a few unexpected or malformed payloads, for the report
const errors = [];

function sample(what, payload) {
	if (samples.length < 5) samples.push({ what, payload });
}

// An event answers the user's oldest call that implies its status and has no event yet;
// one that answers none is a duplicate when such a call already had its event, else
// unexpected. (Matching by order, not by the latest call, keeps a backlog longer than a
// user's online spell from reading as lost events.)
function onStatus(ctx) {
	const at = now();
	const args = Array.isArray(ctx.params) ? ctx.params : [ctx.params];
	for (const arg of args) {
		const user = (arg && arg.user) || {};
		const list = (typeof user._id === "string" && byUser.get(user._id)) || [];
		const call = list.find(c => c.status === user.status && c.event === null);
		if (!call) {
			const seen = list.some(c => c.status === user.status);
			if (seen) duplicates++;
			else unexpected++;
			sample(seen ? "duplicate" : "unexpected", arg);
			continue;
		}
		call.event = at;
		if (call.reply === null) eventBeforeReply++;
		const previous = call.status === "online" ? "offline" : "online";
		if (arg.previousStatus !== previous || user.username !== user._id) {
			badPayload++;
			sample("bad payload", arg);
		}
	}
}

const broker = rocketChatBroker({
	url: opts.url, nodeID: opts.nodeId, logLevel: opts.logLevel, requestTimeout: opts.requestTimeout
});

broker.createService({ name: `listener-${opts.nodeId}`, events: { "presence.status": onStatus } });

function errorText(err) {
	return `${(err && err.name) || "Error"}: ${(err && err.message) || String(err)}`;
}

function presenceCall(phase, kind, uid, session, due) {
	const status = kind === "new" ? "online" : "offline";
	const call = { phase, kind, uid, status, due, sent: now(), event: null, reply: null, error: null };
	calls.push(call);
	if (!byUser.has(uid)) byUser.set(uid, []);
	byUser.get(uid).push(call);
	const action = kind === "new" ? "presence.newConnection" : "presence.removeConnection";
	broker.call(action, [uid, session, opts.nodeId]).then(
		result => {
			call.reply = now();
			const ok =
				result && result.uid === uid &&
				(kind === "new" ? result.connectionId === session : result.session === session);
			if (!ok) {
				call.error = `unexpected result ${JSON.stringify(result)}`;
				if (errors.length < 5) errors.push(call.error);
			}
		},
		err => {
			call.reply = now();
			call.error = errorText(err);
			if (errors.length < 5) errors.push(call.error);
		}
	);
}

const echoes = []; // {phase, due, sent, reply, error}

function echoCall(phase, seq, due) {
	const e = { phase, due, sent: now(), reply: null, error: null };
	echoes.push(e);
	broker.call("echo.ping", { seq }).then(
		result => {
			e.reply = now();
			if (!result || result.seq !== seq) e.error = `unexpected result ${JSON.stringify(result)}`;
		},
		err => {
			e.reply = now();
			e.error = errorText(err);
		}
	);
}

// -- the schedule ---------------------------------------------------------------------------

function run() {
	const users = Array.from({ length: opts.users }, (_, i) => `${opts.prefix}${i}`);
	const half = Math.floor(opts.users / 2);
	const offline = users.slice(half); // FIFO: offline longest first
	const online = []; // FIFO of [uid, session]: online longest first
	const generation = new Map();
	const warmup = half;
	const total = warmup + Math.round(opts.rate * opts.seconds);
	const periodNs = 1e9 / opts.rate;
	const start = now() + 100_000_000n;
	let slot = 0; // 2 slots a period: even a presence call, odd an echo

	function connect(phase, uid, due) {
		const g = (generation.get(uid) || 0) + 1;
		generation.set(uid, g);
		const session = `${uid}-s${g}`;
		online.push([uid, session]);
		presenceCall(phase, "new", uid, session, due);
	}

	function send(index, due) {
		const call = index >> 1;
		const phase = call < warmup ? 0 : 1;
		if (index % 2 === 1) {
			echoCall(phase, call, due);
		} else if (phase === 0) {
			connect(0, users[call], due);
		} else if ((call - warmup) % 2 === 0) {
			connect(1, offline.shift(), due);
		} else {
			const [uid, session] = online.shift();
			offline.push(uid);
			presenceCall(1, "remove", uid, session, due);
		}
	}

	return new Promise(resolve => {
		function pump() {
			const t = now();
			while (slot < 2 * total) {
				const due = start + BigInt(Math.round((slot * periodNs) / 2));
				if (due > t) break;
				send(slot, due);
				slot++;
			}
			if (slot >= 2 * total) {
				resolve(ms(start, now()) / 1000);
				return;
			}
			const next = start + BigInt(Math.round((slot * periodNs) / 2));
			setTimeout(pump, Math.max(0, Math.floor(ms(now(), next))));
		}
		setTimeout(pump, 100);
	});
}

function settled() {
	return calls.every(c => c.reply !== null && (c.event !== null || c.error !== null)) &&
		echoes.every(e => e.reply !== null);
}

function lastOf(times, start) {
	const got = times.filter(t => t !== null);
	return got.length ? ms(start, got.reduce((a, b) => (a > b ? a : b))) / 1000 : null;
}

function sleep(msec) {
	return new Promise(resolve => setTimeout(resolve, msec));
}

async function measure() {
	const windowS = await run();
	const start = calls.length ? calls[0].due : now();
	const deadline = Date.now() + opts.settle * 1000;
	while (!settled() && Date.now() < deadline) await sleep(20);
	await sleep(500); // a duplicate would come right after its first
	const round = v => Math.round(v * 1000) / 1000;
	const since = (c, at) => (at === null ? null : round(ms(c.sent, at)));
	emit({
		type: "result",
		window_s: windowS,
		// When the last reply and the last event came, seconds after the first call was due.
		last_reply_s: lastOf(calls.map(c => c.reply), start),
		last_event_s: lastOf(calls.map(c => c.event), start),
		calls: calls.map(c => [
			c.phase, c.kind, round(ms(c.due, c.sent)), since(c, c.event), since(c, c.reply), c.error
		]),
		echo: echoes.map(e => [e.phase, round(ms(e.due, e.sent)), since(e, e.reply), e.error]),
		duplicates,
		unexpected,
		bad_payload: badPayload,
		event_before_reply: eventBeforeReply,
		samples,
		errors
	});
}

let stopping = false;

function stopAndExit(code) {
	if (stopping) return;
	stopping = true;
	broker.stop().then(
		() => process.exit(code),
		() => process.exit(code)
	);
}

process.on("SIGTERM", () => stopAndExit(0));
process.on("SIGINT", () => stopAndExit(0));

broker
	.start()
	.then(() => broker.waitForServices(["presence", "echo"], 30_000))
	.then(() => {
		emit({ type: "ready", nodeID: broker.nodeID });
		const rl = readline.createInterface({ input: process.stdin, terminal: false });
		let running = false;
		rl.on("line", line => {
			let cmd;
			try {
				cmd = JSON.parse(line);
			} catch (err) {
				return;
			}
			if (cmd.cmd === "go" && !running) {
				running = true;
				measure().catch(err => {
					emit({ type: "failed", message: errorText(err) });
				});
			} else if (cmd.cmd === "stop") {
				stopAndExit(0);
			}
		});
		rl.on("close", () => stopAndExit(0));
	})
	.catch(err => {
		emit({ type: "failed", message: `broker did not start: ${errorText(err)}` });
		process.exit(1);
	});
