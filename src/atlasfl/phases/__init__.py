"""Pure math over tensors and arrays: no I/O, no globals, no model."""

# The rules `--aggregation` names (phases.aggregation): here, so settings can name them without importing torch.
AGGREGATIONS = ("svd", "fedavg")
# The server optimisers `--server-optimizer` names (phases.server_optimizer), for the same reason.
SERVER_OPTIMIZERS = ("sgd", "avgm", "adam", "yogi")
