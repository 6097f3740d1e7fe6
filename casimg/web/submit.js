// Adding images: URLs pasted one per line, or read from a dropped or chosen text/CSV file, sent as one
// job (POST /api/images); its progress is polled from GET /api/jobs/{id} until it is done.

const POLL = 700; // ms between looks at the job: live enough for a person, light for the server
const URL_RE = /^https?:\/\/\S+$/i;

// The URLs in a text: one per line; in a CSV line, every field that is an http(s) URL.
export function parseUrls(text) {
  const urls = [];
  for (const line of text.split(/\r?\n/)) {
    const trimmed = line.trim();
    if (!trimmed) continue;
    if (URL_RE.test(trimmed)) {
      urls.push(trimmed);
      continue;
    }
    for (const field of trimmed.split(/[,;\t]/)) {
      const value = field.trim().replace(/^"(.*)"$/, "$1");
      if (URL_RE.test(value)) urls.push(value);
    }
  }
  return [...new Set(urls)];
}

export class Submit {
  constructor(api, onProgress) {
    this.api = api;
    this.onProgress = onProgress;
    this.dialog = document.getElementById("add");
    const $ = (id) => document.getElementById(id);
    this.$ = $;
    $("add-close").addEventListener("click", () => this.dialog.close());
    $("add-form").addEventListener("submit", (event) => {
      event.preventDefault();
      this.send();
    });
    $("file").addEventListener("change", () => this.readFile($("file").files[0]));
    const form = $("add-form");
    form.addEventListener("dragover", (event) => {
      event.preventDefault();
      form.classList.add("dropping");
    });
    form.addEventListener("dragleave", () => form.classList.remove("dropping"));
    form.addEventListener("drop", (event) => {
      event.preventDefault();
      form.classList.remove("dropping");
      const file = event.dataTransfer?.files?.[0];
      if (file) this.readFile(file);
    });
  }

  open() {
    this.dialog.showModal();
    this.$("urls").focus();
  }

  async readFile(file) {
    if (!file) return;
    const urls = parseUrls(await file.text());
    const box = this.$("urls");
    box.value = [box.value.trim(), ...urls].filter(Boolean).join("\n");
  }

  async send() {
    const $ = this.$;
    const urls = parseUrls($("urls").value);
    $("add-error").hidden = true;
    if (!urls.length) return this.fail(new Error("No http(s) URLs found: put one per line."));
    $("add-submit").disabled = true;
    $("progress").hidden = false;
    $("failures").replaceChildren();
    $("progress-text").textContent = `Submitting ${urls.length} URL${urls.length > 1 ? "s" : ""}…`;
    try {
      const accepted = await this.api.submit(urls);
      await this.follow(accepted.job_id);
    } catch (error) {
      this.fail(error);
    } finally {
      $("add-submit").disabled = false;
    }
  }

  async follow(jobId) {
    let job;
    for (;;) {
      job = await this.api.job(jobId);
      this.show(job);
      this.onProgress(job);
      if (job.status === "done") break;
      await new Promise((resolve) => setTimeout(resolve, POLL));
    }
    this.$("urls").value = job.results.filter((r) => r.status === "failed").map((r) => r.url).join("\n");
  }

  show(job) {
    const $ = this.$;
    const bar = $("progress-bar");
    bar.max = job.total;
    bar.value = job.done;
    const state = job.status === "done" ? "Done" : "Working";
    $("progress-text").textContent = `${state}: ${job.done} of ${job.total}. Stored ${job.stored}, `
      + `existed ${job.existed}, failed ${job.failed}.`;
    const failed = job.results.filter((result) => result.status === "failed");
    const list = $("failures");
    if (list.childElementCount !== failed.length) {
      list.replaceChildren(...failed.map((result) => {
        const item = document.createElement("li");
        const url = document.createElement("code");
        url.textContent = result.url;
        item.append(url, `: ${result.error}`);
        return item;
      }));
    }
  }

  fail(error) {
    const box = this.$("add-error");
    box.textContent = error.message;
    box.hidden = false;
  }
}
