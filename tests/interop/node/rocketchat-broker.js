/*
 * What every Node.js peer of the interop tests and benchmarks shares: a Moleculer 0.14
 * ServiceBroker configured as Rocket.Chat 7.x's (ee/packages/network-broker), with its
 * EJSON serializer, and stdout kept for the JSON-lines protocol (Moleculer's Console
 * logger writes with console.log).
 */

"use strict";

const { Console } = require("node:console");
const EJSON = require("ejson");
const { ServiceBroker, Serializers } = require("moleculer");

/** Send every console.* line to stderr: stdout carries only the control protocol. */
function keepStdoutForProtocol() {
	globalThis.console = new Console({ stdout: process.stderr, stderr: process.stderr });
}

/** Rocket.Chat's EJSONSerializer: Meteor's EJSON over Moleculer's serializer interface. */
class EJSONSerializer extends Serializers.Base {
	serialize(obj) {
		return Buffer.from(EJSON.stringify(obj));
	}

	deserialize(buf) {
		return EJSON.parse(buf.toString());
	}
}

/**
 * A ServiceBroker with Rocket.Chat's options. `opts`: url, nodeID, namespace ("" default),
 * serializer ("EJSON" default, or "JSON"), requestTimeout / heartbeatInterval /
 * heartbeatTimeout in seconds (Rocket.Chat's 60 / 10 / 30 by default), logLevel ("warn"),
 * and `extra` options merged last (e.g. errorRegenerator).
 */
function rocketChatBroker(opts) {
	return new ServiceBroker({
		nodeID: opts.nodeID || undefined,
		namespace: opts.namespace || "",
		transporter: opts.url,
		cacher: "Memory",
		serializer: (opts.serializer || "EJSON") === "EJSON" ? new EJSONSerializer() : "JSON",
		logger: { type: "Console", options: { level: opts.logLevel || "warn", colors: false } },
		registry: { strategy: "RoundRobin", preferLocal: true },
		requestTimeout: (opts.requestTimeout ?? 60) * 1000,
		retryPolicy: {
			enabled: false,
			retries: 5,
			delay: 100,
			maxDelay: 1000,
			factor: 2,
			check: err => err && !!err.retryable
		},
		maxCallLevel: 100,
		heartbeatInterval: opts.heartbeatInterval ?? 10,
		heartbeatTimeout: opts.heartbeatTimeout ?? 30,
		bulkhead: { enabled: false, concurrency: 10, maxQueueSize: 10000 },
		...(opts.extra || {})
	});
}

module.exports = { EJSON, EJSONSerializer, keepStdoutForProtocol, rocketChatBroker };
