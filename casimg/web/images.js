// Image bytes for <img> elements. An <img> cannot send a header, so each image is fetched with the key
// and shown through a blob: URL. Fetches go through the browser's HTTP cache: /api/blobs/{digest} is
// immutable, so an image seen once is not downloaded again while the cache keeps it.

import { thumbHashToDataURL } from "./vendor/thumbhash.js";

const PARALLEL = 6; // fetches in flight at once, as a browser allows per host over HTTP/1.1
const KEPT = 600;
const IMAGE_ACCEPT = "image/avif,image/webp,image/apng,image/*,*/*;q=0.8"; // what Chromium sends for <img> // object URLs kept for reuse; older ones are revoked so memory stays bounded

export class ImageLoader {
  constructor(api, useThumbs) {
    this.api = api;
    this.useThumbs = useThumbs; // the server offers ?variant=thumb; false after it refuses one
    this.urls = new Map(); // cache key -> object URL, in least-recently-used order
    this.waiting = []; // [{cacheKey, digest, thumb, resolve, reject, signal}]
    this.running = 0;
  }

  // An object URL for the image's thumbnail (or the original where there is no thumb preset).
  thumb(digest, signal) {
    return this.get(digest, this.useThumbs, signal);
  }

  original(digest, signal) {
    return this.get(digest, false, signal);
  }

  get(digest, thumb, signal) {
    const cacheKey = (thumb ? "t:" : "o:") + digest;
    const known = this.urls.get(cacheKey);
    if (known) {
      this.urls.delete(cacheKey);
      this.urls.set(cacheKey, known);
      return Promise.resolve(known);
    }
    return new Promise((resolve, reject) => {
      this.waiting.push({ cacheKey, digest, thumb, resolve, reject, signal });
      this.pump();
    });
  }

  pump() {
    while (this.running < PARALLEL && this.waiting.length) {
      // Newest request first: the tiles on screen now, not those scrolled past.
      const job = this.waiting.pop();
      if (job.signal?.aborted) {
        job.reject(new DOMException("aborted", "AbortError"));
        continue;
      }
      this.running += 1;
      this.fetchOne(job).then(job.resolve, job.reject).finally(() => {
        this.running -= 1;
        this.pump();
      });
    }
  }

  async fetchOne(job) {
    const known = this.urls.get(job.cacheKey);
    if (known) return known;
    let response;
    const thumb = job.thumb && this.useThumbs;
    try {
      // fetch() sends Accept: */*; a thumbnail of format auto is AVIF or WebP only if the browser says it
      // takes them, as it does for an <img>.
      response = await this.api.request(`/api/blobs/${job.digest}${thumb ? "?variant=thumb" : ""}`,
                                        { signal: job.signal, headers: thumb ? { Accept: IMAGE_ACCEPT } : {} });
    } catch (error) {
      if (thumb && error.status === 400) {
        this.useThumbs = false; // no thumb preset here (or variants off): originals from now on
        return this.fetchOne({ ...job, thumb: false });
      }
      throw error;
    }
    const url = URL.createObjectURL(await response.blob());
    this.urls.set(job.cacheKey, url);
    while (this.urls.size > KEPT) {
      const [oldest, oldUrl] = this.urls.entries().next().value;
      this.urls.delete(oldest);
      URL.revokeObjectURL(oldUrl);
    }
    return url;
  }
}

// A data: URL of the blurred picture a listing row's ThumbHash describes, or null.
export function placeholderUrl(row) {
  if (!row.placeholder) return null;
  try {
    const bytes = Uint8Array.from(atob(row.placeholder), (c) => c.charCodeAt(0));
    return thumbHashToDataURL(bytes);
  } catch {
    return null;
  }
}

// Alt text from the URL: its file name and host, which is what a person would recognise it by.
export function altText(url) {
  try {
    const parsed = new URL(url);
    const name = decodeURIComponent(parsed.pathname.split("/").filter(Boolean).pop() || parsed.pathname);
    return `${name} from ${parsed.host}`;
  } catch {
    return url;
  }
}

export function formatBytes(size) {
  if (size < 1024) return `${size} bytes`;
  const units = ["KiB", "MiB", "GiB"];
  let value = size / 1024;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${value.toFixed(value < 10 ? 1 : 0)} ${units[unit]} (${size.toLocaleString("en")} bytes)`;
}
