"use strict";
// the gateway sends a refused sign-in back to /ui/login#failed
if (location.hash === "#failed") {
  document.getElementById("failed").hidden = false;
}
