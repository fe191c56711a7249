"""Shared infrastructure every stage stands on: typed records, atomic IO and provenance,
the one image decoder and its limits, the preprocessing record, stage stamps,
the pinned GPU release (package data) and package-data lookup. Imports nothing
of this package."""
