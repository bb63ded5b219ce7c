"use strict";
// The recent conversations, kept up to date by /ui/api/conversations/events.
(() => {
  const { el, header, statusBadge, when, took, live } = window.mesh;
  const body = document.querySelector("#conversations tbody");

  function row(c) {
    const tr = el("tr");
    tr.dataset.conversation = c.id;
    const link = el("a", "mono", c.id);
    link.href = `/ui/c/${encodeURIComponent(c.id)}`;
    const first = el("td");
    first.append(link);
    const status = el("td");
    status.append(statusBadge(c.status));
    tr.append(
      first,
      el("td", "", when(c.started)),
      status,
      el("td", "num", took(c.duration)),
      el("td", "num messages", c.messages),
      el("td", "num", c.input_tokens + c.output_tokens),
      el("td", "num", Number(c.cost_usd).toFixed(4)),
      el("td", "agents", (c.agents || []).join(", ")),
    );
    return tr;
  }

  function show(conversations) {
    body.replaceChildren(...conversations.map(row));
    document.getElementById("empty").hidden = conversations.length > 0;
  }

  function follow() {
    const source = new EventSource("/ui/api/conversations/events");
    source.addEventListener("open", () => live(true, "live"));
    source.addEventListener("conversations", (event) => show(JSON.parse(event.data)));
    source.addEventListener("error", async () => {
      live(false, "reconnecting…");
      try {
        await window.mesh.getJSON("/ui/api/me"); // sends a signed-out browser to the form
      } catch (e) {
        source.close();
      }
    });
  }

  header().then(follow, () => undefined);
})();
