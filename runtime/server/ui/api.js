// The dashboard's one client of the daemon: JSON calls, and event streams read with fetch
// (EventSource cannot send the header that calls which change state need).
const UI_HEADER = { "X-PC-UI": "1" };

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
  const headers = { ...UI_HEADER, Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    signal,
    credentials: "same-origin",
  });
  if (response.status === 401) {
    window.location.assign("/ui/login");
    throw new ApiError(401, "log in with the API key");
  }
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

// Calls onEvent({event, data}) for each server-sent event until the stream ends ([DONE]
// or closed) or signal aborts; resolves then.
export async function follow(path, onEvent, signal) {
  const response = await fetch(path, { headers: UI_HEADER, signal, credentials: "same-origin" });
  if (!response.ok || !response.body) throw new ApiError(response.status, `HTTP ${response.status}`);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
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
