"""Reading result files (ours and the predecessor's) into tables, plots and statistics for publication.

load → records → tables (+ stats) → render; plots; schema_doc; commands adds `atlas report` and `atlas sweep`."""
