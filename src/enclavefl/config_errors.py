"""Pydantic validation errors as the job file's messages: dotted key, value given, what is allowed.

A line reads ``round.fraction = 2: must be <= 1``. An unknown key's line lists
the keys valid at that place and suggests the closest one, as in
``round.min_worker: unknown key; did you mean min_workers? (valid: ...)``; the
valid keys are found by walking the models along the error's location, through
tagged unions (``server.optimizer`` with ``name: fedadam`` lists FedAdam's keys).
"""

from __future__ import annotations

import difflib
import types
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, Tag, ValidationError

__all__ = ["describe_errors"]

_BOUNDS = {"greater_than_equal": ("ge", ">="), "greater_than": ("gt", ">"),
           "less_than_equal": ("le", "<="), "less_than": ("lt", "<")}


def _variants(annotation: Any) -> list[tuple[str | None, type[BaseModel]]]:
    """The models a field may hold, each with the tag that selects it in a union (None outside a union)."""
    origin = get_origin(annotation)
    if origin is Annotated:
        inner, *meta = get_args(annotation)
        tags = [m.tag for m in meta if isinstance(m, Tag)]
        found = _variants(inner)
        return [(tags[0], cls) for _, cls in found] if tags else found
    if origin is Union or origin is types.UnionType:
        out: list[tuple[str | None, type[BaseModel]]] = []
        for arg in get_args(annotation):
            for tag, cls in _variants(arg):
                name = cls.model_fields.get("name")
                if tag is None and name is not None and isinstance(name.default, str):
                    tag = name.default  # a union discriminated by its `name` field
                out.append((tag, cls))
        return out
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [(None, annotation)]
    return []


def _walk(root: type[BaseModel], loc: Sequence[Any]) -> tuple[list[str], type[BaseModel] | None]:
    """The key path of ``loc`` as the job file spells it, and the model ``loc`` leads to (None past the models).

    Pydantic puts the selected variant's tag into an error's location
    (``server.optimizer.fedadam.beta1``); the job file has no such level, so a
    tag is left out of the path unless it ends it.
    """
    path: list[str] = []
    model: type[BaseModel] | None = root
    i = 0
    while i < len(loc):
        part = loc[i]
        path.append(str(part))
        i += 1
        field = model.model_fields.get(str(part)) if model is not None else None
        model = None
        if field is None:
            continue  # a dict's key or a list's index: the rest is kept as it is
        variants = _variants(field.annotation)
        if len(variants) == 1 and variants[0][0] is None:
            model = variants[0][1]
        elif i < len(loc):
            model = next((cls for tag, cls in variants if tag is not None and tag == loc[i]), None)
            if model is not None:
                if i == len(loc) - 1:
                    path.append(str(loc[i]))
                i += 1
    return path, model


def _unknown_key(root: type[BaseModel], loc: Sequence[Any], path: str, aliases: Sequence[str]) -> str:
    parent = _walk(root, loc[:-1])[1]  # the model whose keys sit where the unknown one is
    if parent is None:
        return f"{path}: unknown key"
    valid = sorted(parent.model_fields)
    candidates = valid + (list(aliases) if parent is root else [])
    close = difflib.get_close_matches(str(loc[-1]), candidates, n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    return f"{path}: unknown key{hint} (valid: {', '.join(valid)})"


def _number(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _describe(error: Mapping[str, Any], root: type[BaseModel], prefix: tuple[str, ...], aliases: Sequence[str]) -> str:
    loc = tuple(error["loc"])
    path = ".".join([*prefix, *_walk(root, loc)[0]]) or "(top level)"
    kind = error["type"]
    given = error.get("input")
    ctx = error.get("ctx") or {}
    if kind == "union_tag_invalid":
        return f"{path}.name = {ctx.get('tag')!r}: must be one of {ctx.get('expected_tags')}"
    if kind == "value_error" and not loc:
        return str(error["msg"]).removeprefix("Value error, ")
    if kind == "extra_forbidden":
        return _unknown_key(root, loc, path, aliases)
    if kind == "missing":
        return f"{path}: required key is missing"
    msg = str(error["msg"]).replace("Input should be", "must be")
    if kind in _BOUNDS:
        name, sign = _BOUNDS[kind]
        msg = f"must be {sign} {_number(ctx.get(name))}"
    elif "expected" in ctx and kind.startswith("literal"):
        msg = f"must be one of {ctx['expected']}"
    return f"{path} = {given!r}: {msg}"


def describe_errors(exc: ValidationError, *, root: type[BaseModel], prefix: tuple[str, ...] = (),
                    aliases: Sequence[str] = ()) -> list[str]:
    """One line per error of validating ``root``: the dotted key, the value given and what is allowed.

    An unknown key's line lists the keys valid at its place and suggests the closest one.

    Args:
        root: the model that was validated.
        prefix: where ``root`` sits in the job file (``("task", "params")`` for a task's params).
        aliases: other names accepted at ``root``'s top level, offered as suggestions too.
    """
    return [_describe(e, root, prefix, aliases) for e in exc.errors(include_url=False)]
