"""YAML read with YAML 1.2's booleans: only true / false are booleans. PyYAML follows YAML 1.1, where an unquoted
no / yes / on / off is one too, so `train.mixed_precision=no` (Accelerate's own spelling) arrived as False."""
import re
from typing import Any

import yaml

__all__ = ['load_yaml']

_BOOL = 'tag:yaml.org,2002:bool'


class _Loader(yaml.SafeLoader):
    pass


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(_BOOL, re.compile(r'^(?:true|True|TRUE|false|False|FALSE)$'), list('tTfF'))


def load_yaml(text) -> Any:
    """`yaml.safe_load` of `text` (a string or stream) with YAML 1.2's booleans."""
    return yaml.load(text, Loader=_Loader)
