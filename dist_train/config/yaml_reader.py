"""The YAML reader of config files and override values: PyYAML's SafeLoader with numbers as users write them,
refusing the documents PyYAML accepts but a config must not be:

- a key given twice in one mapping: PyYAML keeps the second, so a repeated `train:` section silently replaced
  the first;
- nesting deeper than MAX_DEPTH: PyYAML composes recursively, and a deep file ended in a RecursionError;
- aliases that expand past MAX_VALUES values, or refer to the collection they are in: a 400-byte "billion
  laughs" document is millions of values to whatever walks it (an error message quoting it was 76 MB).
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from dist_train.config.quote import quote

MAX_DEPTH = 32
"""Levels of nesting, aliases expanded; a config has 4 (`data: sources: - path:`)."""

MAX_VALUES = 100_000
"""Values (scalars and collections) of a document with its aliases expanded; a config has a few hundred."""

MERGE_TAG = "tag:yaml.org,2002:merge"


class YamlRefused(yaml.MarkedYAMLError):
    """Valid YAML that a config may not be; `problem` says why and what to do, `problem_mark` where."""


class ConfigYamlLoader(yaml.SafeLoader):
    """PyYAML follows YAML 1.1, where `1e-3` (no dot) is a string; users write it as a number."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise YamlRefused(problem=f"nested deeper than {MAX_DEPTH} levels; a config has 4 "
                                          f"(data: sources: - path:)", problem_mark=self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def compose_mapping_node(self, anchor: str | None) -> yaml.MappingNode:
        node = super().compose_mapping_node(anchor)
        _refuse_duplicate_keys(node)
        return node

    def compose_document(self) -> yaml.Node:
        node = super().compose_document()
        _Expansion().size(node, 1)
        return node

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        try:
            return super().construct_yaml_int(node)
        except ValueError:  # Python refuses to parse an int of more than 4,300 digits
            raise YamlRefused(problem=f"the integer {quote(node.value)} has too many digits",
                              problem_mark=node.start_mark) from None


ConfigYamlLoader.add_constructor("tag:yaml.org,2002:int", ConfigYamlLoader.construct_yaml_int)
ConfigYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9_]+(?:[eE][-+]?[0-9]+)?
               |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""", re.VERBOSE),
    list("-+0123456789."),
)


def _refuse_duplicate_keys(node: yaml.MappingNode) -> None:
    """A scalar key given twice (`<<` merge keys may repeat, and merged keys may be overridden: YAML's rule)."""
    first_of: dict[tuple[str, str], yaml.Node] = {}
    for key, _ in node.value:
        if not isinstance(key, yaml.ScalarNode) or key.tag == MERGE_TAG:
            continue
        first = first_of.get((key.tag, key.value))
        if first is not None:
            raise YamlRefused(problem=f"key {quote(key.value)} is given twice in one mapping, on line "
                                      f"{first.start_mark.line + 1} and line {key.start_mark.line + 1}; the second "
                                      f"would silently replace the first: keep one (merge the two)",
                              problem_mark=key.start_mark)
        first_of[key.tag, key.value] = key


class _Expansion:
    """Sizes of the node graph with aliases expanded, in time linear in its distinct nodes (each node is
    measured once), refusing a cycle, a depth past MAX_DEPTH or a size past MAX_VALUES as soon as it shows."""

    def __init__(self) -> None:
        self.measured: dict[int, tuple[int, int]] = {}  # id(node) -> (values, levels below and including it)
        self.open: set[int] = set()

    def size(self, node: yaml.Node, depth: int) -> tuple[int, int]:
        """(values, levels) of `node` at `depth` (the root is at 1); recurses at most MAX_DEPTH deep."""
        if depth > MAX_DEPTH:
            self.refuse_depth(node)
        if id(node) in self.measured:
            values, levels = self.measured[id(node)]
        else:
            if id(node) in self.open:
                raise YamlRefused(problem="an alias refers to the collection that holds it (an endless "
                                          "document): write the values out", problem_mark=node.start_mark)
            self.open.add(id(node))
            values, levels = 1, 1
            for child in _children(node):
                child_values, child_levels = self.size(child, depth + 1)
                values, levels = values + child_values, max(levels, child_levels + 1)
                if values > MAX_VALUES:
                    raise YamlRefused(problem=f"with its aliases (*name) expanded this holds more than "
                                              f"{MAX_VALUES:,} values (a config has a few hundred): write the "
                                              f"values out, or use fewer aliases", problem_mark=node.start_mark)
            self.open.discard(id(node))
            self.measured[id(node)] = values, levels
        if depth + levels - 1 > MAX_DEPTH:  # a node measured before, reached again deeper down
            self.refuse_depth(node)
        return values, levels

    @staticmethod
    def refuse_depth(node: yaml.Node) -> None:
        raise YamlRefused(problem=f"with its aliases (*name) expanded this is nested deeper than {MAX_DEPTH} "
                                  f"levels; a config has 4 (data: sources: - path:)", problem_mark=node.start_mark)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return node.value if isinstance(node, yaml.SequenceNode) else []


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=ConfigYamlLoader)
