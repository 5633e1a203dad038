// The dashboard's one client of the daemon: JSON calls, and event streams read with fetch
// (EventSource cannot send a key). Every call carries the API key, kept in this origin's
// storage by the login page (login.js); the page's cookie opens pages only.
const KEY = "pcrt-api-key";

export function savedKey() {
  return window.localStorage.getItem(KEY);
}

export function forgetKey() {
  window.localStorage.removeItem(KEY);
}

function withKey(headers) {
  const key = savedKey();
  return key ? { ...headers, Authorization: `Bearer ${key}` } : headers;
}

function toLogin() {
  forgetKey();
  window.location.assign("/ui/login");
  return new ApiError(401, "log in with the API key");
}

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function messageOf(body, status) {
  const error = body && body.error;
  if (typeof error === "string") return error;
  if (error && typeof error.message === "string") return error.message;
  return `HTTP ${status}`;
}

export async function api(path, { method = "GET", body, signal } = {}) {
  const headers = withKey({ Accept: "application/json" });
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    signal,
    credentials: "same-origin",
  });
  if (response.status === 401) throw toLogin();
  const text = await response.text();
  let parsed = null;
  try {
    parsed = text ? JSON.parse(text) : null;
  } catch {
    parsed = null;
  }
  if (!response.ok) throw new ApiError(response.status, messageOf(parsed, response.status));
  return parsed;
}

// The stream's reader once its headers came (the daemon listens before it sends them):
// what happens after this is in the stream.
export async function subscribe(path, signal) {
  const response = await fetch(path, { headers: withKey({}), signal, credentials: "same-origin" });
  if (response.status === 401) throw toLogin();
  if (!response.ok || !response.body) throw new ApiError(response.status, `HTTP ${response.status}`);
  return response.body.pipeThrough(new TextDecoderStream()).getReader();
}

// Calls onEvent({event, data}) for each event of a subscribed stream until it ends
// ([DONE], closed, or its fetch aborted); resolves then.
export async function read(reader, onEvent) {
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (!data.length) continue;
      const text = data.join("\n");
      if (text === "[DONE]") return;
      try {
        onEvent({ event, data: JSON.parse(text) });
      } catch (error) {
        if (!(error instanceof SyntaxError)) throw error;
      }
    }
  }
}
