"""The Flower engine, laid out as a Flower app: `server_app.py` (the ServerApp and its run config),
`strategy.py` (the strategy that drives the transport-free `federation.server.Server`),
`client_app.py` (the ClientApp around `federation.training`, `.evaluation` and `.fingerprint`),
`resident.py` (the ClientApp a deployed SuperNode runs: it relays each message to `client_app` in a worker
process kept between messages), `records.py` (what the messages carry) and `simulation.py` (`atlas run
--engine flower`: the app on Flower's Simulation Runtime, which calls `client_app` directly)."""
