"""`notellm2 index ...` verbs: build a persisted search index with its related-notes table, update it with
a day's new, changed and deleted notes (docs/new_notes.md)."""
