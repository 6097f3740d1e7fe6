// The gallery's start: ask for a key once, learn what the key and the server allow, then show the grid.

import { Api, ApiError, features, forgetKey, storedKey, storeKey } from "./api.js";
import { Detail } from "./detail.js";
import { Grid } from "./grid.js";
import { ImageLoader } from "./images.js";
import { Listing } from "./listing.js";
import { Submit } from "./submit.js";

const $ = (id) => document.getElementById(id);
const FILTER_DELAY = 300; // ms of no typing before a filter is applied
const REFRESH_EVERY = 2000; // ms between grid refreshes while a job stores images

let api = null;
let offered = null;
let grid = null;
let listing = null;
let lastRefresh = 0;

function alertBox(message) {
  const box = $("alert");
  box.textContent = message || "";
  box.hidden = !message;
}

function announce(message) {
  $("status").textContent = message;
}

function showKeyForm(message) {
  $("gallery").hidden = true;
  $("filters").hidden = true;
  $("add-open").hidden = true;
  $("forget").hidden = true;
  $("total").textContent = "";
  $("key-form").hidden = false;
  const error = $("key-error");
  error.textContent = message || "";
  error.hidden = !message;
  $("key").focus();
}

async function start(key) {
  const candidate = new Api(key);
  let who;
  try {
    [who, offered] = await Promise.all([candidate.whoami(), offered || features()]);
  } catch (error) {
    if (error.status === 401 || error.status === 403) forgetKey();
    showKeyForm(error.message);
    return;
  }
  storeKey(key);
  if (api) {
    location.reload(); // a new key after one was refused mid-session: start over with it
    return;
  }
  api = candidate;
  const canWrite = who.scope === "write" || who.scope === "admin";
  $("key-form").hidden = true;
  $("key").value = "";
  $("gallery").hidden = false;
  $("forget").hidden = false;
  $("add-open").hidden = !canWrite;
  $("filters").hidden = !(offered.contains || offered.host || offered.recent);
  $("contains").hidden = $("contains").labels[0].hidden = !offered.contains;
  $("host").hidden = $("host").labels[0].hidden = !offered.host;
  $("order").hidden = $("order").labels[0].hidden = !offered.recent;
  const loader = new ImageLoader(api, offered.variant);
  const detail = new Detail(api, loader, canWrite, (row) => {
    listing.remove(row.url);
    announce(`Deleted ${row.url}`);
    grid.focusFirst();
  });
  grid = new Grid($("grid"), loader, (row, tile) => detail.open(row, tile));
  const submit = new Submit(api, (job) => {
    const now = Date.now();
    if (job.status === "done" || now - lastRefresh > REFRESH_EVERY) {
      lastRefresh = now;
      if (job.stored || job.status === "done") refresh();
    }
  });
  $("add-open").onclick = () => submit.open();
  refresh();
}

function query() {
  const wanted = {};
  if (offered.recent && $("order").value) wanted.order = $("order").value;
  if (offered.contains && $("contains").value.trim()) wanted.contains = $("contains").value.trim();
  if (offered.host && $("host").value.trim()) wanted.host = hostOnly($("host").value);
  return wanted;
}

// The host as the filter compares it: lowercase, without a port, an IPv6 address without its brackets.
function hostOnly(text) {
  const host = text.trim().toLowerCase().replace(/^[a-z]+:\/\//, "").split("/")[0];
  if (host.startsWith("[")) return host.slice(1, host.indexOf("]") > 0 ? host.indexOf("]") : undefined);
  return (host.match(/:/g) || []).length === 1 ? host.split(":")[0] : host;
}

function refresh() {
  const next = new Listing(api, query());
  const update = () => {
    const count = next.done || next.filtered ? next.rows.length : next.total;
    if (count !== null) {
      const partial = next.filtered && !next.done; // matches are counted as the pages come
      const images = `${count.toLocaleString("en")}${partial ? "+" : ""} image${count === 1 && !partial ? "" : "s"}`;
      const verb = count === 1 && !partial ? "matches" : "match";
      $("total").textContent = next.filtered ? `${images} ${verb}${partial ? " so far" : ""}` : images;
    }
    $("empty").hidden = !(next.done && next.rows.length === 0);
    $("empty").textContent = next.filtered ? "No stored image matches." : "No images stored yet.";
  };
  listing = next;
  grid.show(next);
  const onChange = next.onChange;
  next.onChange = () => { onChange(); update(); };
  next.loadMore().catch(showError);
}

function showError(error) {
  if (error instanceof ApiError && error.status === 401) {
    forgetKey();
    return showKeyForm(error.message);
  }
  alertBox(error.message);
}

function main() {
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("key").value.trim();
    if (key) start(key);
  });
  $("forget").addEventListener("click", () => {
    forgetKey();
    location.reload();
  });
  let timer = 0;
  $("filters").addEventListener("submit", (event) => event.preventDefault());
  $("filters").addEventListener("input", () => {
    clearTimeout(timer);
    timer = setTimeout(() => { alertBox(""); refresh(); }, FILTER_DELAY);
  });
  $("grid").addEventListener("listing-error", (event) => showError(event.detail));
  const key = storedKey();
  if (key) start(key); else showKeyForm();
}

main();
