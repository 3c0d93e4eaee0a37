// A stand-in for a browser dashboard: it calls the hub the way the real web UI does, with
// @connectrpc/connect-web from a page whose origin is not the hub's. tests/e2e/test_browser.py
// serves the built page (dist/) on its own loopback port, opens it in Chromium (drive.mjs) and
// runs `window.otterscale.run(...)` once per transport; the page draws a table of what happened
// (the screenshots) and returns the same rows to the test.
//
// The TypeScript messages and service descriptors in ./gen are generated at build time from the
// repository's .proto files (npm run generate), so an RPC added there appears here on the next
// build. Describe is looked up at run time: until resource.proto has it, its row says "waiting".
//
// Never shows or returns the token.

import { Code, ConnectError, createClient, type Interceptor, type Transport } from "@connectrpc/connect";
import { createConnectTransport, createGrpcWebTransport } from "@connectrpc/connect-web";
import { ClusterService } from "./gen/otterscale/cluster/v1/cluster_pb";
import {
  ClusterStatus_Outcome,
  MultiClusterService,
  MultiWatchRequest_InitialEvents,
} from "./gen/otterscale/resource/v1/multicluster_pb";
import { ResourceService, WatchEvent_Type } from "./gen/otterscale/resource/v1/resource_pb";
import { RuntimeService } from "./gen/otterscale/runtime/v1/runtime_pb";

/** The four ways a browser can speak to the hub. */
export const TRANSPORTS = ["connect-json", "connect-binary", "grpc-web-binary", "grpc-web-json"] as const;
export type TransportName = (typeof TRANSPORTS)[number];

/** What the test passes in: where the hub is, who calls, and where to work. */
export interface RunConfig {
  hubUrl: string;
  token: string;
  cluster: string;
  /** A configured cluster whose agent never runs: the fan-out steps show its own outcome. */
  downCluster: string;
  namespace: string;
  transport: TransportName;
  /** Per-call deadline; also sent to the hub (Connect-Timeout-Ms / Grpc-Timeout headers). */
  timeoutMs: number;
  /** Where the runtime steps run (Pods need a node): absent, they are not run. */
  runtime?: RuntimeTargets;
}

/** The Pods and the Deployment the runtime steps use (a cluster with a real node). */
export interface RuntimeTargets {
  cluster: string;
  namespace: string;
  /** A Pod whose container prints a line every fraction of a second. */
  logPod: string;
  /** A Pod with `cat` (and `sh`). */
  shellPod: string;
  /** A Deployment the page may scale and restart. */
  deployment: string;
}

/** One RPC's outcome: "ok", "failed", or "waiting" (the RPC is not in the .proto files yet). */
export interface Step {
  rpc: string;
  outcome: "ok" | "failed" | "waiting";
  detail: string;
  /** The Connect code of an error ("unauthenticated"...), empty when there was none. */
  code: string;
  ms: number;
}

function transport(name: TransportName, baseUrl: string, token: string): Transport {
  const interceptors: Interceptor[] = [];
  if (token) {
    interceptors.push((next) => async (req) => {
      req.header.set("Authorization", `Bearer ${token}`);
      return next(req);
    });
  }
  switch (name) {
    case "connect-json":
      return createConnectTransport({ baseUrl, useBinaryFormat: false, interceptors });
    case "connect-binary":
      return createConnectTransport({ baseUrl, useBinaryFormat: true, interceptors });
    case "grpc-web-binary":
      return createGrpcWebTransport({ baseUrl, useBinaryFormat: true, interceptors });
    case "grpc-web-json":
      return createGrpcWebTransport({ baseUrl, useBinaryFormat: false, interceptors });
  }
}

/** "Unauthenticated" -> "unauthenticated", "PermissionDenied" -> "permission_denied" (the wire names). */
export function codeName(code: Code): string {
  return Code[code].replace(/([a-z])([A-Z])/g, "$1_$2").toLowerCase();
}

/** A check of the page failed (as opposed to an RPC error, which is a ConnectError). */
class Failed extends Error {}

/** The step cannot run yet: the RPC is not in the .proto files this page was built from. */
class Waiting extends Error {}

async function step(rpc: string, steps: Step[], body: () => Promise<string>): Promise<boolean> {
  const started = performance.now();
  try {
    const detail = await body();
    steps.push({ rpc, outcome: "ok", detail, code: "", ms: Math.round(performance.now() - started) });
    return true;
  } catch (err) {
    const ms = Math.round(performance.now() - started);
    if (err instanceof Waiting) {
      steps.push({ rpc, outcome: "waiting", detail: err.message, code: "", ms });
    } else if (err instanceof ConnectError) {
      steps.push({ rpc, outcome: "failed", detail: err.message, code: codeName(err.code), ms });
    } else {
      steps.push({ rpc, outcome: "failed", detail: err instanceof Error ? err.message : String(err), code: "", ms });
    }
    return false;
  }
}

