"""Small shared utilities: `errors` (the user-facing error type), `files` (atomic writes), `sources`
(pinned PyPI packages: fetch, verify, cache; progress messages)."""
