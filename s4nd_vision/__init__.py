"""S4ND (multidimensional state-space global convolutions) for the timm ecosystem.

Importing the package registers its models with timm (timm has no plugin mechanism: `timm.create_model`,
`hf-hub:` and `local-dir:` names of these models need `import s4nd_vision` first). The other subpackages
(`train`, `eval`, `bench`, `deploy`, `data`, `utils`) and `optim` (the SSM parameter groups, `s4nd_vision.train.optim`)
load on first use, e.g. `s4nd_vision.optim.param_groups_ssm` right after `import s4nd_vision`.
"""
import importlib

from . import layers, models
from .layers import S4ND

__version__ = '0.1.0'

_LAZY = ('bench', 'cli', 'data', 'deploy', 'eval', 'optim', 'train', 'utils')


def __getattr__(name: str):
    if name in _LAZY:
        return importlib.import_module(f'.{name}', __name__)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
