// recalq's pages: times in the viewer's zone, and one live stream per page while a score updates.
"use strict";

function localTimes(root) {
  root.querySelectorAll("time[data-local]").forEach((el) => {
    const at = new Date(el.getAttribute("datetime"));
    if (!Number.isNaN(at.getTime())) {
      el.title = el.getAttribute("datetime");
      el.textContent = at.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
    }
  });
}

function say(text, bad) {
  const el = document.getElementById("live-status");
  if (!el) return;
  el.textContent = text || "";
  el.classList.toggle("bad", Boolean(bad));
}

// The page's live part, if it has one: `data-live-url` names the stream; each `data-live-item`
// inside it has the status it was drawn with and the URL of its own fresh fragment.
function followLive() {
  const root = document.querySelector("[data-live-url]");
  if (!root || !window.EventSource) return;
  const source = new EventSource(root.dataset.liveUrl);
  window.recalqLiveSource = source; // for the browser tests: the page's one stream
  source.addEventListener("property", (event) => {
    const change = JSON.parse(event.data);
    const item = document.getElementById(`property-${change.property_id}`);
    if (!item || item.dataset.status === change.status) return;
    htmx.ajax("GET", item.dataset.fragment, { target: item, swap: "outerHTML" }).then(() => {
      if (change.status === "up_to_date" && change.score !== null) say(`Score updated: ${change.score}`);
      else if (change.status === "failed") say("The score could not be updated; an operator has been told.", true);
    });
  });
  source.addEventListener("settled", () => source.close());
  source.addEventListener("open", () => say(""));
  source.onerror = () => {
    if (source.readyState === EventSource.CLOSED) {
      // The server answered with an error (signed out, not found, too many streams): the
      // browser will not retry by itself.
      say("Live updates stopped: the server refused them. Reload the page to try again.", true);
    } else {
      say("Connection lost; reconnecting…");
    }
  };
}

document.addEventListener("DOMContentLoaded", () => {
  localTimes(document);
  document.body.addEventListener("htmx:afterSwap", (event) => localTimes(event.detail.target.parentNode || document));
  followLive();
});
