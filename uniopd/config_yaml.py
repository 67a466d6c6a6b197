"""The YAML reader of run configs: PyYAML's safe loader with three guards.

* Duplicate keys are an error naming the file and both lines. Plain PyYAML keeps the last
  one, so a second `trainer:` block silently replaced the first.
* Aliases may not expand past `MAX_EXPANDED_NODES`. PyYAML shares an aliased node instead
  of copying it, so a "billion laughs" document loads quickly as a small graph, but
  everything that walks the result (merging, conversion, an error message's repr) pays for
  the full expansion: gigabytes and hours. A recipe has a few hundred nodes.
* Recursive aliases (`&a [*a]`) are an error: no config value is infinite.
"""

from __future__ import annotations

from typing import Any

import yaml

__all__ = ["MAX_EXPANDED_NODES", "ConfigYAMLError", "load_yaml"]

MAX_EXPANDED_NODES = 100_000
_MERGE_TAG = "tag:yaml.org,2002:merge"


class ConfigYAMLError(yaml.YAMLError):
    """A document PyYAML accepts but a config must not be; the message names the source."""


def _where(node: yaml.Node) -> str:
    mark = node.start_mark
    return f"{mark.name}:{mark.line + 1}"


class _ConfigLoader(yaml.SafeLoader):
    def compose_document(self) -> Any:
        node = super().compose_document()
        if node is not None:
            _check_expansion(node)
        return node

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, yaml.Node] = {}
            # Before flatten_mapping: keys a `<<` merge brings in may be overridden, that is its point.
            for key_node, _ in node.value:
                if key_node.tag == _MERGE_TAG:
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: the base constructor reports it
                    continue
                if first is not None:
                    raise ConfigYAMLError(f"{_where(key_node)}: duplicate key {_short(key)} (first at line "
                                          f"{first.start_mark.line + 1}); a repeated key or section would "
                                          f"silently replace the first")
                seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value) if isinstance(value, (str, int, float, bool)) or value is None else type(value).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_expansion(root: yaml.Node) -> None:
    """Raise unless the document, with every alias expanded, has at most MAX_EXPANDED_NODES nodes."""
    sizes: dict[int, int] = {}
    in_progress: set[int] = set()
    # Iterative post-order walk: deep nesting must not hit Python's recursion limit here.
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            in_progress.discard(key)
            children = _children(node)
            total = 1 + sum(sizes[id(c)] for c in children)
            if total > MAX_EXPANDED_NODES:
                raise ConfigYAMLError(f"{_where(node)}: aliases expand this value to more than "
                                      f"{MAX_EXPANDED_NODES} nodes (an alias bomb?); write the value out")
            sizes[key] = total
            continue
        if key in sizes:
            continue
        if key in in_progress:
            raise ConfigYAMLError(f"{_where(node)}: a recursive alias (a value that contains itself)")
        in_progress.add(key)
        stack.append((node, True))
        for child in _children(node):
            if id(child) in in_progress:
                raise ConfigYAMLError(f"{_where(child)}: a recursive alias (a value that contains itself)")
            if id(child) not in sizes:
                stack.append((child, False))


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def load_yaml(text: str, source: str = "<string>") -> Any:
    """The document in `text`; errors (PyYAML's and ours) name `source` and the line."""
    loader = _ConfigLoader(text)
    loader.name = source  # marks (and so every error) carry the file name instead of "<unicode string>"
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()
