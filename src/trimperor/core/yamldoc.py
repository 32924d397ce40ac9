"""YAML and JSON vassal documents (pure): :mod:`trimperor.core.configfile`'s rules.

Both are read as YAML nodes (a JSON document is converted to the nodes it would
be) and the nodes into :class:`~trimperor.core.configfile.Options`. Imported
by :mod:`~trimperor.core.configfile` on first use, so that an emperor whose
vassals are INI or XML does without PyYAML.
"""

from __future__ import annotations

import json

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.reader import ReaderError

from trimperor.core.configfile import Options, _error, _error_at, _options, _runs
from trimperor.core.errors import ConfigError

__all__ = ["MAX_DEPTH", "dump_yaml", "parse_json", "parse_yaml"]

_TAG = "tag:yaml.org,2002:"
_MAP, _SEQ, _STR, _NULL, _BOOL = (_TAG + t for t in ("map", "seq", "str", "null", "bool"))
# Resolved tags whose scalars are kept as written: all values are strings.
_TEXT_TAGS = frozenset(_TAG + t for t in ("str", "int", "float", "timestamp", "value", "merge"))
_BOOLS = {  # YAML 1.1 booleans, lower-cased
    **dict.fromkeys(("true", "yes", "on"), "true"),
    **dict.fromkeys(("false", "no", "off"), "false"),
}


#: Deepest nesting a YAML document may have. A vassal needs three levels
#: (sections, options, lists); PyYAML's composer recurses per level, and
#: thousands of levels cost it seconds.
MAX_DEPTH = 32


class _NoAliasLoader(yaml.SafeLoader):
    """Composes a document, refusing aliases.

    An alias repeats a node without its text, so a few kilobytes of them can
    stand for gigabytes of options; uWSGI's own YAML reader has none either.
    Anchors alone are harmless and accepted.
    """

    _depth = 0

    def compose_node(self, parent: Node | None, index: int) -> Node | None:
        event: yaml.Event = self.peek_event()  # type: ignore[no-untyped-call]
        mark = event.start_mark if isinstance(event.start_mark, yaml.Mark) else None
        if isinstance(event, yaml.AliasEvent):
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not supported", mark)
        if self._depth >= MAX_DEPTH:
            raise yaml.composer.ComposerError(
                None, None, f"nested deeper than {MAX_DEPTH} levels", mark
            )
        self._depth += 1
        try:
            node: Node | None = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        return node


def parse_yaml(name: str, text: str) -> Options:
    """Parse a YAML document (see the module documentation for the rules).

    The document is composed, not constructed: no Python object is built from a
    tag, and scalars keep their text. Aliases are refused (see _NoAliasLoader).
    """
    try:
        root = yaml.compose(text, Loader=_NoAliasLoader)
    except yaml.MarkedYAMLError as exc:
        message = exc.problem or exc.context or "invalid YAML"
        if exc.problem and exc.context:
            message = f"{exc.problem} ({exc.context})"
        mark = exc.problem_mark or exc.context_mark
        if mark is None:
            raise _error(name, message) from None
        raise _error(name, message, mark.line + 1, mark.column + 1) from None
    except ReaderError as exc:
        message = f"unacceptable character #x{exc.character:04x}: {exc.reason}"
        raise _error_at(name, text, exc.position, message) from None
    except yaml.YAMLError as exc:
        raise _error(name, str(exc)) from None
    except RecursionError:
        raise _error(name, "nested too deeply") from None
    return _from_nodes(name, root)


class _Pairs(list[tuple[str, object]]):
    """A JSON object as its members in order, duplicates included."""


def parse_json(name: str, text: str) -> Options:
    """Parse a JSON document (see the module documentation for the rules)."""
    try:
        document = json.loads(
            # A space where the BOM was keeps the error columns right.
            " " + text[1:] if text.startswith("\ufeff") else text,
            object_pairs_hook=_Pairs,
            parse_int=str,
            parse_float=str,
            parse_constant=str,
        )
        return _from_nodes(name, _json_node(document))
    except json.JSONDecodeError as exc:
        raise _error(name, exc.msg, exc.lineno, exc.colno) from None
    except RecursionError:
        raise _error(name, "nested too deeply") from None


