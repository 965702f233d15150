"""A model with its constructor arguments on a command line: `NAME[,key=value...]`.

`vit_s4nd_small_patch16_224,token_layout=1d` or `convnext_s4nd_atto,dims=[8,16,16,16],d_state=8`: values are
read as YAML 1.2 (numbers, booleans, lists, strings), and commas inside brackets, braces or quotes belong to a
value. A key given twice, and a null value (timm.create_model drops it: the model's default would apply), are
errors.
"""
from typing import Any, Dict, List, Optional, Tuple

import yaml

from .yaml12 import load_yaml

__all__ = ['parse_model_spec', 'parse_model_option', 'NULL_OPTION', 'closest_model_hint']

# why a model argument may not be null (None)
NULL_OPTION = ('timm.create_model drops null (None) arguments, so the model would take its default: leave it out '
               'for the default, or give a value (e.g. bandlimit=0 turns band-limiting off)')


def closest_model_hint(name: str) -> str:
    """' (did you mean NAME?)' with the registered timm model name closest to a misspelled `name`, or ''."""
    import difflib

    import timm
    close = difflib.get_close_matches(name, timm.list_models(), n=1)
    return f' (did you mean {close[0]}?)' if close else ''


def _split_options(spec: str, separator: str = ',') -> List[str]:
    """`spec` split at the `separator`s (commas) outside brackets, braces and quoted values (ValueError for a bracket
    closed unopened or a quote never closed). A quote opens a quoted value only where YAML's would, at a value's start
    (after `=`, `[`, `{`, `,` or `:`): elsewhere it is a character of a plain value (`a=it's`)."""
    parts, depth, start, quote = [], 0, 0, None
    for i, char in enumerate(spec):
        if quote is not None:
            quote = None if char == quote else quote
        elif char in '"\'' and i > 0 and spec[i - 1] in '=[{,:':
            quote = char
        else:
            depth += (char in '[{') - (char in ']}')
            if depth < 0:
                raise ValueError(f'{spec!r} closes a bracket it never opened (at {spec[:i + 1]!r})')
            if char == separator and depth == 0:
                parts.append(spec[start:i])
                start = i + 1
    if quote is not None:
        raise ValueError(f'{spec!r} opens a quote it never closes')
    parts.append(spec[start:])
    return parts


def parse_model_spec(spec: str) -> Tuple[str, Dict[str, Any]]:
    """'NAME[,key=value...]' -> (NAME, {key: value}); ValueError naming the spec when it is malformed."""
    name, *options = _split_options(spec)
    if not name:
        raise ValueError(f'a model must look like NAME[,key=value...], got {spec!r}')
    kwargs = {}
    for option in options:
        key, value = parse_model_option(option, spec)
        if key in kwargs:
            raise ValueError(f'model option {key!r} is given twice in {spec!r}')
        kwargs[key] = value
    return name, kwargs


def parse_model_option(option: str, spec: Optional[str] = None) -> Tuple[str, Any]:
    """'key=value' (a model constructor argument; of `spec`, for messages) -> (key, value read as YAML); ValueError
    when it is malformed or null."""
    where = f' in {spec!r}' if spec else ''
    key, sep, value = option.partition('=')
    key = key.strip()
    if not sep or not key or not value:
        raise ValueError(f'model option {option!r}{where} must look like key=value')
    try:
        parsed = load_yaml(value)
    except yaml.YAMLError:
        raise ValueError(f'model option {option!r}{where}: {value!r} is not a YAML value') from None
    if parsed is None:
        raise ValueError(f'model option {option!r}{where} is null: {NULL_OPTION}')
    return key, parsed
