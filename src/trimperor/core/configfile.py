"""Vassal configuration files: INI, XML, YAML and JSON as one option map (pure).

uWSGI reads all four formats into the same model, and so does this module: a
document is an ordered list of named *sections*, and a section is an ordered
list of ``(key, value)`` string pairs in which a key may repeat (``env`` given
twice is two environment variables). A scalar option read twice takes its last
value; a section named twice is one section.

* **INI**: ``[section]`` headers and ``key = value`` lines, split at the first
  ``=``, both sides stripped. Lines starting with ``#`` or ``;`` are comments; a
  line without ``=`` is a flag whose value is ``"true"``. Values are raw text:
  no quotes, interpolation or continuation lines.
* **XML**: the root element is the one section; each child element is an
  option (tag = key, stripped text = value, empty = ``"true"``). Attributes,
  comments and text between options are ignored. Documents with a DOCTYPE are
  refused, which rules out entity expansion.
* **YAML / JSON**: a mapping of section names to mappings of options; an option
  holds a scalar or a list of scalars (one entry per element). ``null`` is
  ``""``, booleans are ``"true"``/``"false"``, and numbers keep their source
  text (``0660`` stays ``"0660"``). Repeated keys accumulate, as in INI.

Every :class:`~trimperor.core.errors.ConfigError` message starts with the file name
and, where known, the 1-based line and column: ``"app.ini:7: ..."``.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

from trimperor.core.errors import ConfigError

__all__ = [
    "Format",
    "Options",
    "Section",
    "dump",
    "format_of",
    "parse",
    "parse_ini",
    "parse_json",
    "parse_xml",
    "parse_yaml",
]

Format = Literal["ini", "xml", "yaml", "json"]

_SUFFIXES: tuple[tuple[str, Format], ...] = (
    (".ini", "ini"),
    (".xml", "xml"),
    (".yml", "yaml"),
    (".yaml", "yaml"),
    (".json", "json"),
    (".js", "json"),
)


def format_of(name: str, extra_extensions: Iterable[str] = ()) -> Format | None:
    """The format of the file *name*, by its (case-sensitive) suffix.

    Names ending in one of *extra_extensions* (``"cfg"`` or ``".cfg"``) are INI.
    Anything else, editor backups like ``app.ini~`` included, is ``None``.
    """
    for suffix, fmt in _SUFFIXES:
        if name.endswith(suffix):
            return fmt
    for extension in extra_extensions:
        ext = extension.removeprefix(".")
        if ext and name.endswith("." + ext):
            return "ini"
    return None


@dataclass(frozen=True, slots=True)
class Section:
    """One named section: its options in document order, keys may repeat."""

    name: str
    entries: tuple[tuple[str, str], ...]

    def get(self, key: str, default: str | None = None) -> str | None:
        """The last value of *key* (a later scalar overrides an earlier one)."""
        for k, value in reversed(self.entries):
            if k == key:
                return value
        return default

    def get_all(self, key: str) -> tuple[str, ...]:
        """Every value of *key*, in order."""
        return tuple(value for k, value in self.entries if k == key)

    def keys(self) -> tuple[str, ...]:
        """The distinct keys, in the order they first appear."""
        return tuple(dict.fromkeys(k for k, _ in self.entries))

    def __contains__(self, key: object) -> bool:
        return any(k == key for k, _ in self.entries)


@dataclass(frozen=True, slots=True)
class Options:
    """A parsed configuration document: its sections in document order."""

    sections: tuple[Section, ...]

    def section(self, name: str) -> Section | None:
        """The section called *name*, or ``None``."""
        return next((s for s in self.sections if s.name == name), None)

    def __contains__(self, name: object) -> bool:
        return any(s.name == name for s in self.sections)


def parse(name: str, text: str, extra_extensions: Iterable[str] = ()) -> Options:
    """Parse *text* in the format that the file *name* has (see :func:`format_of`)."""
    fmt = format_of(name, extra_extensions)
    if fmt is None:
        raise _error(name, "unknown format (expected .ini, .xml, .yml, .yaml, .json or .js)")
    return _PARSERS[fmt](name, text)


# Errors ----------------------------------------------------------------------


def _error(
    name: str, message: str, line: int | None = None, column: int | None = None
) -> ConfigError:
    where = name
    if line is not None:
        where += f":{line}" if column is None else f":{line}:{column}"
    return ConfigError(f"{where}: {message}")


def _error_at(name: str, text: str, index: int, message: str) -> ConfigError:
    """An error at the character *index* of *text*."""
    line = text.count("\n", 0, index) + 1
    column = index - text.rfind("\n", 0, index)
    return _error(name, message, line, column)


def _options(sections: dict[str, list[tuple[str, str]]]) -> Options:
    return Options(tuple(Section(name, tuple(entries)) for name, entries in sections.items()))


# INI -------------------------------------------------------------------------


def parse_ini(name: str, text: str) -> Options:
    """Parse an INI document (see the module documentation for the rules)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for lineno, raw in enumerate(text.removeprefix("\ufeff").split("\n"), start=1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line[0] == "[":
            if line[-1] != "]":
                raise _error(name, "section header must end with ']'", lineno)
            header = line[1:-1].strip()
            if not header:
                raise _error(name, "empty section name", lineno)
            current = sections.setdefault(header, [])
            continue
        if current is None:
            raise _error(name, "line is outside any section", lineno)
        key, sep, value = line.partition("=")
        key = key.strip()
        if not key:
            raise _error(name, "empty option name", lineno)
        current.append((key, value.strip() if sep else "true"))
    return _options(sections)


# XML -------------------------------------------------------------------------

# Entity declarations live in the DOCTYPE; without one, expat only knows the
# five predefined entities, so nothing can expand or be fetched.
_XML_DECLARATIONS = re.compile(r"<!(?:DOCTYPE|ENTITY)", re.IGNORECASE)


def parse_xml(name: str, text: str) -> Options:
    """Parse an XML document (see the module documentation for the rules)."""
    if match := _XML_DECLARATIONS.search(text):
        raise _error_at(name, text, match.start(), "DOCTYPE and ENTITY declarations are refused")
    # Imported here: most emperors never read an XML file (half a MB of RSS).
    import xml.etree.ElementTree as ET
    from xml.parsers.expat import ErrorString

    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        line, column = exc.position
        raise _error(name, ErrorString(exc.code), line, column + 1) from None
    except UnicodeEncodeError as exc:  # a lone surrogate
        raise _error_at(name, text, exc.start, f"invalid character: {exc.reason}") from None
    entries = []
    for child in root:
        if len(child):
            raise _error(name, f"<{child.tag}> holds elements; an option holds only text")
        entries.append((child.tag, (child.text or "").strip() or "true"))
    return Options((Section(root.tag, tuple(entries)),))


# YAML and JSON ---------------------------------------------------------------
# The parsers live in :mod:`trimperor.core.yamldoc`, imported on first use: an
# emperor whose vassals are all INI or XML does without PyYAML (1.2 MB of RSS).


def parse_yaml(name: str, text: str) -> Options:
    """Parse a YAML document (see the module documentation for the rules)."""
    from trimperor.core import yamldoc

    return yamldoc.parse_yaml(name, text)


def parse_json(name: str, text: str) -> Options:
    """Parse a JSON document (see the module documentation for the rules)."""
    from trimperor.core import yamldoc

    return yamldoc.parse_json(name, text)


_PARSERS: dict[Format, Callable[[str, str], Options]] = {
    "ini": parse_ini,
    "xml": parse_xml,
    "yaml": parse_yaml,
    "json": parse_json,
}


# Writing ---------------------------------------------------------------------


def dump(options: Options, fmt: Format) -> str:
    """Write *options* in the format *fmt*, so that parsing the result gives them back.

    Raises :exc:`ValueError` for what *fmt* cannot hold rather than write
    something that reads back differently. Every format refuses empty or
    repeated section names and empty option names. Besides:

    * INI: names and values must not contain line breaks (``\\n``, ``\\r``) or
      start or end with whitespace; option names must not contain ``=`` or
      start with ``#``, ``;`` or ``[``.
    * XML: exactly one section; section and option names must be ASCII XML
      names (``[A-Za-z_][A-Za-z0-9._-]*``); values must be non-empty, must not
      start or end with whitespace and must be legal XML characters.
    * YAML and JSON hold any strings. Consecutive values of one key become a
      list; a key that comes back after another key is written again, which
      the parsers here read as more values.
    """
    seen: set[str] = set()
    for section in options.sections:
        if not section.name:
            raise ValueError("cannot write an empty section name")
        if section.name in seen:
            raise ValueError(f"cannot write section {section.name!r} twice")
        seen.add(section.name)
        if any(not key for key, _ in section.entries):
            raise ValueError(f"cannot write an empty option name in section {section.name!r}")
    if fmt == "ini":
        return _dump_ini(options)
    if fmt == "xml":
        return _dump_xml(options)
    if fmt == "yaml":
        return _dump_yaml(options)
    if fmt == "json":
        return _dump_json(options)
    raise ValueError(f"unknown format {fmt!r}")


def _runs(entries: Iterable[tuple[str, str]]) -> Iterator[tuple[str, list[str]]]:
    """Consecutive entries with the same key, as ``(key, values)``."""
    for key, group in itertools.groupby(entries, key=lambda entry: entry[0]):
        yield key, [value for _, value in group]


def _ini_text(text: str, what: str) -> str:
    if "\n" in text or "\r" in text or text != text.strip():
        raise ValueError(f"cannot write {what} {text!r} in INI")
    return text


def _dump_ini(options: Options) -> str:
    blocks = []
    for section in options.sections:
        lines = [f"[{_ini_text(section.name, 'section name')}]"]
        for key, value in section.entries:
            if "=" in _ini_text(key, "option name") or key[0] in "#;[":
                raise ValueError(f"cannot write option name {key!r} in INI")
            lines.append(f"{key} = {_ini_text(value, 'value')}".rstrip())
        blocks.append("".join(line + "\n" for line in lines))
    return "\n".join(blocks)


_XML_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9._-]*")
_XML_ILLEGAL = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
# A raw \r would read back as \n (end-of-line normalisation); a reference won't.
_XML_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", "\r": "&#13;"})


