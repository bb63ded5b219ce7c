"use strict";
// One conversation as a causal tree that grows as its messages come: the record
// (/ui/api/c/{id}) for bodies, deliveries, timings and waiting approvals, and the
// conversation's server-sent events (/v1/conversations/{id}/events) for what happens now.
(() => {
  const { el, getJSON, post, header, statusBadge, when, took, live } = window.mesh;
  const conv = decodeURIComponent(location.pathname.split("/").pop());
  const nodes = new Map(); // message id -> what is known of it
  const streams = new Map(); // streamed answer id -> {chunks, causation, sender, sent_ns}
  const MAX_CHUNKS = 100000; // chunks of one streamed answer shown, at most

  function joined(chunks) { // the chunks in their order, whatever order they came in
    return [...chunks.keys()].sort((a, b) => a - b).map((k) => chunks.get(k)).join("");
  }
  let record = null; // the last reading of the record
  let who = null;
  const decided = new Map(); // approval id -> what this page decided

  document.getElementById("crumb").textContent = conv;
  document.getElementById("title").textContent = `Conversation ${conv}`;
  document.title = `mesh · ${conv}`;

  // -- what is known -----------------------------------------------------------------------

  function fromRecord(m) {
    nodes.set(m.id, { ...m, recorded: true });
  }

  function fromLine(line) {
    if (line.type === "llm.chunk" && line.body && typeof line.body === "object") {
      const seq = line.body.seq;
      // a chunk's place is a small whole number: a hostile one (4294967294) would make the
      // page join billions of empty slots on every redraw
      if (!Number.isInteger(seq) || seq < 0 || seq >= MAX_CHUNKS) return;
      const s = streams.get(line.body.stream) || {
        chunks: new Map(), causation: line.causation, sender: line.sender, sent_ns: line.sent_ns,
      };
      s.chunks.set(seq, String(line.body.text));
      streams.set(line.body.stream, s);
      return;
    }
    if (!line.id || (nodes.has(line.id) && nodes.get(line.id).recorded)) return;
    nodes.set(line.id, {
      id: line.id, type: line.type, sender: line.sender, receiver: line.receiver,
      causation: line.causation, sent_ns: line.sent_ns, body: line.body, deliveries: [],
      dead_letter: line.dead_letter, recorded: false,
    });
  }

  function finished(streamId) {
    for (const n of nodes.values()) {
      if (n.type === "llm.final" && n.body && n.body.stream === streamId) return true;
    }
    return false;
  }

  // messages and streamed answers still streaming, as one tree (parents before children)
  function forest() {
    const all = [...nodes.values()];
    for (const [id, s] of streams) {
      if (!finished(id)) {
        all.push({
          id: `stream-${id}`, type: "llm.chunk", sender: s.sender, receiver: "(streaming)",
          causation: s.causation, sent_ns: s.sent_ns, body: joined(s.chunks), deliveries: [],
          streaming: true,
        });
      }
    }
    all.sort((a, b) => (a.sent_ns || 0) - (b.sent_ns || 0));
    const ids = new Set(all.map((n) => n.id));
    const children = new Map();
    const roots = [];
    for (const n of all) {
      if (n.causation && ids.has(n.causation) && n.causation !== n.id) {
        if (!children.has(n.causation)) children.set(n.causation, []);
        children.get(n.causation).push(n);
      } else {
        roots.push(n);
      }
    }
    const start = Math.min(...all.map((n) => n.sent_ns || Infinity));
    return { roots, children, start };
  }

  // -- drawing ----------------------------------------------------------------------------

  function delivery(d) {
    const line = el("div", "delivery");
    line.append(el("span", "", `↳ ${d.agent}: `));
    line.append(el("span", `outcome-${String(d.outcome).replace(/[^a-z_]/g, "")}`, d.outcome));
    let text = ` · delivery ${d.attempt} · ${Number(d.ms).toFixed(1)} ms`;
    if (d.input_tokens || d.output_tokens) {
      text += ` · ${d.input_tokens} + ${d.output_tokens} tokens · $${Number(d.cost_usd).toFixed(4)}`;
    }
    if (d.reason) text += ` · ${d.reason}`;
    line.append(el("span", "", text));
    return line;
  }

  function bodyText(body) {
    if (typeof body === "string") return body;
    try {
      return JSON.stringify(body, null, 2);
    } catch (e) {
      return String(body);
    }
  }

  function item(n, tree, seen) {
    seen.add(n.id);
    const li = el("li", `node${n.recorded ? "" : " live-only"}`);
    li.dataset.id = n.id;
    li.dataset.type = n.type;
    const card = el("div", "card");
    const head = el("div", "head");
    const at = n.sent_ns && Number.isFinite(tree.start) ? `+${((n.sent_ns - tree.start) / 1e6).toFixed(1)} ms` : "";
    head.append(
      el("span", "at", at),
      el("span", "route", `${n.sender} → ${n.receiver}`),
      el("span", "type", n.type),
    );
    if (n.streaming) head.append(el("span", "muted", "streaming…"));
    if (n.dead_letter) head.append(el("span", "error", `dead letter: ${n.dead_letter}`));
    head.append(el("span", "id", n.streaming ? "" : n.id));
    card.append(head);
    for (const d of n.deliveries || []) card.append(delivery(d));
    if (n.body !== undefined && n.body !== null) card.append(el("pre", "body", bodyText(n.body)));
    li.append(card);
    const kids = (tree.children.get(n.id) || []).filter((k) => !seen.has(k.id));
    if (kids.length) {
      const ul = el("ul");
      for (const k of kids) ul.append(item(k, tree, seen));
      li.append(ul);
    }
    return li;
  }

  function drawTree() {
    const tree = forest();
    const seen = new Set();
    const ul = document.getElementById("tree");
    ul.replaceChildren(...tree.roots.map((n) => item(n, tree, seen)));
    document.getElementById("count").textContent = `(${nodes.size})`;
  }

  function fact(label, value) {
    const div = el("div");
    div.append(el("dt", "", label), el("dd", "", value));
    return div;
  }

  function drawSummary() {
    if (!record) return;
    const s = record;
    // an empty record is a conversation not started yet (or not recorded), not a finished one
    const status = s.messages.length ? s.status : "no messages yet";
    document.getElementById("status").replaceChildren(statusBadge(status));
    document.getElementById("summary").replaceChildren(
      fact("Started", when(s.started)),
      fact("Took", took(s.duration)),
      fact("Messages", s.messages.length),
      fact("Agents", (s.agents || []).join(", ") || "-"),
      fact("Tokens", `${s.input_tokens} in / ${s.output_tokens} out`),
      fact("Cost", `$${Number(s.cost_usd).toFixed(4)}`),
    );
    const trace = document.getElementById("trace");
    const parts = [el("h3", "", "Trace")];
    const ids = s.trace_ids || [];
    if (!ids.length) parts.push(el("span", "muted", "no trace recorded"));
    for (const id of ids) {
      const row = el("div");
      if (who && who.trace_url) {
        const a = el("a", "mono trace-link", id);
        a.href = who.trace_url.replace("{trace_id}", encodeURIComponent(id));
        a.target = "_blank";
        a.rel = "noopener noreferrer";
        row.append(a);
      } else {
        row.append(el("code", "trace-id", id));
      }
      parts.push(row);
    }
    if (!(who && who.trace_url)) {
      const hint = el("div", "muted");
      hint.append("see it with ", el("code", "", `mesh trace ${conv}`));
      parts.push(hint);
    }
    trace.replaceChildren(...parts);
  }

  async function decide(w, approved, row) {
    for (const b of row.querySelectorAll("button")) b.disabled = true;
    let reason = "";
    if (!approved) reason = window.prompt("Why deny it? (the agent's model is told)") || "";
    const r = await post(`/ui/api/approvals/${encodeURIComponent(w.approval)}`, {
      approved, reason, request: w.request,
    });
    const answer = await r.json().catch(() => ({}));
    decided.set(w.approval, r.ok ? `${answer.decision} by you` : `not decided: ${answer.detail || r.status}`);
    drawWaiting();
    refresh();
  }

  function drawWaiting() {
    const panel = document.getElementById("waiting");
    const waiting = (record && record.waiting) || [];
    panel.hidden = waiting.length === 0;
    const parts = [el("h3", "", "Waiting for a decision")];
    for (const w of waiting) {
      const row = el("div", "approval");
      row.dataset.approval = w.approval;
      row.append(el("span", "route", `${w.agent}.${w.tool}`), el("code", "args", w.arguments));
      if (decided.has(w.approval)) {
        row.append(el("span", "verdict", decided.get(w.approval)));
      } else if (who && who.approver) {
        const yes = el("button", "approve", "Approve");
        const no = el("button", "deny", "Deny");
        yes.type = no.type = "button";
        yes.addEventListener("click", () => decide(w, true, row));
        no.addEventListener("click", () => decide(w, false, row));
        row.append(yes, no);
      } else {
        row.append(el("span", "muted", "an approver decides (mesh approve / the gateway's approvers)"));
      }
      parts.push(row);
    }
    panel.replaceChildren(...parts);
  }

  // -- keeping up ---------------------------------------------------------------------------

  let pending = null;
  function refreshSoon(ms) {
    if (pending === null) pending = setTimeout(() => { pending = null; refresh(); }, ms);
  }

  async function refresh() {
    try {
      record = await getJSON(`/ui/api/c/${encodeURIComponent(conv)}`);
    } catch (e) {
      refreshSoon(3000);
      return;
    }
    for (const m of record.messages) fromRecord(m);
    drawSummary();
    drawWaiting();
    drawTree();
    // outcomes are recorded after the messages: read again while the work goes on
    if (record.status === "running" || record.status === "waiting" || !record.messages.length) refreshSoon(2000);
  }

  // the events of /v1/conversations/{id}/events, read from a fetch: an EventSource would
  // only hand over events of names known in advance, and these are named by message type
  async function follow() {
    try {
      const r = await fetch(`/v1/conversations/${encodeURIComponent(conv)}/events`, {
        credentials: "same-origin", headers: { Accept: "text/event-stream" },
      });
      if (!r.ok || !r.body) throw new Error(`HTTP ${r.status}`);
      live(true, "live");
      const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim());
          if (!data.length) continue;
          fromLine(JSON.parse(data.join("\n")));
          drawTree();
          refreshSoon(300);
        }
      }
    } catch (e) {
      // fall through to reconnecting
    }
    live(false, "reconnecting…");
    setTimeout(follow, 2000);
  }

  header().then((me) => {
    who = me;
    refresh();
    follow();
  }, () => undefined);
})();