def _json_node(value: object) -> Node:
    """*value*, decoded by :func:`parse_json`, as the YAML node it would be."""
    if isinstance(value, _Pairs):
        return MappingNode(_MAP, [(ScalarNode(_STR, k), _json_node(v)) for k, v in value])
    if isinstance(value, list):
        return SequenceNode(_SEQ, [_json_node(v) for v in value])
    if value is None:
        return ScalarNode(_NULL, "null")
    if isinstance(value, bool):
        return ScalarNode(_STR, "true" if value else "false")
    return ScalarNode(_STR, str(value))  # a string, or a number as written


def _from_nodes(name: str, root: Node | None) -> Options:
    """Read a composed YAML (or converted JSON) document into :class:`Options`."""
    if root is None or (isinstance(root, ScalarNode) and root.tag == _NULL):
        return Options(())  # an empty document
    sections: dict[str, list[tuple[str, str]]] = {}
    top = _mapping(name, root, "the top level must map section names to sections")
    for section_node, body in top:
        section = _text(name, section_node, "a section name")
        if not section:
            raise _node_error(name, section_node, "empty section name")
        entries = sections.setdefault(section, [])
        if isinstance(body, ScalarNode) and body.tag == _NULL:
            continue  # "vassal:" with nothing after it
        pairs = _mapping(name, body, f"section {section!r} must map option names to values")
        for key_node, value in pairs:
            key = _text(name, key_node, f"an option name in section {section!r}")
            if not key:
                raise _node_error(name, key_node, f"empty option name in section {section!r}")
            where = f"section {section!r}, option {key!r}"
            if isinstance(value, MappingNode):
                raise _node_error(name, value, f"{where}: a value cannot be a mapping")
            items = [value]
            if isinstance(value, SequenceNode):
                if value.tag != _SEQ:
                    raise _node_error(name, value, f"{where}: unsupported tag")
                items = value.value
            for item in items:
                if not isinstance(item, ScalarNode):
                    raise _node_error(name, item, f"{where}: a list may hold only scalars")
                entries.append((key, _text(name, item, where)))
    return _options(sections)


def _mapping(name: str, node: Node, message: str) -> list[tuple[Node, Node]]:
    if not isinstance(node, MappingNode):
        raise _node_error(name, node, message)
    if node.tag != _MAP:
        raise _node_error(name, node, "unsupported tag")
    pairs: list[tuple[Node, Node]] = node.value
    return pairs


def _text(name: str, node: Node, what: str) -> str:
    """The string a scalar node stands for."""
    if not isinstance(node, ScalarNode):
        raise _node_error(name, node, f"{what} must be a scalar")
    if node.tag == _NULL:
        return ""
    if node.tag == _BOOL:
        try:
            return _BOOLS[str(node.value).lower()]
        except KeyError:
            raise _node_error(name, node, "the value is not a boolean") from None
    if node.tag in _TEXT_TAGS:
        return str(node.value)
    raise _node_error(name, node, f"{what}: unsupported tag")


def _node_error(name: str, node: Node, message: str) -> ConfigError:
    mark = node.start_mark
    if mark is None:  # a node converted from JSON
        return _error(name, message)
    return _error(name, message, mark.line + 1, mark.column + 1)


_YAML_UNICODE_BREAKS = frozenset("\x85\u2028\u2029")


def dump_yaml(options: Options) -> str:
    """*options* as YAML (see :func:`trimperor.core.configfile.dump`)."""

    def text(value: str) -> ScalarNode:
        # The emitter quotes what would read back as something else, but in
        # a single-quoted scalar it writes these breaks raw and they read back
        # folded; double quotes escape them.
        style = '"' if _YAML_UNICODE_BREAKS.intersection(value) else None
        return ScalarNode(_STR, value, style=style)

    def values(values: list[str]) -> Node:
        if len(values) == 1:
            return text(values[0])
        return SequenceNode(_SEQ, [text(v) for v in values], flow_style=False)

    root = MappingNode(
        _MAP,
        [
            (
                text(section.name),
                MappingNode(
                    _MAP,
                    [(text(key), values(vs)) for key, vs in _runs(section.entries)],
                    flow_style=False,
                ),
            )
            for section in options.sections
        ],
        flow_style=False,
    )
    return yaml.serialize(root, Dumper=yaml.SafeDumper, allow_unicode=True)
