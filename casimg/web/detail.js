// The detail view of one image: the full image, what the index knows of it, the URLs sharing its bytes,
// a download link and (with a write key) delete. A modal <dialog>: Escape closes it, focus returns.

import { altText, formatBytes } from "./images.js";

const EXTENSIONS = { "image/jpeg": "jpg", "image/png": "png", "image/gif": "gif", "image/webp": "webp",
                     "image/avif": "avif" };

export class Detail {
  constructor(api, loader, canWrite, onDeleted) {
    this.api = api;
    this.loader = loader;
    this.canWrite = canWrite;
    this.onDeleted = onDeleted;
    this.dialog = document.getElementById("detail");
    this.row = null;
    this.opener = null;
    this.controller = null;
    const $ = (id) => document.getElementById(id);
    this.$ = $;
    $("detail-close").addEventListener("click", () => this.dialog.close());
    $("copy-url").addEventListener("click", () => this.copy());
    $("delete").addEventListener("click", () => this.confirm(true));
    $("confirm-cancel").addEventListener("click", () => this.confirm(false));
    $("confirm-delete").addEventListener("click", () => this.remove());
    this.dialog.addEventListener("close", () => {
      this.controller?.abort();
      this.opener?.focus();
    });
    // A click on the backdrop (outside the content) closes it too.
    this.dialog.addEventListener("click", (event) => { if (event.target === this.dialog) this.dialog.close(); });
  }

  open(row, opener) {
    const $ = this.$;
    this.row = row;
    this.opener = opener;
    this.controller?.abort();
    this.controller = new AbortController();
    const signal = this.controller.signal;
    $("detail-title").textContent = altText(row.url);
    const link = $("detail-url");
    link.textContent = row.url;
    link.href = /^https?:/i.test(row.url) ? row.url : "#";
    $("detail-digest").textContent = row.sha256;
    $("detail-size").textContent = formatBytes(row.size);
    $("detail-dims").textContent = row.width ? `${row.width} × ${row.height} pixels` : "unknown";
    $("detail-type").textContent = row.content_type;
    const time = $("detail-time");
    time.dateTime = row.stored_at;
    time.textContent = new Date(row.stored_at).toLocaleString();
    $("detail-shared").textContent = "…";
    $("detail-shared-list").replaceChildren();
    $("delete").hidden = !this.canWrite;
    $("confirm").hidden = true;
    $("detail-error").hidden = true;
    const img = $("detail-img");
    img.alt = altText(row.url);
    img.removeAttribute("src");
    if (row.width && row.height) {
      img.width = row.width;
      img.height = row.height;
    }
    const download = $("detail-download");
    download.removeAttribute("href");
    download.download = `${row.sha256.slice(0, 16)}.${EXTENSIONS[row.content_type] || "bin"}`;
    this.loader.original(row.sha256, signal).then((url) => {
      if (this.row !== row) return;
      img.src = url;
      download.href = url;
    }, (error) => this.fail(error));
    this.api.shared(row.sha256).then((shared) => this.showShared(row, shared), (error) => this.fail(error));
    if (!this.dialog.open) this.dialog.showModal();
    $("detail-close").focus();
  }

  showShared(row, shared) {
    if (this.row !== row) return;
    const others = shared.count - 1;
    this.$("detail-shared").textContent = others ? `${shared.count} (this one and ${others} more)` : "1 (only this one)";
    const list = this.$("detail-shared-list");
    list.replaceChildren(...shared.urls.filter((url) => url !== row.url).map((url) => {
      const item = document.createElement("li");
      item.textContent = url;
      return item;
    }));
    list.setAttribute("aria-label", "Other URLs with the same bytes");
  }

  async copy() {
    try {
      await navigator.clipboard.writeText(this.row.url);
      this.$("copy-url").textContent = "Copied";
    } catch {
      // No clipboard access (an insecure origin, or refused): select the text for Ctrl+C instead.
      getSelection().selectAllChildren(this.$("detail-url"));
      this.$("copy-url").textContent = "Selected: press Ctrl+C";
    }
    setTimeout(() => { this.$("copy-url").textContent = "Copy URL"; }, 2000);
  }

  confirm(show) {
    this.$("confirm").hidden = !show;
    (show ? this.$("confirm-cancel") : this.$("delete")).focus();
  }

  async remove() {
    const row = this.row;
    try {
      await this.api.remove(row.url);
    } catch (error) {
      if (error.status !== 404) return this.fail(error); // 404: gone already, which is what was asked
    }
    this.opener = null;
    this.dialog.close();
    this.onDeleted(row);
  }

  fail(error) {
    if (error.name === "AbortError") return;
    const box = this.$("detail-error");
    box.textContent = error.message;
    box.hidden = false;
  }
}
