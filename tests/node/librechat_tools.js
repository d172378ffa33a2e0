// Drive the real `execute_code` and `bash_tool` tools of @librechat/agents 3.9.x against a Code API
// server, as a LibreChat host would build them (factory params, per-request auth headers).
//
// usage: node librechat_tools.js <steps.json>
//   steps: [{ "tool": "execute_code" | "bash_tool", "params": {factory params: baseUrl,
//             executionProfile, statefulSessions, runtimeSessionHint, files, ...},
//             "authHeaders": {...}, "input": {lang, code, args} | {command, args} }]
// Prints one JSON line: [{ "content", "artifact" } | { "error" }] in step order.
'use strict';
const fs = require('fs');
const { createCodeExecutionTool, createBashExecutionTool } = require('@librechat/agents');

async function runStep(step, index) {
  const factory = step.tool === 'bash_tool' ? createBashExecutionTool : createCodeExecutionTool;
  const headers = step.authHeaders || {};
  // LibreChat passes an async provider, resolved again for every request.
  const tool = factory({ ...step.params, authHeaders: async () => headers });
  try {
    const message = await tool.invoke({ id: `call_${index}`, name: tool.name, args: step.input, type: 'tool_call' });
    return { content: message.content, artifact: message.artifact ?? null };
  } catch (err) {
    return { error: String(err && err.message ? err.message : err) };
  }
}

async function main() {
  const steps = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
  const results = [];
  for (let i = 0; i < steps.length; i += 1) results.push(await runStep(steps[i], i));
  process.stdout.write(JSON.stringify(results) + '\n');
}

main().catch((err) => { process.stderr.write(String(err && err.stack ? err.stack : err) + '\n'); process.exit(1); });
