// An evaluation job's page: while the job is not finished, one EventSource on the job's own stream
// marks its stages as they run; on the final event the stream is closed and the server-drawn
// panel (stages, status, what it found or why it stopped) is swapped in. Loaded after site.js,
// whose say() tells a dropped connection from a refused one.
"use strict";

(function () {
  const STATE_TEXT = { done: "Done", current: "In progress", failed: "Failed", stopped: "Stopped", waiting: "Waiting" };

  function followJob() {
    const root = document.querySelector("#job[data-job-stream]");
    if (!root || !window.EventSource) return;
    const stages = Array.from(root.querySelectorAll("[data-stage]"));
    const bar = root.querySelector("progress");
    const barText = root.querySelector("[data-progress-text]");
    const words = root.querySelector("[data-status-words]");
    const status = root.querySelector("[data-job-status]");
    let finished = false;
    let running = "Running"; // what a running job's status says ("Cancelling" once asked to stop)

    function setState(item, state) {
      item.dataset.state = state;
      item.className = `stage ${state}`;
      item.querySelector("[data-stage-state]").textContent = STATE_TEXT[state];
      if (state === "current" || state === "failed" || state === "stopped") {
        item.setAttribute("aria-current", "step");
      } else {
        item.removeAttribute("aria-current");
      }
    }

    // Stage `index` (0-based) is the one running: those before it are done, those after wait.
    function markCurrent(index) {
      if (index === null || index === undefined || index < 0 || index >= stages.length) return;
      stages.forEach((item, i) => setState(item, i < index ? "done" : i === index ? "current" : "waiting"));
      showProgress(index);
      const step = status.querySelector("[data-status-step]") || document.createElement("span");
      step.dataset.statusStep = "";
      step.textContent = `: step ${index + 1} of ${stages.length}, ${stages[index].querySelector(".stage-name").textContent}`;
      if (!step.parentNode) words.after(step);
      setWords(running, "running");
    }

    function showProgress(done) {
      bar.value = done;
      bar.textContent = `${done} of ${stages.length}`;
      barText.textContent = `${done} of ${stages.length}`;
    }

    function setWords(text, state) {
      words.textContent = text;
      words.className = `status ${state}`;
    }

    function indexOf(data) {
      if (Number.isInteger(data.stage_index)) return data.stage_index;
      return stages.findIndex((item) => item.dataset.stage === data.stage);
    }

    // The job's state now (the stream's first event, and again after a resync).
    function fromSnapshot(event) {
      const job = JSON.parse(event.data);
      if (job.cancel_requested) running = "Cancelling";
      if (job.stage && (job.status === "running" || job.status === "queued")) markCurrent(job.stage.number - 1);
      if (job.status === "running") setWords(running, "running");
    }

    // The server-drawn end: the panel with what it found (or why it stopped), without a reload.
    function showEnd(text, state, announce, bad) {
      finished = true;
      source.close();
      setWords(text, state);
      say(announce, bad); // the page's own live region: the panel below is about to be replaced
      document.querySelectorAll("main > .notice").forEach((notice) => notice.remove()); // said before the end
      if (!window.htmx) {
        window.location.reload(); // once, at the very end
        return;
      }
      const failed = () => say("The evaluation ended, but its result did not load: reload the page to see it.", true);
      root.addEventListener("htmx:responseError", failed);
      root.addEventListener("htmx:sendError", failed);
      htmx.ajax("GET", root.dataset.part, { target: root, swap: "outerHTML" }).catch(failed);
    }

    const source = new EventSource(root.dataset.jobStream);
    window.recalqLiveSource = source; // for the browser tests: the page's one stream
    source.addEventListener("snapshot", fromSnapshot);
    source.addEventListener("resync", fromSnapshot);
    source.addEventListener("started", () => setWords(running, "running"));
    source.addEventListener("progress", (event) => markCurrent(indexOf(JSON.parse(event.data))));
    source.addEventListener("retrying", (event) => {
      const data = JSON.parse(event.data);
      const why = data.error && data.error.message ? `: ${data.error.message}` : "";
      setWords(`Retrying after a problem${why}`, "running");
    });
    source.addEventListener("cancel_requested", () => {
      running = "Cancelling";
      setWords(running, "running");
      const cancel = root.querySelector("[data-cancel]");
      if (cancel) cancel.hidden = true;
    });
    source.addEventListener("complete", () => {
      stages.forEach((item) => setState(item, "done"));
      showProgress(stages.length);
      showEnd("Done", "done", "Evaluation done: what it found is below.");
    });
    source.addEventListener("cancelled", () => showEnd("Cancelled", "cancelled", "Evaluation cancelled."));
    source.addEventListener("open", () => say(""));
    // "error" is both the job's final event (a MessageEvent with data) and the browser's own
    // word for a connection that failed (no data).
    source.addEventListener("error", (event) => {
      if (event.data !== undefined && event.data !== null) {
        const data = JSON.parse(event.data);
        const message = data.error && data.error.message ? data.error.message : "the evaluation failed";
        showEnd(`Failed: ${message}`, "failed", `The evaluation failed: ${message}`, true);
        return;
      }
      if (finished) return;
      if (source.readyState === EventSource.CLOSED) {
        // The server answered with an error (signed out, not found, too many streams): the
        // browser will not retry by itself.
        say("Live updates stopped: the server refused them. Reload the page to try again.", true);
      } else {
        say("Connection lost; reconnecting…");
      }
    });
  }

  // A notice a redirect named ("Evaluation started.") is said once: a reload does not repeat it.
  function forgetNotice() {
    const url = new URL(window.location.href);
    if (!url.searchParams.has("notice") || !window.history.replaceState) return;
    url.searchParams.delete("notice");
    window.history.replaceState(window.history.state, "", url.pathname + url.search + url.hash);
  }

  document.addEventListener("DOMContentLoaded", () => {
    forgetNotice();
    followJob();
  });
})();
