'use strict';
/**
 * A Node.js client for the hashret retrieval service (hashret.v1.Retrieval over gRPC).
 *
 * The service definition is read at run time from the repository's
 * protos/hashret/v1/retrieval.proto (found relative to this file, or at HASHRET_PROTO), so the
 * client never drifts from the server's contract and needs no generated code.
 *
 *   const { RetrievalClient } = require('./clients/node');
 *   const c = new RetrievalClient('127.0.0.1:50051', { token: process.env.HASHRET_TOKEN });
 *   const hits = await c.search(fs.readFileSync('photo.jpg'), { k: 5 });
 */
const fs = require('fs');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO = process.env.HASHRET_PROTO
  || path.resolve(__dirname, '..', '..', 'protos', 'hashret', 'v1', 'retrieval.proto');
const DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024;

let cached = null;
function loadProto() {
  if (cached) return cached;
  if (!fs.existsSync(PROTO)) {
    throw new Error(`${PROTO} | the service definition is missing: run from a hashret checkout or set HASHRET_PROTO`);
  }
  // keepCase: field names as in the .proto (model_id, max_distance), like the Python client;
  // longs as Number: counts and sizes stay far below 2^53.
  const def = protoLoader.loadSync(PROTO, { keepCase: true, longs: Number, enums: String, defaults: true, oneofs: true });
  cached = grpc.loadPackageDefinition(def).hashret.v1;
  return cached;
}

function pem(v) {
  if (v === undefined || v === null) return null;
  return Buffer.isBuffer(v) ? v : fs.readFileSync(v);
}

function imageBytes(image) {
  if (Buffer.isBuffer(image) || image instanceof Uint8Array) return Buffer.from(image);
  if (typeof image === 'string') return fs.readFileSync(image);
  throw new TypeError('image | expected a Buffer or a file path');
}

function hits(list) {
  return (list || []).map((h) => ({ id: h.id, distance: h.distance, metadata: { ...h.metadata } }));
}

class RetrievalClient {
  /**
   * @param {string} addr host:port of the server
   * @param {object} [opts]
   * @param {string} [opts.token] bearer token: Upsert/Delete need it, reads when the server asks
   * @param {boolean|object} [opts.tls] false: plaintext; true: TLS with the system roots;
   *   {ca, cert, key, serverName}: PEM paths or Buffers (cert+key for mutual TLS)
   * @param {number} [opts.timeout] default deadline per call in seconds (default 30)
   */
  constructor(addr, opts = {}) {
    const pb = loadProto();
    this.addr = addr;
    this.timeout = opts.timeout === undefined ? 30 : opts.timeout;
    this.token = opts.token || null;
    const maxBytes = opts.maxMessageBytes || DEFAULT_MAX_MESSAGE_BYTES;
    const options = { 'grpc.max_receive_message_length': maxBytes, 'grpc.max_send_message_length': maxBytes };
    let creds;
    if (opts.tls) {
      const t = opts.tls === true ? {} : opts.tls;
      creds = grpc.credentials.createSsl(pem(t.ca), pem(t.key), pem(t.cert));
      if (t.serverName) options['grpc.ssl_target_name_override'] = t.serverName;
    } else {
      creds = grpc.credentials.createInsecure();
    }
    this.stub = new pb.Retrieval(addr, creds, options);
  }

  _metadata() {
    const md = new grpc.Metadata();
    if (this.token) md.set('authorization', `Bearer ${this.token}`);
    return md;
  }

  _options(timeout) {
    const s = timeout === undefined ? this.timeout : timeout;
    return s ? { deadline: new Date(Date.now() + s * 1000) } : {};
  }

  _unary(method, request, timeout) {
    return new Promise((resolve, reject) => {
      this.stub[method](request, this._metadata(), this._options(timeout), (err, resp) => (err ? reject(err) : resolve(resp)));
    });
  }

  static _request(image, k, maxDistance) {
    const req = { image: imageBytes(image), k };
    if (maxDistance !== undefined && maxDistance !== null) req.max_distance = maxDistance;
    return req;
  }

  /** Nearest gallery items to one image: {hits: [{id, distance, metadata}], model_id}. */
  async search(image, { k = 10, maxDistance, timeout } = {}) {
    const r = await this._unary('Search', RetrievalClient._request(image, k, maxDistance), timeout);
    return { hits: hits(r.hits), model_id: r.model_id };
  }

  /** One result per image, in order: {hits} or {error: {code, status, message}} for a refused image. */
  async searchBatch(images, { k = 10, maxDistance, timeout } = {}) {
    const items = images.map((i) => RetrievalClient._request(i, k, maxDistance));
    const r = await this._unary('SearchBatch', { items }, timeout);
    const results = r.results.map((x) => (x.result === 'error'
      ? { error: { code: x.error.code, status: x.error.status, message: x.error.message } }
      : { hits: hits(x.hits.hits) }));
    return { results, model_id: r.model_id };
  }

  /** The packed code of one image: {code: Buffer, bits, model_id}. */
  async encode(image, { timeout } = {}) {
    const r = await this._unary('Encode', { image: imageBytes(image) }, timeout);
    return { code: r.code, bits: r.bits, model_id: r.model_id };
  }

  /**
   * Add or replace items, all or nothing; each is {id, image (Buffer|path) | code (Buffer), metadata}.
   * Needs the token. Resolves to {count, gallery_size}.
   */
  upsert(items, { timeout } = {}) {
    return new Promise((resolve, reject) => {
      const call = this.stub.Upsert(this._metadata(), this._options(timeout), (err, resp) => (err ? reject(err) : resolve(resp)));
      try {
        for (const it of items) {
          const msg = { id: it.id, metadata: { ...(it.metadata || {}) } };
          if (it.code !== undefined && it.code !== null) msg.code = Buffer.from(it.code);
          if (it.image !== undefined && it.image !== null) msg.image = imageBytes(it.image);
          call.write(msg);
        }
      } catch (e) {
        call.cancel();
        reject(e);
        return;
      }
      call.end();
    });
  }

  /** Remove ids (needs the token); {count, gallery_size}. */
  delete(ids, { timeout } = {}) {
    return this._unary('Delete', { ids }, timeout);
  }

  /** Model, backend, gallery and limits of the server. */
  info({ timeout } = {}) {
    return this._unary('Info', {}, timeout);
  }

  close() {
    this.stub.close();
  }
}

module.exports = { RetrievalClient, loadProto, PROTO, status: grpc.status };
