"""nbval collects the book's chapters here; `drafts/` holds chapters rewritten for records that are still
being recorded (each moves up, replacing its chapter, in the commit that adds its record), so it is
neither built nor executed."""

collect_ignore = ["drafts"]