function check(condition: boolean, message: string): void {
  if (!condition) throw new Failed(message);
}

type Json = { [key: string]: unknown };

function metadata(object: Json | undefined): Json {
  return ((object ?? {})["metadata"] as Json | undefined) ?? {};
}

function manifest(name: string, namespace: string, value: string): Uint8Array {
  // The dashboard sends YAML text as the manifest bytes (shared/design/api.md).
  const yaml = [
    "apiVersion: v1",
    "kind: ConfigMap",
    "metadata:",
    `  name: ${name}`,
    `  namespace: ${namespace}`,
    "data:",
    `  value: "${value}"`,
    "",
  ].join("\n");
  return new TextEncoder().encode(yaml);
}

/** Every RPC a dashboard needs, in order, over one transport. Never throws: failures are rows. */
export async function run(config: RunConfig): Promise<Step[]> {
  const steps: Step[] = [];
  const { cluster, namespace, timeoutMs } = config;
  const base = transport(config.transport, config.hubUrl, config.token);
  const clusters = createClient(ClusterService, base);
  const resources = createClient(ResourceService, base);
  const fleet = createClient(MultiClusterService, base);
  const options = { timeoutMs };
  const name = `browser-${config.transport}-${Date.now().toString(36)}`;
  const target = { cluster, group: "", version: "v1", resource: "configmaps", namespace };

  await step("ListClusters", steps, async () => {
    const { clusters: found } = await clusters.listClusters({}, options);
    const mine = found.find((c) => c.name === cluster);
    check(mine !== undefined, `cluster ${cluster} not listed`);
    check(mine!.connected, `cluster ${cluster} not connected`);
    return `${found.length} clusters; ${cluster} connected`;
  });
  await step("Discovery", steps, async () => {
    const { apiResources } = await resources.discovery({ cluster }, options);
    const configmaps = apiResources.find((r) => r.group === "" && r.version === "v1" && r.resource === "configmaps");
    check(configmaps !== undefined, "configmaps not discovered");
    return `${apiResources.length} resources`;
  });
  await step("List", steps, async () => {
    const listed = await resources.list(target, options);
    return `${listed.items.length} configmaps at resourceVersion ${listed.resourceVersion}`;
  });
  let createdVersion = "";
  await step("Apply", steps, async () => {
    const applied = await resources.apply(
      { ...target, name, manifest: manifest(name, namespace, "one"), force: true, fieldManager: "otterscale-web-ui" },
      options,
    );
    const meta = metadata(applied.object);
    check(meta["name"] === name, `applied ${String(meta["name"])}, not ${name}`);
    createdVersion = String(meta["resourceVersion"]);
    return `created ${name}`;
  });
  await step("Get", steps, async () => {
    const got = await resources.get({ ...target, name }, options);
    const data = (got.object?.["data"] ?? {}) as Json;
    check(data["value"] === "one", `data.value is ${String(data["value"])}`);
    return `data.value = one`;
  });
  await step("Watch", steps, async () => {
    // From the created version on, so what arrives is the change made below, live.
    const abort = new AbortController();
    const timer = setTimeout(() => abort.abort(), timeoutMs);
    try {
      const stream = resources.watch(
        { ...target, fieldSelector: `metadata.name=${name}`, resourceVersion: createdVersion },
        { signal: abort.signal },
      );
      const seen = (async () => {
        for await (const event of stream) {
          const object = event.resource?.object;
          if (event.type === WatchEvent_Type.MODIFIED && ((object?.["data"] ?? {}) as Json)["value"] === "two") {
            return `MODIFIED at resourceVersion ${event.resourceVersion}`;
          }
        }
        throw new Failed("the stream ended before the change arrived");
      })();
      await resources.apply(
        { ...target, name, manifest: manifest(name, namespace, "two"), force: true, fieldManager: "otterscale-web-ui" },
        options,
      );
      return await seen;
    } finally {
      clearTimeout(timer);
      abort.abort();
    }
  });
  // The fleet view: one call over several clusters, each with its own outcome.
  const selection = { clusters: [cluster, config.downCluster] };
  await step("MultiList", steps, async () => {
    const query = { version: "v1", resource: "configmaps", namespace };
    const outcomes: Record<string, string> = {};
    let cursor = "";
    let pages = 0;
    let items = 0;
    let found = false;
    do {
      // Two items a page, so the cursor is followed across pages as a table's "next" button would.
      const page = await fleet.multiList({ selection, query, limit: BigInt(2), cursor }, options);
      pages += 1;
      for (const part of page.lists) {
        const listed = part.list?.items ?? [];
        items += listed.length;
        found ||= listed.some((item) => metadata(item.object)["name"] === name);
      }
      for (const status of page.statuses) outcomes[status.cluster] = ClusterStatus_Outcome[status.outcome];
      cursor = page.nextCursor;
    } while (cursor && pages < 1000);
    check(found, `${name} is not in the fleet's list`);
    check(outcomes[cluster] === "OK", `${cluster}: ${outcomes[cluster]}`);
    check(outcomes[config.downCluster] === "UNAVAILABLE", `${config.downCluster}: ${outcomes[config.downCluster]}`);
    return `${items} configmaps in ${pages} pages; ${cluster} OK, ${config.downCluster} UNAVAILABLE`;
  });
  await step("MultiWatch", steps, async () => {
    const abort = new AbortController();
    const timer = setTimeout(() => abort.abort(), timeoutMs);
    try {
      const stream = fleet.multiWatch(
        {
          selection,
          query: { version: "v1", resource: "configmaps", namespace, fieldSelector: `metadata.name=${name}` },
          initialEvents: MultiWatchRequest_InitialEvents.MISSING_ONLY,
        },
        { signal: abort.signal },
      );
      let changed = false;
      let down = "";
      for await (const message of stream) {
        if (message.kind.case === "status") {
          const status = message.kind.value;
          if (status.cluster === config.downCluster) down = ClusterStatus_Outcome[status.outcome];
          if (status.cluster === cluster && status.outcome === ClusterStatus_Outcome.SYNCED && !changed) {
            changed = true; // live: now change the object, and wait for that change to arrive
            await resources.apply(
              { ...target, name, manifest: manifest(name, namespace, "three"), force: true, fieldManager: "otterscale-web-ui" },
              options,
            );
          }
        } else if (message.kind.case === "event") {
          const { cluster: from, event } = message.kind.value;
          const data = ((event?.resource?.object ?? {})["data"] ?? {}) as Json;
          if (from === cluster && event?.type === WatchEvent_Type.MODIFIED && data["value"] === "three") {
            check(down === "UNAVAILABLE", `${config.downCluster}: ${down || "no status"}`);
            return `MODIFIED from ${cluster} at resourceVersion ${event.resourceVersion}; ${config.downCluster} ${down}`;
          }
        }
      }
      throw new Failed("the stream ended before the change arrived");
    } finally {
      clearTimeout(timer);
      abort.abort();
    }
  });
  await step("Describe", steps, async () => {
    const describe = (ResourceService.method as Record<string, unknown>)["describe"];
    if (describe === undefined) {
      throw new Waiting("ResourceService.Describe is not in resource.proto yet (issue 15, item 3)");
    }
    const call = (resources as unknown as Record<string, (req: object, opt: object) => Promise<Json>>)["describe"];
    const described = await call({ ...target, name }, options);
    const object = (described["resource"] as { object?: Json } | undefined)?.object;
    check(metadata(object)["name"] === name, "Describe returned another object");
    const events = (described["events"] as unknown[] | undefined) ?? [];
    const eventsError = String(described["eventsError"] ?? "");
    check(eventsError === "", `events_error: ${eventsError}`);
    return `${name} with ${events.length} events`;
  });
  await step("Delete", steps, async () => {
    await resources.delete({ ...target, name }, options);
    try {
      await resources.get({ ...target, name }, options);
    } catch (err) {
      if (err instanceof ConnectError && err.code === Code.NotFound) return "deleted; Get says not_found";
      throw err;
    }
    throw new Failed("still there after Delete");
  });
  if (config.runtime !== undefined) {
    await runtimeSteps(config.runtime, base, timeoutMs, steps);
  }
  await step("Unauthenticated", steps, async () => {
    // No token: the hub must answer (with CORS headers) so the page can tell "log in again"
    // from "hub down"; a blocked answer would be a network error (code unknown) instead.
    const anonymous = createClient(ResourceService, transport(config.transport, config.hubUrl, ""));
    try {
      await anonymous.list(target, options);
    } catch (err) {
      if (err instanceof ConnectError && err.code === Code.Unauthenticated) return `unauthenticated: ${err.rawMessage}`;
      throw err;
    }
    throw new Failed("answered without a token");
  });
  show(config.transport, steps);
  return steps;
}

