"""The Flower engine, laid out as a Flower app: `server_app.py` (the ServerApp and its run config: it runs
`federation.driver` over the strategy), `strategy.py` (the driver's transport on a Flower grid: each step as
messages and replies), `membership.py` (which node serves which client, and which are up to date),
`accounting.py` (the message sizes and memory the clients report), `polling.py` (sending and waiting for
replies), `client_app.py` (the ClientApp around `federation.training`, `.evaluation` and `.fingerprint`),
`resident.py` (the ClientApp a deployed SuperNode runs: it relays each message to `client_app` in a worker
process kept between messages), `records.py` (what the messages carry) and `simulation.py` (`atlas run
--engine flower`: the app on Flower's Simulation Runtime, which calls `client_app` directly)."""
