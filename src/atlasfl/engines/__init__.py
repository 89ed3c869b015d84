"""The engines that drive the federation core (`atlasfl.federation`): `inprocess` (one process, the
default) and `flower` (a Flower app). Engines import the core, never each other."""