/**
 * What a dashboard's pod and workload views do: follow a log, a terminal (a stream plus unary
 * writes: a browser cannot stream a request body), scale, restart.
 */
async function runtimeSteps(target: RuntimeTargets, base: Transport, timeoutMs: number, steps: Step[]): Promise<void> {
  const runtime = createClient(RuntimeService, base);
  const options = { timeoutMs };
  const pod = { cluster: target.cluster, namespace: target.namespace };
  const workload = { ...pod, group: "apps", version: "v1", resource: "deployments", name: target.deployment };

  await step("PodLog", steps, async () => {
    // Follow from now on: what arrives was written after the call started, live.
    const abort = new AbortController();
    const timer = setTimeout(() => abort.abort(), timeoutMs);
    try {
      const lines: string[] = [];
      const decoder = new TextDecoder();
      for await (const chunk of runtime.podLog({ ...pod, name: target.logPod, follow: true, tailLines: 0n }, { signal: abort.signal })) {
        lines.push(...decoder.decode(chunk.data).split("\n").filter((line) => line !== ""));
        if (lines.length >= 2) return `followed: ${lines.slice(0, 2).join(" | ")}`;
      }
      throw new Failed("the log ended before two new lines arrived");
    } finally {
      clearTimeout(timer);
      abort.abort();
    }
  });
  await step("Exec", steps, async () => {
    const abort = new AbortController();
    const timer = setTimeout(() => abort.abort(), timeoutMs);
    try {
      const stream = runtime.executeTTY({ ...pod, name: target.shellPod, command: ["cat"] }, { signal: abort.signal });
      const encoder = new TextEncoder();
      let sessionId = "";
      let echoed = "";
      let closed = false;
      for await (const message of stream) {
        if (sessionId === "") {
          sessionId = message.sessionId;
          check(sessionId.startsWith(`${target.cluster}.`), "no session id in the first message");
          // Out of order on purpose: the agent applies writes by offset.
          const later = runtime.writeTTY({ sessionId, stdin: encoder.encode("world\n"), offset: 6n }, options);
          await runtime.writeTTY({ sessionId, stdin: encoder.encode("hello "), offset: 0n }, options);
          await later;
          continue;
        }
        echoed += new TextDecoder().decode(message.stdout);
        if (!closed && echoed === "hello world\n") {
          // Once: the session ends when cat does, and a write after that is not_found.
          closed = true;
          await runtime.writeTTY({ sessionId, closeStdin: true, offset: 12n }, options);
        }
        if (message.exitCode !== undefined) {
          check(echoed === "hello world\n", `echoed ${JSON.stringify(echoed)}`);
          check(message.exitCode === 0, `exit code ${message.exitCode}`);
          return `echoed "hello world", exit code 0`;
        }
      }
      throw new Failed("the exec stream ended without an exit code");
    } finally {
      clearTimeout(timer);
      abort.abort();
    }
  });
  await step("Scale", steps, async () => {
    const now = await runtime.getScale(workload, options);
    const wanted = now.replicas === 0 ? 1 : 0;
    const scaled = await runtime.scale({ ...workload, replicas: wanted, currentReplicas: now.replicas }, options);
    check(scaled.previousReplicas === now.replicas && scaled.replicas === wanted, `scaled ${scaled.previousReplicas} -> ${scaled.replicas}`);
    return `${now.replicas} -> ${wanted} replicas`;
  });
  await step("Restart", steps, async () => {
    await runtime.restart(workload, options);
    return `restarted ${target.deployment}`;
  });
}

