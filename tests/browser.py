"""Open built book pages in headless Chromium, offline, and report what a reader would see wrong.

One Chromium process checks every page. It is driven over the Chrome DevTools Protocol through
`--remote-debugging-pipe` (JSON messages ending in a NUL byte on file descriptors 3 and 4), so this needs
no Python package beyond the standard library, only Debian's `chromium`. For each page it checks that

- math is typeset: MathJax finished, every `.math` element holds an `mjx-container`, no formula is a
  MathJax error (an unknown macro, a missing brace) and the visible text outside code has no raw `\\(`,
  `\\[` or `$$`;
- every image decoded (natural width > 0) and no request went to a non-file URL (the network is off);
- the page raised no JavaScript error and logged no console error;
- nothing is cut off: cell outputs wrap inside their cell; code and display math wider than their box
  scroll inside it, with a drawn scrollbar; no block reaches past the page's article column.

It writes screenshots of each whole page, and an index.html showing them all, into `shots`.
Run by hand: `python tests/browser.py _build/html` (exit status 1 if any page has a problem).
"""

from __future__ import annotations

import base64
import fcntl
import html
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

INSTALL_HINT = ("the browser check needs Chromium: install it with `apt-get install chromium` (Debian/Ubuntu, "
                "as root; `.ci/run` does this) or point NORMLAB_CHROMIUM at a Chromium/Chrome binary")
# Schemes a page may load from: anything else is a request to the network.
LOCAL_SCHEMES = ("file:", "data:", "blob:", "about:", "chrome-error:")
WIDTH, HEIGHT = 1280, 900
# A long chapter is shot in pieces of this height (Chromium cannot capture over 16384 px in one).
SHOT_HEIGHT = 6000
MATHJAX_TIMEOUT_S = 20
LOAD_TIMEOUT_S = 30
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--disable-extensions", "--mute-audio", "--no-default-browser-check",
         # No name resolves, so even a request that slipped past the offline emulation cannot leave.
         "--host-resolver-rules=MAP * ~NOTFOUND"]


def find_chromium() -> str | None:
    if os.environ.get("NORMLAB_CHROMIUM"):
        return os.environ["NORMLAB_CHROMIUM"]
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    return None


def toc_pages(book: Path) -> list[str]:
    """The pages of a Jupyter Book's _toc.yml, as paths of built .html files relative to the output."""
    def files(node) -> list[str]:
        if isinstance(node, dict):
            own = [node["file"]] if "file" in node else []
            own += [node["root"]] if "root" in node else []
            return own + [f for key in ("parts", "chapters", "sections") for f in files(node.get(key, []))]
        return [f for item in node for f in files(item)] if isinstance(node, list) else []

    toc = yaml.safe_load((book / "_toc.yml").read_text())
    return [str(Path(f).with_suffix("")) + ".html" for f in files(toc)]


