// Drives the real @librechat/agents 3.9.x programmatic tool calling tools against kcr-trio.
//
// usage: node ptc_client.mjs '<scenario JSON>'
//   {backends: [url, ...], key, kind: "code"|"bash", code, manifest?, timeout?, abortAfterMs?}
//
// The tools are real LangChain tools with real Node functions. With several backends the script
// puts a round-robin HTTP proxy in front of them (like a Kubernetes Service over replicas), so
// consecutive POSTs of one PTC execution land on different replicas. It prints one JSON line:
// {ok, content, artifact, error, requests: [{path, backend, status}], invocations: [...]}.
// abortAfterMs counts from the moment the execution's POST reaches the proxy, not from start-up:
// on a loaded machine the client's own set-up (session file lookup, auth headers) can take longer
// than a short abort, which would then fire before any request exists and test nothing.
import http from 'node:http';
import { tool } from '@langchain/core/tools';
import { z } from 'zod';
import {
  createProgrammaticToolCallingTool,
  createBashProgrammaticToolCallingTool,
} from '@librechat/agents';

const scenario = JSON.parse(process.argv[2]);
const invocations = [];
const requests = [];
let inFlight = 0;
let onExecutionPost = () => {};

const weather = tool(
  async ({ city }) => {
    invocations.push({ tool: 'get-weather', city });
    return { city, temp: 10 + city.length };
  },
  {
    name: 'get-weather',
    description: 'Current temperature for a city',
    schema: z.object({ city: z.string() }),
  }
);
const add = tool(
  async ({ a, b }) => {
    invocations.push({ tool: 'add', a, b });
    return { sum: a + b };
  },
  {
    name: 'add',
    description: 'Adds two numbers',
    schema: z.object({ a: z.number(), b: z.number() }),
  }
);
const explode = tool(
  async () => {
    invocations.push({ tool: 'explode' });
    throw new Error('the explode tool failed on purpose');
  },
  { name: 'explode', description: 'Always fails', schema: z.object({}) }
);

const tools = [weather, add, explode];
const toolMap = new Map(tools.map((t) => [t.name, t]));
const toolDefs = [
  {
    name: 'get-weather',
    description: 'Current temperature for a city',
    parameters: {
      type: 'object',
      properties: { city: { type: 'string' } },
      required: ['city'],
    },
  },
  {
    name: 'add',
    description: 'Adds two numbers',
    parameters: {
      type: 'object',
      properties: { a: { type: 'number' }, b: { type: 'number' } },
      required: ['a', 'b'],
    },
  },
  {
    name: 'explode',
    description: 'Always fails',
    parameters: { type: 'object', properties: {} },
  },
];

function startProxy(backends) {
  let next = 0;
  const server = http.createServer((req, res) => {
    inFlight++;
    res.on('close', () => inFlight--);
    const backend = backends[next++ % backends.length];
    const target = new URL(req.url, backend);
    const entry = { path: req.url, backend: backends.indexOf(backend) };
    requests.push(entry);
    if (req.method === 'POST' && req.url === '/exec/programmatic') onExecutionPost();
    const upstream = http.request(
      target,
      { method: req.method, headers: req.headers },
      (up) => {
        entry.status = up.statusCode;
        res.writeHead(up.statusCode, up.headers);
        up.pipe(res);
      }
    );
    upstream.on('error', (err) => {
      entry.status = 502;
      res.writeHead(502).end(String(err));
    });
    req.pipe(upstream);
  });
  return new Promise((resolve) =>
    server.listen(0, '127.0.0.1', () => resolve(server))
  );
}

async function main() {
  const proxy = await startProxy(scenario.backends);
  const baseUrl = `http://127.0.0.1:${proxy.address().port}`;
  const factory =
    scenario.kind === 'bash'
      ? createBashProgrammaticToolCallingTool
      : createProgrammaticToolCallingTool;
  const ptc = factory({
    baseUrl,
    authHeaders: { 'X-API-Key': scenario.key },
    executionProfile: 'default',
    runTimeoutMs: 60000,
  });
  const args = { code: scenario.code };
  if (scenario.manifest !== undefined) args.tool_manifest = scenario.manifest;
  if (scenario.timeout !== undefined) args.timeout = scenario.timeout;
  const controller = new AbortController();
  if (scenario.abortAfterMs !== undefined) {
    onExecutionPost = () => {
      onExecutionPost = () => {};
      setTimeout(() => controller.abort(), scenario.abortAfterMs);
    };
  }
  const out = { requests, invocations };
  try {
    const message = await ptc.invoke(
      {
        name: ptc.name,
        args,
        id: 'call_ptc_1',
        type: 'tool_call',
        toolMap,
        toolDefs,
      },
      { signal: controller.signal }
    );
    out.ok = message.status !== 'error';
    out.content = message.content;
    out.artifact = message.artifact;
  } catch (error) {
    out.ok = false;
    out.error = String(error && error.message ? error.message : error);
  }
  // A best-effort cancel may still be on its way through the proxy: let it finish (bounded).
  const deadline = Date.now() + 3000;
  while (inFlight > 0 && Date.now() < deadline) {
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
  proxy.close();
  process.stdout.write(JSON.stringify(out) + '\n');
  process.exit(0);
}

main();
