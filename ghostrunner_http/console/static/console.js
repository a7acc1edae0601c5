// GhostRunner console: keeps pages live without reloading.
//
// A live element names the JSON to follow (data-live-url) and how to apply it
// (data-live-kind). Changes come from a *source*: for now `poll`, which fetches the URL
// every INTERVAL ms while the tab is visible; an EventSource-based source can replace
// it later without touching the appliers.
(function () {
  "use strict";
  var INTERVAL = 2000;

  // A source calls onData(json) with each new state; returns a stop function.
  function poll(url, onData, onError) {
    var timer = null;
    var busy = false;
    function tick() {
      timer = null;
      if (document.visibilityState !== "visible" || busy) { return; }
      busy = true;
      fetch(url, { credentials: "same-origin", headers: { "Accept": "application/json" } })
        .then(function (r) {
          if (r.status === 401) { window.location.assign("/ui/login"); throw new Error("signed out"); }
          if (!r.ok) { throw new Error("HTTP " + r.status); }
          return r.json();
        })
        .then(onData)
        .catch(onError)
        .finally(function () { busy = false; schedule(); });
    }
    function schedule() {
      if (timer === null && document.visibilityState === "visible") {
        timer = window.setTimeout(tick, INTERVAL);
      }
    }
    document.addEventListener("visibilitychange", function () {
      if (document.visibilityState === "visible") {
        if (timer !== null) { window.clearTimeout(timer); timer = null; }
        tick();  // catch up at once when the tab comes back
      }
    });
    schedule();
    return function () { if (timer !== null) { window.clearTimeout(timer); } };
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
      var note = document.getElementById("live-note");
      if (note) { note.textContent = "live, updated " + new Date().toLocaleTimeString(); }
    }
  };

  function start() {
    document.querySelectorAll("[data-live-url]").forEach(function (root) {
      var apply = appliers[root.getAttribute("data-live-kind")];
      if (!apply) { return; }
      poll(root.getAttribute("data-live-url"), function (data) { apply(root, data); },
        function () {
          var note = document.getElementById("live-note");
          if (note) { note.textContent = "live updates paused (server unreachable); retrying"; }
        });
    });
  }

  if (document.readyState === "loading") { document.addEventListener("DOMContentLoaded", start); }
  else { start(); }
})();
