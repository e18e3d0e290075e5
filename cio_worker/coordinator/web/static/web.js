// The web view's live parts: each element with data-live is refreshed from that URL every
// data-every milliseconds (fragments the server rendered and escaped), the task grid's colours
// from a string of state letters, a running task's log by its new lines. No framework, no build.
"use strict";

async function getJson(url) {
  const response = await fetch(url, {credentials: "same-origin", headers: {"Accept": "application/json"}});
  if (response.status === 401) { location.href = "/sign-in?next=" + encodeURIComponent(location.pathname); return null; }
  if (!response.ok) throw new Error(url + ": " + response.status);
  return response.json();
}

function every(element, update) {
  const wait = Number(element.dataset.every || 2000);
  let stopped = false;
  async function tick() {
    if (stopped) return;
    let again = wait;
    if (!document.hidden) {
      try { again = (await update()) || wait; } catch (error) { console.warn(error); again = wait * 2; }
    }
    if (again > 0) setTimeout(tick, again); else stopped = true;
  }
  setTimeout(tick, wait);
}

function paintGrid(grid, states) {
  const cells = grid.getElementsByTagName("i");
  const before = grid.dataset.states || "";
  for (let i = 0; i < states.length && i < cells.length; i++) {
    if (states[i] !== before[i]) {
      cells[i].className = "c " + states[i] + (cells[i].classList.contains("sc") ? " sc" : "");
    }
  }
  grid.dataset.states = states;
}

function liveJob(head) {
  const grid = document.getElementById("grid");
  const gallery = document.getElementById("gallery");
  every(head, async () => {
    const data = await getJson(head.dataset.live);
    if (!data) return 0;
    head.innerHTML = data.head;
    if (gallery && gallery.dataset.html !== data.gallery) {
      gallery.innerHTML = data.gallery;
      gallery.dataset.html = data.gallery;
    }
    if (grid) paintGrid(grid, data.states);
    return data.finished ? 10000 : 0;
  });
}

function liveLog(pre) {
  const state = document.getElementById("log-state");
  every(pre, async () => {
    const data = await getJson(pre.dataset.live + "&after=" + (pre.dataset.after || "0"));
    if (!data) return 0;
    const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
    if (data.running) {
      if (data.skipped) pre.textContent += "\n[lines were dropped here: the queue keeps only the newest]\n";
      pre.textContent += data.text;
      pre.dataset.after = String(data.end);
    } else {
      pre.textContent = data.text;
      if (state) state.textContent = "the attempt has ended: its log as uploaded";
    }
    if (atBottom) pre.scrollTop = pre.scrollHeight;
    return data.running ? 0 : -1;
  });
}

function liveFragment(element, key) {
  every(element, async () => {
    const data = await getJson(element.dataset.live);
    if (!data) return 0;
    element.innerHTML = data[key];
    return 0;
  });
}

function fullFrame(full) {
  // Once every part has loaded: the frame's size (column widths along the top row, row heights down
  // the left column), and a button that fits the frame to the window, larger or smaller (CSS zoom).
  const side = Number(getComputedStyle(full).getPropertyValue("--side")) || 1;
  const parts = Array.from(full.children);
  const images = parts.filter((part) => part.tagName === "IMG");
  function shown() {
    if (!images.every((image) => image.complete && image.naturalWidth > 0)) return;
    const width = parts.slice(0, side).reduce((sum, part) => sum + (part.naturalWidth || 0), 0);
    const height = parts.filter((_, i) => i % side === 0).reduce((sum, part) => sum + (part.naturalHeight || 0), 0);
    if (!width || !height) return;  // a tile of the top row or the left column is not there yet
    const size = document.getElementById("frame-size");
    size.textContent = width + " × " + height + " pixels" + (images.length < parts.length ? " (so far)" : "") + ".";
    const fit = document.getElementById("fit");
    const room = Math.min(full.parentElement.clientWidth / width, window.innerHeight * 0.85 / height);
    if (Math.abs(room - 1) > 0.01) {
      fit.hidden = false;
      fit.onclick = () => {
        const fitted = full.style.zoom !== "" && full.style.zoom !== "1";
        full.style.zoom = fitted ? "1" : String(room);
        full.style.imageRendering = !fitted && room > 1 ? "pixelated" : "";  // enlarged: its pixels, not a blur
        fit.textContent = fitted ? "Fit to the window" : "Actual pixels";
      };
    }
  }
  for (const image of images) image.addEventListener("load", shown);
  shown();
}

document.addEventListener("DOMContentLoaded", () => {
  const full = document.getElementById("full");
  if (full) fullFrame(full);
  for (const element of document.querySelectorAll("[data-live]")) {
    if (element.id === "job-head") liveJob(element);
    else if (element.id === "log") liveLog(element);
    else liveFragment(element, "html");
  }
  const grid = document.getElementById("grid");
  if (grid) {
    const cells = grid.getElementsByTagName("i");
    grid.addEventListener("click", (event) => {
      const index = Array.prototype.indexOf.call(cells, event.target);
      if (index >= 0) {
        // Task ids are their position, three digits at least (the queue's task_id_text).
        location.href = "/jobs/" + encodeURIComponent(grid.dataset.job) + "/tasks/" + String(index).padStart(3, "0");
      }
    });
  }
  document.addEventListener("submit", (event) => {
    const message = event.target.dataset.confirm;
    if (message && !window.confirm(message)) event.preventDefault();
  });
  const signIn = document.getElementById("sign-in");
  if (signIn && location.hash.startsWith("#token=")) {
    // A sign-in link (`cio-worker simulate` prints one): the token rides in the fragment, which the
    // browser never sends; it is taken out of the address bar before the form is posted.
    document.getElementById("token").value = decodeURIComponent(location.hash.slice(7));
    history.replaceState(null, "", location.pathname + location.search);
    signIn.submit();
  }
});
