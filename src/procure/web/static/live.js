// The run page, live: observations and the run's summary arrive over Server-Sent Events from
// /api/runs/{id}/events and are put in place; forms with data-confirm ask before they submit.
(function () {
  "use strict";
  document.querySelectorAll("form[data-confirm]").forEach(function (form) {
    form.addEventListener("submit", function (event) {
      if (!window.confirm(form.dataset.confirm)) event.preventDefault();
    });
  });

  var timeline = document.getElementById("timeline");
  var state = document.getElementById("live-state");
  // The newest events (the completion among them) are at the bottom of the scroll box
  if (timeline) timeline.scrollTop = timeline.scrollHeight;
  if (!timeline || !window.EventSource || timeline.dataset.ended) return;
  var cursor = Number(timeline.dataset.cursor || 0);
  var source = new EventSource(timeline.dataset.events + "?after=" + cursor);
  var say = function (text) { if (state) state.textContent = text; };

  source.addEventListener("open", function () { say("live"); });
  source.addEventListener("error", function () { say("reconnecting…"); });
  source.addEventListener("observation", function (event) {
    var o = JSON.parse(event.data);
    if (o._id <= cursor) return; // already on the page
    cursor = o._id;
    // Follow the newest unless the reader scrolled up to read older ones
    var atEnd = timeline.scrollHeight - timeline.scrollTop - timeline.clientHeight < 40;
    timeline.insertAdjacentHTML("beforeend", o.html);
    if (atEnd) timeline.scrollTop = timeline.scrollHeight;
  });
  source.addEventListener("run", function (event) {
    var run = JSON.parse(event.data);
    Object.keys(run.html).forEach(function (key) {
      var el = document.querySelector('[data-live="' + key + '"]');
      if (el) el.innerHTML = run.html[key];
    });
    if (run.ended) {
      var cancel = document.getElementById("cancel-form");
      if (cancel) cancel.remove();
    }
  });
  source.addEventListener("end", function () { source.close(); say("ended"); });
  source.addEventListener("gone", function () { source.close(); say("run not found"); });
})();