# Runs in the page after its load event; resolves to what the checks need.
PAGE_PROBE = r"""
(async () => {
  const sleep = ms => new Promise(r => setTimeout(r, ms));
  const deadline = Date.now() + %(timeout_ms)d;
  const report = {mathjax: "absent", problems: []};
  const hasMath = document.querySelector(".math") !== null;
  if (hasMath || window.MathJax) {
    while (!(window.MathJax && MathJax.startup && MathJax.startup.promise) && Date.now() < deadline) await sleep(50);
    if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
      const done = await Promise.race([MathJax.startup.promise.then(() => true, () => "rejected"),
                                       sleep(Math.max(0, deadline - Date.now())).then(() => false)]);
      report.mathjax = done === true ? "done" : done === false ? "timeout" : "rejected";
    } else {
      report.mathjax = "not loaded";
    }
  }
  const mathEls = [...document.querySelectorAll(".math")];
  report.math = mathEls.length;
  report.typeset = document.querySelectorAll("mjx-container").length;
  if (hasMath && report.mathjax !== "done")
    report.problems.push(`the page has ${mathEls.length} formulas but MathJax ${report.mathjax === "not loaded" ? "never loaded" : "did not finish (" + report.mathjax + ")"}`);
  const untypeset = mathEls.filter(e => !e.querySelector("mjx-container"));
  if (untypeset.length)
    report.problems.push(`${untypeset.length} of ${mathEls.length} formulas not typeset, e.g. ${JSON.stringify(untypeset[0].textContent.slice(0, 80))}`);
  // An unknown macro or a TeX syntax error is typeset as an error box (or, with MathJax's noundefined
  // package, as the macro's name in red): take the TeX source from MathJax's own list of formulas.
  if (window.MathJax && MathJax.startup && MathJax.startup.document) {
    for (const item of MathJax.startup.document.math) {
      const bad = [];
      item.root.walkTree(node => {
        if (node.isKind("merror")) bad.push(node.attributes.get("data-mjx-error") || "TeX error");
        else if (node.isKind("mtext") && node.attributes.get("mathcolor") === "red") bad.push("undefined macro " + node.childNodes.map(c => c.text || "").join(""));
      });
      if (bad.length) report.problems.push(`formula ${JSON.stringify(item.math.slice(0, 80))} does not typeset: ${bad.join("; ")}`);
    }
  }
  const errorBoxes = document.querySelectorAll("mjx-merror, [data-mjx-error]").length;
  if (errorBoxes && !report.problems.some(p => p.includes("does not typeset")))
    report.problems.push(`${errorBoxes} MathJax error boxes on the page`);
  // The visible text outside code (where TeX is just text) and outside typeset math.
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT, {acceptNode: n =>
    n.parentElement.closest("pre, code, script, style, mjx-container") || !n.parentElement.checkVisibility()
      ? NodeFilter.FILTER_REJECT : NodeFilter.FILTER_ACCEPT});
  let text = "";
  while (walker.nextNode()) text += walker.currentNode.nodeValue;
  for (const raw of ["\\(", "\\[", "$$"]) {
    const at = text.indexOf(raw);
    if (at >= 0) report.problems.push(`raw TeX in the visible text: ${JSON.stringify(text.slice(Math.max(0, at - 20), at + 60))}`);
  }
  // Images: wait for each to load or fail, then every one must have decoded.
  await Promise.all([...document.images].map(img => { img.loading = "eager"; return img.decode().catch(() => null); }));
  for (const img of document.images)
    if (!img.complete || img.naturalWidth === 0) report.problems.push(`image did not load: ${img.getAttribute("src")}`);
  report.images = document.images.length;
  // Wide content: outputs wrap inside their cell; code and display math may scroll, but only inside
  // their own box and with a drawn scrollbar; nothing reaches past the page's column.
  const column = document.querySelector("article") || document.querySelector("main") || document.body;
  const right = column.getBoundingClientRect().right;
  for (const el of column.querySelectorAll('pre, img, table, mjx-container[display="true"]')) {
    const what = el.closest(".cell_output") ? "output" : el.closest(".cell_input") ? "code cell"
               : el.tagName === "PRE" ? "code block" : el.tagName.toLowerCase();
    const name = `${what} ${JSON.stringify((el.tagName === "IMG" ? el.getAttribute("src") : el.textContent.trim().split("\n")[0]).slice(0, 60))}`;
    if (el.getBoundingClientRect().right > right + 1)
      report.problems.push(`${name} reaches past the page column (${Math.round(el.getBoundingClientRect().right)}px > ${Math.round(right)}px)`);
    if (el.tagName === "IMG" || el.scrollWidth <= el.clientWidth + 1) continue;
    const css = getComputedStyle(el);
    const bar = el.offsetHeight - el.clientHeight - parseFloat(css.borderTopWidth) - parseFloat(css.borderBottomWidth);
    if (what === "output")
      report.problems.push(`${name} does not wrap: ${el.scrollWidth}px of text in a ${el.clientWidth}px cell (white-space ${css.whiteSpace})`);
    else if (!["auto", "scroll"].includes(css.overflowX) || css.scrollbarWidth === "none" || bar <= 0)
      report.problems.push(`${name} is cut off: ${el.scrollWidth}px of content in a ${el.clientWidth}px box, overflow-x ${css.overflowX}, ${bar}px scrollbar`);
  }
  report.height = Math.ceil(document.documentElement.scrollHeight);
  return report;
})()
"""


@dataclass
class PageReport:
    page: str
    problems: list[str] = field(default_factory=list)
    math: int = 0
    typeset: int = 0
    images: int = 0
    seconds: float = 0.0
    screenshots: list[Path] = field(default_factory=list)

    def __str__(self) -> str:
        head = f"{self.page}: {self.typeset}/{self.math} formulas typeset, {self.images} images, {self.seconds:.1f} s"
        return head + "".join(f"\n  - {p}" for p in self.problems)


class CDPError(RuntimeError):
    pass


