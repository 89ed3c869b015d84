"""The ATLAS Flower app, as pyproject.toml's [tool.flwr.app.components] names it:
`flwr run . <superlink>` runs `server_app` on the SuperLink and `client_app` on every SuperNode.
The run config comes from [tool.flwr.app.config] (see `flower_server.config_from_run_config`)."""
from atlasfl.federation.flower_client import app as client_app
from atlasfl.federation.flower_server import make_server_app

server_app = make_server_app()

__all__ = ["client_app", "server_app"]
