"""Process groups (state), autograd collectives (mappings), pipeline P2P and tensor-parallel RNG."""
from megaflow.parallel import flight_recorder

flight_recorder.install()  # first, so modules that bind a collective at import get the recorded one
from megaflow.parallel import state  # noqa: E402,F401
