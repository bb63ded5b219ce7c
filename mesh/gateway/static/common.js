"use strict";
// Helpers of the web view's pages. Every piece of mesh data goes into the page as text
// (textContent), never as markup: message bodies come from anyone who can send a message.
window.mesh = (() => {
  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function signIn() {
    location.assign("/ui/login");
  }

  async function getJSON(url) {
    const r = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
    if (r.status === 401) {
      signIn();
      throw new Error("signed out");
    }
    if (!r.ok) throw new Error(`${url}: HTTP ${r.status}`);
    return r.json();
  }

  let me = null;
  async function whoami() {
    if (me === null) me = await getJSON("/ui/api/me");
    return me;
  }

  async function post(url, body) {
    const who = await whoami();
    return fetch(url, {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": who.csrf },
      body: JSON.stringify(body || {}),
    });
  }

  // the header: who is signed in, and signing out
  async function header() {
    const who = await whoami();
    document.getElementById("who").textContent =
      who.principal + (who.approver ? " · may approve" : "");
    document.getElementById("logout").addEventListener("click", async () => {
      await post("/ui/logout");
      signIn();
    });
    return who;
  }

  const STATUSES = ["done", "waiting", "failed", "running"];
  function statusBadge(status) {
    const known = STATUSES.includes(status) ? status : "unknown";
    return el("span", `status status-${known}`, status);
  }

  function when(seconds) {
    if (!seconds) return "-";
    return new Date(seconds * 1000).toLocaleString();
  }

  function took(seconds) {
    if (seconds === undefined || seconds === null) return "-";
    return seconds < 10 ? `${Math.round(seconds * 1000)} ms` : `${seconds.toFixed(1)} s`;
  }

  function live(on, text) {
    const node = document.getElementById("live");
    node.textContent = text;
    node.classList.toggle("on", on);
  }

  return { el, getJSON, post, whoami, header, statusBadge, when, took, live };
})();
