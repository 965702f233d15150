"""A model with its constructor arguments on a command line: `NAME[,key=value...]`.

`vit_s4nd_small_patch16_224,token_layout=1d` or `convnext_s4nd_atto,dims=[8,16,16,16],d_state=8`: values are
read as YAML (numbers, booleans, lists, strings), and commas inside brackets or braces belong to a value.
"""
from typing import Any, Dict, List, Tuple

import yaml

from .yaml12 import load_yaml

__all__ = ['parse_model_spec']


def _split_options(spec: str) -> List[str]:
    parts, depth, start = [], 0, 0
    for i, char in enumerate(spec):
        depth += (char in '[{') - (char in ']}')
        if char == ',' and depth == 0:
            parts.append(spec[start:i])
            start = i + 1
    parts.append(spec[start:])
    return parts


def parse_model_spec(spec: str) -> Tuple[str, Dict[str, Any]]:
    """'NAME[,key=value...]' -> (NAME, {key: value}); ValueError naming the spec when it is malformed."""
    name, *options = _split_options(spec)
    if not name:
        raise ValueError(f'a model must look like NAME[,key=value...], got {spec!r}')
    kwargs = {}
    for option in options:
        key, sep, value = option.partition('=')
        if not sep or not key or not value:
            raise ValueError(f'model option {option!r} in {spec!r} must look like key=value')
        try:
            kwargs[key] = load_yaml(value)
        except yaml.YAMLError:
            raise ValueError(f'model option {option!r} in {spec!r}: {value!r} is not a YAML value') from None
    return name, kwargs
