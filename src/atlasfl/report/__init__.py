"""Reading result files (ours and the predecessor's) into tables, plots and statistics for publication.

A library with no command-line code: load → records → tables (+ stats) → render; plots; schema_doc.
`atlas report` (atlasfl.cli.report) is its face."""
