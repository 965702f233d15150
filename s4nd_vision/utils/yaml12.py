"""YAML read with YAML 1.2's booleans: only true / false are booleans. PyYAML follows YAML 1.1, where an unquoted
no / yes / on / off is one too, so `train.mixed_precision=no` (Accelerate's own spelling) arrived as False.
A key given twice in one mapping is an error, as YAML says (PyYAML kept the last one: a second `optim:` section
silently replaced the first)."""
import re
from typing import Any

import yaml

__all__ = ['load_yaml']

_BOOL = 'tag:yaml.org,2002:bool'


class _Loader(yaml.SafeLoader):

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True) if key_node.tag != 'tag:yaml.org,2002:merge' else None
            try:
                duplicate = key is not None and key in seen
            except TypeError:  # (an unhashable key: the constructor below reports it)
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError('while constructing a mapping', node.start_mark,
                                                        f'found the key {key!r} twice', key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(_BOOL, re.compile(r'^(?:true|True|TRUE|false|False|FALSE)$'), list('tTfF'))


def load_yaml(text) -> Any:
    """`yaml.safe_load` of `text` (a string or stream) with YAML 1.2's booleans."""
    return yaml.load(text, Loader=_Loader)
