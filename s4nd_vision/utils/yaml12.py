"""YAML read with YAML 1.2's core schema for scalars. PyYAML follows YAML 1.1, where an unquoted no / yes / on / off
is a boolean (so `train.mixed_precision=no`, Accelerate's own spelling, arrived as False), `1e-3` is a string (a
float needs a dot: `model.kwargs.ls_init_value=1e-6` reached the model as '1e-6'), `010` is octal 8, `1:30` is 90
and `2020-01-01` a date. Here only true / false are booleans, numbers are YAML 1.2's (decimal, 0o octal, 0x hex
integers; floats with or without a dot or exponent, .inf, .nan) and dates stay strings.
A key given twice in one mapping is an error, as YAML says (PyYAML kept the last one: a second `optim:` section
silently replaced the first).
`dump_yaml` writes what `load_yaml` (and a YAML 1.1 reader) reads back as written: a string that either reads as
something else (`1e3`, `0o17`: YAML 1.1 writers leave them plain) is quoted."""
import re
from typing import Any

import yaml

__all__ = ['load_yaml', 'dump_yaml']

_BOOL, _INT, _FLOAT = 'tag:yaml.org,2002:bool', 'tag:yaml.org,2002:int', 'tag:yaml.org,2002:float'
_TIMESTAMP = 'tag:yaml.org,2002:timestamp'
_INT_RE = re.compile(r'^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$')
_FLOAT_RE = re.compile(r'^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?'
                       r'|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$')


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

    def construct_yaml_int(self, node) -> int:
        value = self.construct_scalar(node)
        return int(value, 0) if value[:2] in ('0o', '0x') else int(value, 10)  # (int('010', 10) is 10, not 8)

    def construct_yaml_float(self, node) -> float:
        value = self.construct_scalar(node).lower()
        return float(value.replace('.inf', 'inf').replace('.nan', 'nan'))


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_BOOL, _INT, _FLOAT, _TIMESTAMP)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(_BOOL, re.compile(r'^(?:true|True|TRUE|false|False|FALSE)$'), list('tTfF'))
_Loader.add_implicit_resolver(_INT, _INT_RE, list('-+0123456789'))
_Loader.add_implicit_resolver(_FLOAT, _FLOAT_RE, list('-+.0123456789'))
_Loader.add_constructor(_INT, _Loader.construct_yaml_int)
_Loader.add_constructor(_FLOAT, _Loader.construct_yaml_float)


def load_yaml(text) -> Any:
    """`yaml.safe_load` of `text` (a string or stream) with YAML 1.2's booleans and numbers."""
    return yaml.load(text, Loader=_Loader)


class _Resolver12(yaml.resolver.Resolver):
    yaml_implicit_resolvers = _Loader.yaml_implicit_resolvers


_RESOLVER_12 = _Resolver12()


class _Dumper(yaml.SafeDumper):

    def resolve(self, kind, value, implicit):
        """YAML 1.1's tag of a plain scalar, or YAML 1.2's where 1.1 reads a string: the emitter quotes a string
        that either reads as another type (a run's config.yaml with train.output_dir '1e3' read back 1000.0)."""
        tag = super().resolve(kind, value, implicit)
        if kind is yaml.ScalarNode and implicit[0] and tag == 'tag:yaml.org,2002:str':
            return _RESOLVER_12.resolve(kind, value, implicit)
        return tag


def dump_yaml(data, stream=None, **kwargs) -> Any:
    """`yaml.safe_dump` of `data` that `load_yaml` (and `yaml.safe_load`) read back as it is."""
    return yaml.dump(data, stream, Dumper=_Dumper, **kwargs)
