"""The `atlas` command line: `app.py` registers the commands of `run.py` (run, demo, presets),
`sweep.py`, `report.py` and `configfile.py` (config); `options.py` derives their shared flags from `RunConfig`."""
