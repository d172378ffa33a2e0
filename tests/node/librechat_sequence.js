// LibreChat's real HTTP sequence against a Code API server (keepalive.md):
//   1. axios GET /files/{sid}?detail=summary with timeout 5000 (the call that taints the socket),
//   2. node-fetch POST /exec on Node's default global agent (reuses the pooled socket),
// both with the libraries and agent LibreChat uses. Prints one JSON line with the outcome.
//
// usage: node librechat_sequence.js <baseUrl> <apiKey> <code> [lang] [idleBeforeExecMs] [axiosHeaders]
//   axiosHeaders: 'librechat' (default: User-Agent LibreChat/1.0, as LibreChat sends) or 'default'
//   (axios's own User-Agent and Accept, as any other Node integration on axios would send)
'use strict';
const axios = require('axios');
const fetch = require('node-fetch');

async function main() {
  const [baseUrl, apiKey, code, lang = 'py', idleMs = '0', axiosHeaders = 'librechat'] = process.argv.slice(2);
  const started = Date.now();
  const result = { sockets: new Set() };
  const remember = (req) => req.on('socket', (s) => result.sockets.add(`${s.localPort}`));
  const http = require('http');
  const original = http.request;
  http.request = function patched(...args) { const req = original.apply(this, args); remember(req); return req; };

  try {
    const summary = await axios.get(`${baseUrl}/files/abcdefghijklmnopqrstu?detail=summary`, {
      timeout: 5000,
      headers: axiosHeaders === 'default' ? { 'X-API-Key': apiKey } : { 'X-API-Key': apiKey, 'User-Agent': 'LibreChat/1.0' },
    });
    result.summaryStatus = summary.status;
    if (Number(idleMs) > 0) await new Promise((r) => setTimeout(r, Number(idleMs)));
    const response = await fetch(`${baseUrl}/exec`, {
      method: 'POST',
      headers: { 'Content-Type': 'application/json', 'User-Agent': 'LibreChat/1.0', 'X-API-Key': apiKey },
      body: JSON.stringify({ lang, code, user_id: 'u1' }),
    });
    result.status = response.status;
    const text = await response.text();
    result.body = JSON.parse(text);
    result.ok = response.ok;
  } catch (err) {
    result.ok = false;
    result.error = `${err.name}: ${err.message}`;
  }
  result.elapsedMs = Date.now() - started;
  result.sockets = [...result.sockets];
  process.stdout.write(JSON.stringify(result) + '\n');
}

main();
