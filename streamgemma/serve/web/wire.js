// The streaming protocol (docs/protocol.md) over the browser's WebSocket:
// requests with ids matched to their replies, and generations whose token
// events are routed to a callback. No UI here; app.js uses it.

export const SUBPROTOCOL = "streamgemma.v1";

export class WireError extends Error {
  constructor(code, message, field) {
    super(message);
    this.code = code;
    this.field = field;
  }
}

// The token as a subprotocol name: "bearer." + unpadded base64url of its UTF-8
// bytes (a browser cannot set an Authorization header on a WebSocket).
export function bearerSubprotocol(token) {
  let binary = "";
  for (const byte of new TextEncoder().encode(token)) binary += String.fromCharCode(byte);
  return "bearer." + btoa(binary).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

export function streamUrl(location) {
  return `${location.protocol === "https:" ? "wss:" : "ws:"}//${location.host}/v1/stream`;
}

export class Wire {
  constructor(url, token) {
    this.url = url;
    this.token = token;
    this.nextId = 1;
    this.replies = new Map(); // request id -> {resolve, reject}
    this.generations = new Map(); // session id -> {requestId, onTokens, resolve, reject}
    this.onclose = null; // (event) => void, once an open connection ends
    this.ws = null;
  }

  // Resolves once the websocket is open; rejects with WireError("refused") if
  // the handshake fails (the page cannot see the HTTP status of a refusal).
  connect() {
    const protocols = this.token ? [SUBPROTOCOL, bearerSubprotocol(this.token)] : [];
    return new Promise((resolve, reject) => {
      let opened = false;
      const ws = new WebSocket(this.url, protocols);
      this.ws = ws;
      ws.onopen = () => { opened = true; resolve(this); };
      ws.onmessage = (event) => this.route(event.data);
      ws.onclose = (event) => {
        const error = new WireError("connection_closed", closeText(event));
        for (const reply of this.replies.values()) reply.reject(error);
        for (const gen of this.generations.values()) gen.reject(error);
        this.replies.clear();
        this.generations.clear();
        if (!opened) reject(new WireError("refused", "the server refused the connection"));
        else if (this.onclose) this.onclose(event);
      };
    });
  }

  get open() {
    return this.ws !== null && this.ws.readyState === WebSocket.OPEN;
  }

  close() {
    if (this.ws) this.ws.close(1000, "closed by the page");
  }

  send(msg) {
    if (!this.open) throw new WireError("connection_closed", "not connected");
    this.ws.send(JSON.stringify(msg));
  }

  // Sends msg with a fresh id; resolves with the reply event, rejects with a
  // WireError for an error event.
  request(msg) {
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.replies.set(id, { resolve, reject });
      try {
        this.send({ ...msg, id });
      } catch (error) {
        this.replies.delete(id);
        reject(error);
      }
    });
  }

  // Starts a generation on session; onTokens(ids, texts, finishReason) is called
  // for every token frame. Resolves with the `done` event.
  generate(session, params, onTokens) {
    if (this.generations.has(session)) {
      return Promise.reject(new WireError("generating", "a generation is already running on this session"));
    }
    const requestId = this.nextId++;
    return new Promise((resolve, reject) => {
      this.generations.set(session, { requestId, onTokens, resolve, reject });
      try {
        this.send({ type: "generate", id: requestId, session, coalesce: true, ...params });
      } catch (error) {
        this.generations.delete(session);
        reject(error);
      }
    });
  }

  route(data) {
    let msg;
    try {
      msg = JSON.parse(data);
    } catch {
      return;
    }
    const gen = this.generations.get(msg.session);
    if (gen && (msg.type === "token" || msg.type === "tokens")) {
      if (msg.type === "token") gen.onTokens([msg.id], [msg.text], msg.finish_reason);
      else gen.onTokens(msg.ids, msg.texts, msg.finish_reason);
      return;
    }
    if (msg.type === "done" || msg.type === "error") {
      // done and error carry the generate request's id (an error may lack the session).
      for (const [session, ended] of this.generations) {
        if (ended.requestId !== msg.id) continue;
        this.generations.delete(session);
        if (msg.type === "done") ended.resolve(msg);
        else ended.reject(new WireError(msg.code, msg.message, msg.field));
        return;
      }
    }
    const reply = this.replies.get(msg.id);
    if (reply) {
      this.replies.delete(msg.id);
      if (msg.type === "error") reply.reject(new WireError(msg.code, msg.message, msg.field));
      else reply.resolve(msg);
    }
    // Anything else answers a request sent without an id (cancel): nothing waits for it.
  }
}

function closeText(event) {
  const reason = event.reason ? `: ${event.reason}` : "";
  return `the connection closed (code ${event.code}${reason})`;
}
