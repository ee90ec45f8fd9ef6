"""Process groups (state), autograd collectives (mappings), pipeline P2P and tensor-parallel RNG."""
from megaflow.parallel import state  # noqa: F401
