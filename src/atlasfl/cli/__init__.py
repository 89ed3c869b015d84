"""The `atlas` command line: `app.py` registers the commands of `run.py` (run, demo, presets),
`sweep.py` and `report.py`; `options.py` derives their shared flags from `RunConfig`."""
