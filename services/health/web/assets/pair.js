// Polls /pair/state and swaps the QR image when WhatsApp rotates the code.
(function () {
  "use strict";
  var root = document.getElementById("pair");
  if (!root) return;
  var shownVersion = root.dataset.qrVersion || "0";
  var $ = function (id) { return document.getElementById(id); };

  function apply(d) {
    root.dataset.mode = d.mode;
    $("qr-box").hidden = d.mode !== "qr";
    $("code-box").hidden = d.mode !== "code";
    $("linked-box").hidden = d.mode !== "linked";
    if (d.mode === "qr") {
      var v = String(d.qr_version || 0);
      if (v !== shownVersion || !$("qr").getAttribute("src")) {
        shownVersion = v;
        root.dataset.qrVersion = v;
        $("qr").src = "/pair/qr.png?v=" + encodeURIComponent(v);
      }
    }
    $("pair-code").textContent = d.pair_code || "";
    $("linked-as").textContent = d.linked_as || "";
    var msg = $("message");
    msg.textContent = d.message || "";
    msg.className = "msg mode-" + d.mode;
    $("state").textContent = d.state || "";
  }

  function poll() {
    fetch("/pair/state", { credentials: "same-origin", cache: "no-store" })
      .then(function (r) {
        if (r.status === 401 || r.status === 403) { location.reload(); return null; }
        return r.ok ? r.json() : null;
      })
      .then(function (d) { if (d) apply(d); })
      .catch(function () {
        var msg = $("message");
        msg.textContent = "This page cannot reach the health service; retrying.";
        msg.className = "msg mode-unreachable";
      })
      .finally(function () { setTimeout(poll, 1500); });
  }
  setTimeout(poll, 1500);

  // Sandbox mode: "link now" asks the sandbox to link, as a scan would.
  var link = $("link-now");
  if (link) {
    link.addEventListener("click", function () {
      link.disabled = true;
      fetch("/pair/link", { method: "POST", credentials: "same-origin", cache: "no-store",
        headers: { "X-Blacksky-Action": "link" } })
        .then(function (r) { return r.json(); })
        .then(function (d) {
          $("link-result").textContent = d.ok ? "Linked as " + d.linked_as + "." : (d.error || "link failed");
          if (d.ok) { $("linked-as").textContent = d.linked_as; }
        })
        .catch(function () { $("link-result").textContent = "The link request failed; try again."; })
        .finally(function () { link.disabled = false; });
    });
  }
})();
