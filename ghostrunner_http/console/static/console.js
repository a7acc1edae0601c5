// GhostRunner console: keeps pages live without reloading.
//
// A live element names the JSON to follow (data-live-url), how to apply it
// (data-live-kind) and, optionally, the event stream that says when it changed
// (data-live-events: /ui/events?task=..., Server-Sent Events signed in by the session
// cookie). Changes come from a *source*, which calls onData(json) with each new state:
//
// - `events`: an EventSource on the stream; each event (a burst of them: one fetch)
//   fetches the JSON once, and once more whenever the stream (re)opens, to catch up.
//   The browser reconnects by itself with Last-Event-ID. Nothing is fetched while the
//   tab is hidden; it catches up when the tab comes back.
// - `poll`: fetches the JSON every INTERVAL ms while the tab is visible; the fallback
//   when there is no EventSource, or when the stream is refused (the server answered
//   an error: too many streams, signed out...) or does not open within OPEN_WITHIN ms
//   (a proxy that buffers it).
//
// The root says which one is at work in data-live-source ("events" or "poll").
(function () {
  "use strict";
  var INTERVAL = 2000;
  var OPEN_WITHIN = 10000;
  // the kinds of ghostrunner.events: each is an SSE event type of its own
  var KINDS = ["task.created", "run.claimed", "run.finished", "run.released",
    "runs.cancelled", "task.aborted", "task.paused", "task.resumed", "runs.retried",
    "runs.expired", "runs.added", "task.deleted"];

  function getJson(url) {
    return fetch(url, { credentials: "same-origin", headers: { "Accept": "application/json" } })
      .then(function (r) {
        if (r.status === 401) { window.location.assign("/ui/login"); throw new Error("signed out"); }
        if (!r.ok) { throw new Error("HTTP " + r.status); }
        return r.json();
      });
  }

  function poll(url, onData, onError) {
    var timer = null;
    var busy = false;
    var stopped = false;
    function tick() {
      timer = null;
      if (stopped || document.visibilityState !== "visible" || busy) { return; }
      busy = true;
      getJson(url).then(onData).catch(onError)
        .finally(function () { busy = false; schedule(); });
    }
    function schedule() {
      if (!stopped && timer === null && document.visibilityState === "visible") {
        timer = window.setTimeout(tick, INTERVAL);
      }
    }
    document.addEventListener("visibilitychange", function () {
      if (!stopped && document.visibilityState === "visible") {
        if (timer !== null) { window.clearTimeout(timer); timer = null; }
        tick();  // catch up at once when the tab comes back
      }
    });
    schedule();
    return function () { stopped = true; if (timer !== null) { window.clearTimeout(timer); } };
  }

  // Fetch the state when told something changed: one fetch at a time, and one more
  // after it if more changes came meanwhile; none while the tab is hidden.
  function fetcher(url, onData, onError) {
    var busy = false;
    var again = false;
    function run() {
      if (document.visibilityState !== "visible") { again = true; return; }
      if (busy) { again = true; return; }
      busy = true;
      again = false;
      getJson(url).then(onData).catch(onError)
        .finally(function () { busy = false; if (again) { run(); } });
    }
    document.addEventListener("visibilitychange", function () {
      if (document.visibilityState === "visible" && again) { run(); }
    });
    return run;
  }

  // Returns false when the browser has no EventSource (the caller polls instead).
  function events(streamUrl, url, onData, onError, onFallback) {
    if (typeof window.EventSource !== "function") { return false; }
    var changed = fetcher(url, onData, onError);
    var source = new window.EventSource(streamUrl);
    var opened = false;
    var failed = false;
    function fallBack() {
      if (failed) { return; }
      failed = true;
      source.close();
      onFallback();
    }
    var deadline = window.setTimeout(function () { if (!opened) { fallBack(); } }, OPEN_WITHIN);
    source.addEventListener("open", function () {
      opened = true;
      window.clearTimeout(deadline);
      changed();  // what happened before (or while it was reconnecting)
    });
    KINDS.forEach(function (kind) { source.addEventListener(kind, changed); });
    source.addEventListener("error", function () {
      // CONNECTING: the browser reconnects by itself (with Last-Event-ID).
      // CLOSED: the server refused the stream (an error status): poll instead.
      if (source.readyState === window.EventSource.CLOSED) { fallBack(); }
      else { onError(new Error("event stream interrupted")); }
    });
    return true;
  }

  function setState(cell, value) {
    // the same markup as the server renders: <span class="state s-VALUE">value</span>
    var span = cell.querySelector(".state");
    if (!span) { span = document.createElement("span"); cell.textContent = ""; cell.appendChild(span); }
    span.className = "state s-" + value;
    span.textContent = value.replace(/_/g, " ");
  }

  function setRecovered(cell, value) {
    cell.textContent = "";
    if (value) {
      var tag = document.createElement("span");
      tag.className = "tag";
      tag.textContent = value;
      cell.appendChild(tag);
    }
  }

  function setDevice(dot, value) {
    // the same markup as the server renders: <span class="dot on|off">online|offline</span>
    if (!value) { return; }
    dot.className = "dot " + (value === "online" ? "on" : "off");
    dot.textContent = value;
  }

  function note(text) {
    var element = document.getElementById("live-note");
    if (element) { element.textContent = text; }
  }

  var appliers = {
    task: function (root, data) {
      var status = document.getElementById("task-status");
      if (status) { setState(status, data.status); }
      Object.keys(data.counts).forEach(function (state) {
        var cell = root.querySelector('[data-count="' + state + '"]');
        if (cell) { cell.textContent = String(data.counts[state]); }
      });
      document.querySelectorAll("#runs tbody tr[data-node]").forEach(function (row) {
        var run = data.rows[row.getAttribute("data-node")];
        if (!run) { return; }
        row.querySelectorAll("[data-field]").forEach(function (cell) {
          var field = cell.getAttribute("data-field");
          if (field === "state") { setState(cell, run.state); }
          else if (field === "recovered") { setRecovered(cell, run.recovered); }
          else if (field === "device") { setDevice(cell, run.device); }
          else if (cell.textContent !== run[field]) { cell.textContent = run[field]; }
        });
      });
    }
  };

  function follow(root) {
    var apply = appliers[root.getAttribute("data-live-kind")];
    if (!apply) { return; }
    var url = root.getAttribute("data-live-url");
    var streamUrl = root.getAttribute("data-live-events");
    function onData(data) {
      apply(root, data);
      var how = root.getAttribute("data-live-source") === "events" ? "live" : "live (polling)";
      note(how + ", updated " + new Date().toLocaleTimeString());
    }
    function onError() { note("live updates paused (server unreachable); retrying"); }
    function polling() {
      root.setAttribute("data-live-source", "poll");
      poll(url, onData, onError);
    }
    if (streamUrl) {
      root.setAttribute("data-live-source", "events");
      if (events(streamUrl, url, onData, onError, polling)) { return; }
    }
    polling();
  }

  function start() {
    document.querySelectorAll("[data-live-url]").forEach(follow);
  }

  if (document.readyState === "loading") { document.addEventListener("DOMContentLoaded", start); }
  else { start(); }
})();
