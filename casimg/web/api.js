// The public HTTP API, called with the key in the X-API-Key header (never a cookie, never the page URL).
// Every failure becomes an ApiError whose message a person can act on.

const KEY_ITEM = "casimg.key";

export class ApiError extends Error {
  constructor(status, message, retryAfter = null) {
    super(message);
    this.status = status;
    this.retryAfter = retryAfter;
  }
}

export function storedKey() {
  return sessionStorage.getItem(KEY_ITEM);
}

export function storeKey(key) {
  sessionStorage.setItem(KEY_ITEM, key);
}

export function forgetKey() {
  sessionStorage.removeItem(KEY_ITEM);
}

async function problemDetail(response) {
  try {
    const body = await response.json();
    return body.detail || body.title || "";
  } catch {
    return "";
  }
}

// A message for a failed answer: what happened and what to do about it.
async function errorOf(response) {
  const detail = await problemDetail(response);
  const retry = response.headers.get("Retry-After");
  switch (response.status) {
    case 401:
      return new ApiError(401, "This API key is not known or was revoked. Enter a valid key.");
    case 403:
      return new ApiError(403, `This key may not do that (${detail || "forbidden"}).`);
    case 429:
      return new ApiError(429, `Too many requests: casimg asks to wait ${retry || "a few"} seconds, then try again.`
        + (detail ? ` (${detail})` : ""), retry ? Number(retry) : null);
    case 503:
      return new ApiError(503, `casimg is unavailable for a moment: ${detail || "try again shortly"}.`);
    default:
      return new ApiError(response.status, detail || `casimg answered ${response.status}.`);
  }
}

export class Api {
  constructor(key) {
    this.key = key;
  }

  async request(path, options = {}) {
    const headers = { "X-API-Key": this.key, ...(options.headers || {}) };
    let response;
    try {
      response = await fetch(path, { ...options, headers, credentials: "omit", referrerPolicy: "no-referrer" });
    } catch (error) {
      if (error.name === "AbortError") throw error;
      throw new ApiError(0, "casimg does not answer: is the server running?");
    }
    if (!response.ok) throw await errorOf(response);
    return response;
  }

  async json(path, options = {}) {
    return (await this.request(path, options)).json();
  }

  whoami() {
    return this.json("/api/key");
  }

  async page(url) {
    const response = await this.request(url);
    const total = response.headers.get("X-Total-Count");
    return { rows: await response.json(), total: total === null ? null : Number(total),
             next: nextLink(response.headers.get("Link"), response.url) };
  }

  submit(urls) {
    return this.json("/api/images", { method: "POST", headers: { "Content-Type": "application/json" },
                                      body: JSON.stringify({ image_urls: urls }) });
  }

  job(id) {
    return this.json(`/api/jobs/${encodeURIComponent(id)}`);
  }

  // How many URLs share these bytes (one lookup), and, only when others do, which (a walk of the index).
  async shared(digest) {
    const counted = await this.json(`/api/blobs/${digest}/urls?limit=0`);
    return counted.count > 1 ? this.json(`/api/blobs/${digest}/urls?limit=20`) : counted;
  }

  async remove(url) {
    await this.request(`/api/image?url=${encodeURIComponent(url)}`, { method: "DELETE" });
  }
}

// The rel="next" target of a Link header, resolved against the URL that was asked for (it is query-only).
export function nextLink(header, base) {
  if (!header) return null;
  for (const part of header.split(",")) {
    const match = part.match(/<([^>]*)>\s*;\s*rel="?next"?/);
    if (match) return new URL(match[1], base);
  }
  return null;
}

// What this server offers, read from its OpenAPI document (public, no key): the gallery uses newest-first
// order, filters and thumbnails where they exist and does without them where they do not.
export async function features() {
  const found = { recent: false, contains: false, host: false, prefix: false, variant: true };
  let document;
  try {
    const response = await fetch("/openapi.json", { credentials: "omit" });
    if (!response.ok) return found;
    document = await response.json();
  } catch {
    return found;
  }
  const params = (path, method) => (document.paths?.[path]?.[method]?.parameters || []);
  for (const param of params("/api/images", "get")) {
    if (param.name === "order") {
      const values = param.schema?.enum;
      found.recent = !values || values.includes("recent");
    }
    if (["contains", "host", "prefix"].includes(param.name)) found[param.name] = true;
  }
  // Thumbnails are tried unless the document lists the variant names and "thumb" is not one of them: a
  // server without variants ignores the parameter (the original comes), and one without the preset answers
  // 400, after which the loader asks for originals (images.js).
  const variant = params("/api/blobs/{digest}", "get").find((param) => param.name === "variant");
  const names = variant?.schema?.enum;
  found.variant = !Array.isArray(names) || names.includes("thumb");
  return found;
}
