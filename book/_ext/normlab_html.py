"""The book's own fix to its HTML: each page loads every inline script once.

Sphinx 7.4 puts a body-only script (`add_js_file(None, body=...)`) on each page twice when an extension
registers it after the builder started: once as given, once re-read from the registry with filename ''
instead of None, so the two do not compare equal. sphinx-thebe registers
`const THEBE_JS_URL = ...` that way, and its second copy throws "Identifier 'THEBE_JS_URL' has already
been declared" on every page (tests/browser.py fails a page on any JavaScript error).
"""

from __future__ import annotations


def _load_each_script_once(app, pagename, templatename, context, doctree) -> None:
    seen, unique = set(), []
    for js in context.get("script_files", []):
        key = (getattr(js, "filename", js) or "", tuple(sorted(getattr(js, "attributes", {}).items())))
        if key not in seen:
            seen.add(key)
            unique.append(js)
    context["script_files"] = unique


def setup(app):
    # Late, so that the scripts added to this page by other extensions are there to compare.
    app.connect("html-page-context", _load_each_script_once, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