class Chromium:
    """A headless Chromium and one page in it, spoken to over the DevTools pipe."""

    def __init__(self, executable: str):
        # A fresh, empty profile every time; Chromium's own log goes beside it, shown if it dies.
        self._dir = Path(tempfile.mkdtemp(prefix="normlab-chromium-"))
        self._log = self._dir / "chromium.log"
        cmd_r, self._cmd_w = os.pipe()
        self._res_r, res_w = os.pipe()
        # The protocol pipe is fixed at fds 3 (commands in) and 4 (replies out). Both ends are first moved
        # above 9 (close-on-exec), so that placing one at 3 cannot overwrite the other.
        cmd_r, res_w = (self._moved_up(fd) for fd in (cmd_r, res_w))

        def place_pipe() -> None:  # in the child, between fork and exec
            os.dup2(cmd_r, 3)
            os.dup2(res_w, 4)

        # close_fds=False keeps 3 and 4 open; every other descriptor Python opened is close-on-exec anyway.
        with open(self._log, "wb") as log:
            self.proc = subprocess.Popen(
                [executable, *FLAGS, f"--user-data-dir={self._dir / 'profile'}", "--remote-debugging-pipe",
                 "about:blank"],
                preexec_fn=place_pipe, close_fds=False, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        os.close(cmd_r)
        os.close(res_w)
        self._next_id = 0
        self._replies: dict[int, dict] = {}
        self._inbox: queue.Queue = queue.Queue()
        self._exited = False
        self.events: list[dict] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        try:
            self._open_page()
        except BaseException:
            self.close()
            raise

    def _open_page(self) -> None:
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Network", "Log"):
            self.call(f"{domain}.enable", session=True)
        self.call("Network.emulateNetworkConditions", session=True, offline=True, latency=0,
                  downloadThroughput=-1, uploadThroughput=-1)
        self.set_viewport(HEIGHT)
        # Headless Chromium hides scrollbars; a reader's desktop browser draws them, and so must the
        # screenshots (and the check that a box too narrow for its content shows a scrollbar).
        self.call("Emulation.setScrollbarsHidden", session=True, hidden=False)

    def set_viewport(self, height: int) -> None:
        self.call("Emulation.setDeviceMetricsOverride", session=True, width=WIDTH, height=height,
                  deviceScaleFactor=1, mobile=False)

    @staticmethod
    def _moved_up(fd: int) -> int:
        high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(fd)
        return high

    def _read(self) -> None:
        buf = b""
        while chunk := os.read(self._res_r, 1 << 16):
            buf += chunk
            *messages, buf = buf.split(b"\0")
            for m in messages:
                self._inbox.put(json.loads(m))
        self._inbox.put(None)

    def _pump(self, timeout: float) -> None:
        if self._exited:
            raise CDPError(f"Chromium exited; its log ends:\n{self._log.read_text(errors='replace')[-2000:]}")
        try:
            msg = self._inbox.get(timeout=timeout)
        except queue.Empty:
            return
        if msg is None:
            self._exited = True
            return self._pump(0)
        if "id" in msg:
            self._replies[msg["id"]] = msg
        else:
            self.events.append(msg)

    def call(self, method: str, session: bool = False, timeout: float = LOAD_TIMEOUT_S + MATHJAX_TIMEOUT_S,
             **params) -> dict:
        self._next_id += 1
        msg = {"id": self._next_id, "method": method, "params": params}
        if session:
            msg["sessionId"] = self.session
        data = json.dumps(msg).encode() + b"\0"
        while data:
            data = data[os.write(self._cmd_w, data):]
        deadline = time.monotonic() + timeout
        while self._next_id not in self._replies:
            if time.monotonic() > deadline:
                raise CDPError(f"{method}: no reply in {timeout} s")
            self._pump(0.1)
        reply = self._replies.pop(self._next_id)
        if "error" in reply:
            raise CDPError(f"{method}: {reply['error']}")
        return reply["result"]

    def wait_for(self, method: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not any(e["method"] == method for e in self.events):
            if time.monotonic() > deadline:
                return False
            self._pump(0.1)
        return True

    def close(self) -> None:
        if not self._exited:
            try:
                self.call("Browser.close", timeout=10)
            except CDPError:
                pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._cmd_w)
        self._reader.join(timeout=5)
        os.close(self._res_r)
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> "Chromium":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def problems_from_events(events: list[dict]) -> list[str]:
    """Network requests off the machine, uncaught exceptions and console errors seen while a page ran."""
    found = []
    for e in events:
        method, p = e["method"], e.get("params", {})
        if method == "Network.requestWillBeSent" and not p["request"]["url"].startswith(LOCAL_SCHEMES):
            found.append(f"request to the network: {p['request']['url']}")
        elif method == "Runtime.exceptionThrown":
            d = p["exceptionDetails"]
            found.append(f"JavaScript error: {d.get('exception', {}).get('description') or d.get('text')}".splitlines()[0])
        elif method == "Runtime.consoleAPICalled" and p["type"] in ("error", "assert"):
            found.append("console error: " + " ".join(str(a.get("value", a.get("description", ""))) for a in p["args"]))
        elif method == "Log.entryAdded" and p["entry"]["level"] == "error":
            found.append(f"browser error: {p['entry']['text']} {p['entry'].get('url', '')}".strip())
    return found


def check_page(browser: Chromium, html_dir: Path, page: str, shots: Path | None) -> PageReport:
    start = time.monotonic()
    report = PageReport(page=page)
    html_file = html_dir / page
    browser.events.clear()
    browser.call("Page.navigate", session=True, url=html_file.resolve().as_uri())
    if not browser.wait_for("Page.loadEventFired", LOAD_TIMEOUT_S):
        report.problems.append(f"the page did not finish loading in {LOAD_TIMEOUT_S} s")
    probe = browser.call("Runtime.evaluate", session=True, awaitPromise=True, returnByValue=True,
                         expression=PAGE_PROBE % {"timeout_ms": MATHJAX_TIMEOUT_S * 1000})
    if "exceptionDetails" in probe:
        report.problems.append(f"the check itself failed in the page: {probe['exceptionDetails']}")
    else:
        found = probe["result"]["value"]
        report.problems += found["problems"]
        report.math, report.typeset, report.images = found["math"], found["typeset"], found["images"]
        if shots is not None:
            report.screenshots = screenshot(browser, found["height"], shots, page)
    report.problems += problems_from_events(browser.events)
    report.seconds = time.monotonic() - start
    return report


def screenshot(browser: Chromium, height: int, shots: Path, page: str) -> list[Path]:
    """The whole page, top to bottom, as PNGs: page.png, then page-2.png, ... for a long page.

    Each piece is the viewport, made SHOT_HEIGHT tall and scrolled down, rather than one capture
    "beyond the viewport": only the viewport gets its scrollbars painted, as a reader sees them.
    """
    stem = page.removesuffix(".html").replace("/", "--")
    view = min(SHOT_HEIGHT, height)
    browser.set_viewport(view)
    paths = []
    for i, top in enumerate(range(0, height, SHOT_HEIGHT)):
        # The last piece ends at the bottom of the page, overlapping the one before it.
        browser.call("Runtime.evaluate", session=True, awaitPromise=True, expression=(
            f"window.scrollTo(0, {min(top, height - view)}); "
            "new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))"))
        shot = browser.call("Page.captureScreenshot", session=True, format="png")
        paths.append(shots / (f"{stem}.png" if i == 0 else f"{stem}-{i + 1}.png"))
        paths[-1].write_bytes(base64.b64decode(shot["data"]))
    browser.set_viewport(HEIGHT)
    return paths


def write_index(shots: Path, reports: list[PageReport]) -> Path:
    """One page that shows every screenshot, for a person to look over the whole book at once."""
    rows = "\n".join(
        f'<figure><figcaption>{html.escape(r.page)}: {"OK" if not r.problems else html.escape("; ".join(r.problems))}'
        f'</figcaption>' + "".join(f'<a href="{p.name}"><img src="{p.name}" loading="lazy"></a>' for p in r.screenshots)
        + "</figure>" for r in reports if r.screenshots)
    index = shots / "index.html"
    index.write_text("<!doctype html><meta charset=utf-8><title>Book screenshots</title><style>"
                     "body{font-family:sans-serif;display:flex;flex-wrap:wrap;gap:1em}"
                     "figure{width:320px;margin:0}img{width:320px;border:1px solid #ccc}</style>\n" + rows + "\n")
    return index


def check_book(html_dir: Path, pages: list[str], shots: Path | None = None,
               executable: str | None = None) -> list[PageReport]:
    """Check each page (paths relative to html_dir) in one headless Chromium; screenshots go to shots."""
    executable = executable or find_chromium()
    if executable is None:
        raise FileNotFoundError(INSTALL_HINT)
    if shots is not None:
        shutil.rmtree(shots, ignore_errors=True)
        shots.mkdir(parents=True)
    reports = []
    with Chromium(executable) as browser:
        for page in pages:
            if not (html_dir / page).is_file():
                reports.append(PageReport(page=page, problems=[f"{html_dir / page} was not built"]))
                continue
            reports.append(check_page(browser, html_dir, page, shots))
    if shots is not None:
        write_index(shots, reports)
    return reports


def main(argv: list[str]) -> int:
    html_dir = Path(argv[0] if argv else "_build/html")
    book = html_dir.parent.parent
    reports = check_book(html_dir, toc_pages(book), shots=html_dir.parent / "screenshots")
    for r in reports:
        print(r)
    return 1 if any(r.problems for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
