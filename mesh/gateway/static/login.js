"use strict";
// the gateway sends a refused sign-in back to /ui/login#failed
if (location.hash === "#failed") {
  document.getElementById("failed").hidden = false;
}
// and to /ui/login#throttled after too many wrong tokens from this address of late
if (location.hash === "#throttled") {
  document.getElementById("throttled").hidden = false;
}
