// Draws the page's charts from the JSON block #chart-data (no inline script: the page's CSP allows
// scripts from this origin only), and submits the admin's tenant filter when it changes.
(function () {
  "use strict";
  var PALETTE = ["#2563eb", "#16a34a", "#f59e0b", "#dc2626", "#7c3aed", "#0891b2", "#db2777", "#65a30d"];

  function colour(i, alpha) {
    var hex = PALETTE[i % PALETTE.length];
    if (alpha === undefined) { return hex; }
    var n = parseInt(hex.slice(1), 16);
    return "rgba(" + (n >> 16) + "," + ((n >> 8) & 255) + "," + (n & 255) + "," + alpha + ")";
  }

  function formatter(spec) {
    if (spec.money) {
      return function (v) { return "$" + Number(v).toLocaleString(undefined, { maximumFractionDigits: 6 }); };
    }
    if (spec.percent) { return function (v) { return Number(v).toFixed(1) + "%"; }; }
    return function (v) { return Number(v).toLocaleString(); };
  }

  function config(spec) {
    var round = spec.type === "doughnut" || spec.type === "pie";
    var format = formatter(spec);
    var datasets = spec.datasets.map(function (d, i) {
      var out = { label: d.label, data: d.data };
      if (d.type) { out.type = d.type; }
      if (round) {
        out.backgroundColor = d.data.map(function (_, j) { return colour(j); });
      } else if ((d.type || spec.type) === "line") {
        out.borderColor = colour(i); out.backgroundColor = colour(i, 0.2); out.spanGaps = true; out.tension = 0.2;
      } else {
        out.backgroundColor = colour(i, 0.75); out.borderColor = colour(i);
      }
      if (spec.type === "timeline") { out.grouped = false; out.barPercentage = 0.6; }
      return out;
    });
    var options = {
      responsive: true, maintainAspectRatio: false, animation: false,
      plugins: {
        title: { display: !!spec.title, text: spec.title },
        tooltip: { callbacks: { label: function (ctx) {
          var v = ctx.raw;
          if (Array.isArray(v)) { return ctx.dataset.label + ": " + format(v[0]) + " → " + format(v[1]); }
          return ctx.dataset.label + ": " + format(v);
        } } }
      }
    };
    if (!round) {
      var value = { beginAtZero: true, ticks: { callback: format } };
      if (spec.axisTitle) { value.title = { display: true, text: spec.axisTitle }; }
      if (spec.percent) { value.max = 100; }
      options.scales = spec.horizontal || spec.type === "timeline" ? { x: value } : { y: value };
      if (spec.horizontal || spec.type === "timeline") { options.indexAxis = "y"; }
    }
    return { type: spec.type === "timeline" ? "bar" : spec.type, data: { labels: spec.labels, datasets: datasets },
             options: options };
  }

  function draw() {
    var block = document.getElementById("chart-data");
    if (!block || typeof Chart === "undefined") { return; }
    JSON.parse(block.textContent).forEach(function (spec) {
      var canvas = document.getElementById(spec.id);
      if (canvas) { new Chart(canvas, config(spec)); }
    });
  }

  function tenantFilter() {
    var select = document.getElementById("tenant-select");
    if (select) { select.addEventListener("change", function () { select.form.submit(); }); }
  }

  document.addEventListener("DOMContentLoaded", function () { draw(); tenantFilter(); });
}());
