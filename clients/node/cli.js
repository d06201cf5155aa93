#!/usr/bin/env node
'use strict';
/**
 * hashret-node: call a hashret server from the command line; prints one JSON document.
 *
 *   node cli.js search ADDR IMAGE [-k N] [--max-distance D]
 *   node cli.js search-batch ADDR IMAGE... [-k N]
 *   node cli.js encode ADDR IMAGE
 *   node cli.js upsert ADDR --id ID (--image FILE | --code HEX) [--meta KEY=VALUE]...
 *   node cli.js info ADDR
 * common: --token-file F (or $HASHRET_TOKEN), --ca PEM, --cert PEM --key PEM, --server-name N, --timeout S
 *
 * A gRPC error prints {"error": {"code": N, "status": "NAME", "details": "..."}} and exits 1;
 * bad usage exits 2.
 */
const fs = require('fs');
const { RetrievalClient, status } = require('./index');

const USAGE = 'usage: cli.js {search|search-batch|encode|upsert|info} ADDR [IMAGE...] [options] (see the header of cli.js)';

function parse(argv) {
  const a = { positional: [], meta: {}, k: 10 };
  for (let i = 0; i < argv.length; i += 1) {
    const arg = argv[i];
    const next = () => {
      if (i + 1 >= argv.length) throw new Error(`${arg} needs a value`);
      i += 1;
      return argv[i];
    };
    switch (arg) {
      case '-k': case '--k': a.k = Number(next()); break;
      case '--max-distance': a.maxDistance = Number(next()); break;
      case '--token-file': a.token = fs.readFileSync(next(), 'utf8').trim(); break;
      case '--ca': a.ca = next(); break;
      case '--cert': a.cert = next(); break;
      case '--key': a.key = next(); break;
      case '--server-name': a.serverName = next(); break;
      case '--timeout': a.timeout = Number(next()); break;
      case '--id': a.id = next(); break;
      case '--image': a.image = next(); break;
      case '--code': a.code = Buffer.from(next(), 'hex'); break;
      case '--meta': {
        const kv = next();
        const eq = kv.indexOf('=');
        if (eq < 1) throw new Error(`--meta ${kv} | expected KEY=VALUE`);
        a.meta[kv.slice(0, eq)] = kv.slice(eq + 1);
        break;
      }
      default:
        if (arg.startsWith('-')) throw new Error(`unknown option ${arg}`);
        a.positional.push(arg);
    }
  }
  return a;
}

async function main(argv) {
  let a;
  try {
    a = parse(argv);
    if (a.positional.length < 2) throw new Error('missing command or ADDR');
  } catch (e) {
    process.stderr.write(`${e.message}\n${USAGE}\n`);
    return 2;
  }
  const [cmd, addr, ...images] = a.positional;
  const tls = a.ca || a.cert ? { ca: a.ca, cert: a.cert, key: a.key, serverName: a.serverName } : false;
  const client = new RetrievalClient(addr, { token: a.token || process.env.HASHRET_TOKEN, tls, timeout: a.timeout });
  const opts = { k: a.k, maxDistance: a.maxDistance };
  let out;
  try {
    switch (cmd) {
      case 'search': out = await client.search(images[0], opts); break;
      case 'search-batch': out = await client.searchBatch(images, opts); break;
      case 'encode': {
        const r = await client.encode(images[0]);
        out = { code: r.code.toString('hex'), bits: r.bits, model_id: r.model_id };
        break;
      }
      case 'upsert':
        out = await client.upsert([{ id: a.id, image: a.image, code: a.code, metadata: a.meta }]);
        break;
      case 'info': out = await client.info(); break;
      default:
        process.stderr.write(`unknown command ${cmd}\n${USAGE}\n`);
        return 2;
    }
  } catch (e) {
    if (typeof e.code !== 'number') throw e;
    const name = Object.keys(status).find((n) => status[n] === e.code) || String(e.code);
    process.stdout.write(`${JSON.stringify({ error: { code: e.code, status: name, details: e.details } })}\n`);
    return 1;
  } finally {
    client.close();
  }
  process.stdout.write(`${JSON.stringify(out)}\n`);
  return 0;
}

main(process.argv.slice(2)).then((code) => { process.exitCode = code; }, (e) => {
  process.stderr.write(`${e.stack || e}\n`);
  process.exitCode = 2;
});