/** One call from a page whose origin the hub does not allow: the browser must block the answer. */
export async function blocked(config: RunConfig): Promise<Step[]> {
  const steps: Step[] = [];
  const clusters = createClient(ClusterService, transport(config.transport, config.hubUrl, config.token));
  await step("ListClusters", steps, async () => {
    const { clusters: found } = await clusters.listClusters({}, { timeoutMs: config.timeoutMs });
    return `answered: ${found.length} clusters (the browser should have blocked this)`;
  });
  show(`${config.transport} from a disallowed origin`, steps);
  return steps;
}

function show(title: string, steps: Step[]): void {
  const section = document.createElement("section");
  const heading = document.createElement("h2");
  heading.textContent = `${title} (page ${location.origin})`;
  section.append(heading);
  const table = document.createElement("table");
  table.innerHTML = "<tr><th>RPC</th><th>outcome</th><th>code</th><th>ms</th><th>detail</th></tr>";
  for (const s of steps) {
    const row = table.insertRow();
    row.className = s.outcome;
    for (const text of [s.rpc, s.outcome, s.code, String(s.ms), s.detail]) {
      row.insertCell().textContent = text;
    }
  }
  section.append(table);
  document.getElementById("results")!.append(section);
}

declare global {
  interface Window {
    otterscale: { run: typeof run; blocked: typeof blocked; transports: readonly TransportName[] };
  }
}

window.otterscale = { run, blocked, transports: TRANSPORTS };
document.getElementById("status")!.textContent = "ready";
