// The rows of GET /api/images, page after page along Link: rel="next", for one order and filter.
// Pages are fetched one at a time, as far as the grid needs: a cursor can only be followed, not jumped.

const PAGE = 500; // rows per request: few round trips for a long scroll, a small JSON body each

export class Listing {
  constructor(api, query) {
    this.api = api;
    this.query = query; // {order, contains, host}: only those the server offers, empty ones left out
    // A filter's matches are not counted ahead: X-Total-Count stays the number of URLs indexed.
    this.filtered = Object.keys(query).some((name) => name !== "order" && query[name]);
    this.rows = [];
    this.total = null; // X-Total-Count (the server's count), until the last page says exactly
    this.next = this.firstUrl();
    this.loading = null;
    this.onChange = () => {};
  }

  firstUrl() {
    const url = new URL("/api/images", location.origin);
    url.searchParams.set("limit", String(PAGE));
    for (const [name, value] of Object.entries(this.query)) if (value) url.searchParams.set(name, value);
    return url;
  }

  get done() {
    return this.next === null;
  }

  // How many tiles the grid lays out: the total where the server gives it, else what is known so far and
  // one more, whose loading tile asks for the next page when it comes into view.
  get length() {
    if (this.done) return this.rows.length;
    if (this.filtered) return this.rows.length + 1;
    return Math.max(this.total ?? 0, this.rows.length + 1);
  }

  // Load pages until row `index` is known (or the listing ends).
  async ensure(index) {
    while (!this.done && index >= this.rows.length) {
      await this.loadMore();
    }
  }

  loadMore() {
    if (!this.loading) {
      this.loading = this.fetchPage().finally(() => { this.loading = null; });
    }
    return this.loading;
  }

  async fetchPage() {
    const page = await this.api.page(this.next);
    const next = page.next;
    if (next) {
      // A server that does not repeat the filters in its Link would drop them: keep ours.
      for (const [name, value] of Object.entries(this.query)) {
        if (value && !next.searchParams.has(name)) next.searchParams.set(name, value);
      }
    }
    this.rows.push(...page.rows);
    if (page.total !== null && !this.filtered) this.total = page.total;
    this.next = next; // a filtered page may hold no match and still have a next one
    this.onChange();
  }

  remove(url) {
    const at = this.rows.findIndex((row) => row.url === url);
    if (at < 0) return;
    this.rows.splice(at, 1);
    if (this.total !== null) this.total -= 1;
    this.onChange();
  }
}
