// The grid: square tiles in rows, of which only those near the viewport exist in the DOM. Tiles leaving
// the view are reused for the ones entering it, so 100,000 images cost the DOM no more than a screenful.

import { altText, placeholderUrl } from "./images.js";

const GAP = 8; // px between tiles
const OVERSCAN = 3; // rows laid out above and below the viewport, so a quick scroll shows no blank rows
const PAGE_AHEAD = 2; // rows past the known ones that start loading the next page

export class Grid {
  constructor(element, loader, onOpen) {
    this.element = element;
    this.loader = loader;
    this.onOpen = onOpen;
    this.listing = null;
    this.tiles = new Map(); // row index -> tile element
    this.spare = [];
    this.columns = 1;
    this.size = 100;
    this.frame = 0;
    const schedule = () => this.schedule();
    addEventListener("scroll", schedule, { passive: true });
    addEventListener("resize", () => { this.measure(); this.schedule(); });
  }

  show(listing) {
    for (const tile of this.tiles.values()) this.release(tile);
    this.tiles.clear();
    this.listing = listing;
    listing.onChange = () => this.schedule();
    this.measure();
    this.schedule();
  }

  measure() {
    const width = this.element.clientWidth || document.documentElement.clientWidth;
    const smallest = width < 600 ? 104 : 168; // px: three columns on a phone, more on a desktop
    this.columns = Math.max(2, Math.floor((width + GAP) / (smallest + GAP)));
    this.size = Math.floor((width - GAP * (this.columns - 1)) / this.columns);
  }

  schedule() {
    if (!this.frame) this.frame = requestAnimationFrame(() => { this.frame = 0; this.render(); });
  }

  render() {
    const listing = this.listing;
    if (!listing) return;
    const count = listing.length;
    const step = this.size + GAP;
    const rows = Math.ceil(count / this.columns);
    this.element.style.height = `${Math.max(0, rows * step - GAP)}px`;
    const top = this.element.getBoundingClientRect().top;
    const first = Math.max(0, Math.floor(-top / step) - OVERSCAN);
    const last = Math.min(rows - 1, Math.floor((innerHeight - top) / step) + OVERSCAN);
    const from = first * this.columns;
    const to = Math.min(count, (last + 1) * this.columns);
    for (const [index, tile] of this.tiles) {
      if (index < from || index >= to || index >= count) {
        this.release(tile);
        this.tiles.delete(index);
      }
    }
    for (let index = from; index < to; index += 1) {
      const row = listing.rows[index];
      let tile = this.tiles.get(index);
      if (tile && tile.row !== (row || null)) {
        this.release(tile);
        tile = null;
      }
      if (!tile) {
        tile = this.acquire();
        this.tiles.set(index, tile);
        this.fill(tile, row);
      }
      tile.style.transform = `translate(${(index % this.columns) * step}px, ${Math.floor(index / this.columns) * step}px)`;
      tile.style.width = tile.style.height = `${this.size}px`;
      if (row) this.fit(tile, row);
    }
    this.orderForKeyboard(from, to);
    if (!listing.done && to + PAGE_AHEAD * this.columns > listing.rows.length) {
      listing.ensure(Math.min(count - 1, to + PAGE_AHEAD * this.columns)).catch((error) => this.report(error));
    }
  }

  report(error) {
    this.element.dispatchEvent(new CustomEvent("listing-error", { detail: error, bubbles: true }));
  }

  // Tab follows the grid's reading order, whichever recycled elements hold the tiles.
  orderForKeyboard(from, to) {
    let previous = null;
    for (let index = from; index < to; index += 1) {
      const tile = this.tiles.get(index);
      if (!tile) continue;
      if (previous ? previous.nextSibling !== tile : this.element.firstChild !== tile) {
        if (tile.contains(document.activeElement)) continue; // moving it would drop the focus
        if (previous) previous.after(tile); else this.element.prepend(tile);
      }
      previous = tile;
    }
  }

  acquire() {
    const tile = this.spare.pop();
    if (tile) {
      tile.hidden = false;
      return tile;
    }
    const button = document.createElement("button");
    button.type = "button";
    button.className = "tile";
    const img = document.createElement("img");
    img.decoding = "async";
    button.append(img);
    button.addEventListener("click", () => { if (button.row) this.onOpen(button.row, button); });
    this.element.append(button);
    return button;
  }

  release(tile) {
    tile.controller?.abort();
    tile.controller = null;
    tile.row = null;
    tile.hidden = true;
    const img = tile.firstChild;
    img.removeAttribute("src");
    this.spare.push(tile);
  }

  fill(tile, row) {
    tile.row = row || null;
    const img = tile.firstChild;
    tile.disabled = !row;
    tile.classList.toggle("loading", !row);
    tile.classList.remove("broken");
    if (!row) {
      img.removeAttribute("src");
      img.classList.add("pending");
      img.alt = "";
      tile.setAttribute("aria-label", "Loading");
      return;
    }
    tile.removeAttribute("aria-label");
    img.alt = altText(row.url);
    // Space reserved from the stored size, so nothing moves when the bytes arrive.
    if (row.width && row.height) {
      img.width = row.width;
      img.height = row.height;
    }
    // The placeholder stands in for the image until its bytes come; without one, the tile stays empty.
    const placeholder = placeholderUrl(row);
    if (placeholder) img.src = placeholder; else img.removeAttribute("src");
    img.classList.toggle("pending", !placeholder);
    const controller = new AbortController();
    tile.controller = controller;
    this.loader.thumb(row.sha256, controller.signal).then((url) => {
      if (tile.row !== row) return;
      img.src = url;
      img.classList.remove("pending");
    }, (error) => {
      if (tile.row === row) tile.classList.add("broken");
      // A refused key or a rate limit concerns the whole page: say so once, above the grid.
      if ([401, 403, 429].includes(error.status)) this.report(error);
    });
  }

  fit(tile, row) {
    const img = tile.firstChild;
    const inner = this.size - 8;
    const w = row.width || 1;
    const h = row.height || 1;
    const scale = Math.min(inner / w, inner / h);
    img.style.width = `${Math.max(1, Math.round(w * scale))}px`;
    img.style.height = `${Math.max(1, Math.round(h * scale))}px`;
  }

  focusFirst() {
    const first = this.tiles.get(0) || [...this.tiles.values()][0];
    first?.focus();
  }
}
