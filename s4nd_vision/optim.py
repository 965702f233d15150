"""`s4nd_vision.optim`: the SSM parameter groups of `s4nd_vision.train.optim` under a short name."""
from .train.optim import *  # noqa: F401,F403
from .train.optim import __all__  # noqa: F401