def _dump_xml(options: Options) -> str:
    if len(options.sections) != 1:
        raise ValueError(f"XML holds exactly one section, not {len(options.sections)}")
    (section,) = options.sections
    lines = [f"<{_xml_name(section.name)}>"]
    for key, value in section.entries:
        if not value or value != value.strip() or _XML_ILLEGAL.search(value):
            raise ValueError(f"cannot write value {value!r} in XML")
        lines.append(f"    <{_xml_name(key)}>{value.translate(_XML_ESCAPES)}</{key}>")
    lines.append(f"</{section.name}>")
    return "".join(line + "\n" for line in lines)


def _xml_name(name: str) -> str:
    if not _XML_NAME.fullmatch(name):
        raise ValueError(f"cannot write {name!r} as an XML tag")
    return name


def _dump_yaml(options: Options) -> str:
    from trimperor.core import yamldoc

    return yamldoc.dump_yaml(options)


def _dump_json(options: Options) -> str:
    def text(value: str) -> str:
        return json.dumps(value, ensure_ascii=False)

    def values(values: list[str]) -> str:
        if len(values) == 1:
            return text(values[0])
        return "[" + ", ".join(map(text, values)) + "]"

    sections = []
    for section in options.sections:
        members = [f"    {text(key)}: {values(vs)}" for key, vs in _runs(section.entries)]
        body = "{\n" + ",\n".join(members) + "\n  }" if members else "{}"
        sections.append(f"  {text(section.name)}: {body}")
    if not sections:
        return "{}\n"
    return "{\n" + ",\n".join(sections) + "\n}\n"
