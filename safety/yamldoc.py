"""YAML with positions: config errors that name the file, the line and the field.

Every configuration file labbridge reads (an envelope, a ``program.md`` front
matter, later the lab config) is composed here into plain data plus a
:class:`YamlDoc` that remembers the line of every key and item and the
position of every scalar's text, so a validator can say
``lab.yaml:14: stations.bench-a.hotplate.url: ...`` or point at a column
inside a rule.

Composing is bounded before it starts (:func:`check_size`): at most
:data:`MAX_NODES` values once aliases (``*name``) are expanded (a few KB of
nested aliases, a "billion laughs", would otherwise be billions) and at most
:data:`MAX_DEPTH` levels of nesting (PyYAML composes recursively).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

Path_ = tuple[Any, ...]

#: the most values (scalars, mappings, lists; each alias counted as what it repeats) in a document
MAX_NODES = 100_000
#: the deepest nesting of mappings and lists in a document
MAX_DEPTH = 100


class ConfigError(ValueError):
    """An invalid configuration: ``<source>:<line>: <field>: <problem>`` (line omitted if unknown)."""

    def __init__(
        self, problem: str, *, source: str, line: int | None = None, field: str = ""
    ) -> None:
        where = f"{source}:{line}" if line is not None else source
        super().__init__(f"{where}: {field}: {problem}" if field else f"{where}: {problem}")
        self.problem = problem
        self.source = source
        self.line = line
        self.field = field


def field_path(path: Path_) -> str:
    """``("channels", "a.b", "min")`` -> ``channels.a.b.min``; list items as ``[i]``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + str(part)
    return out


class YamlDoc:
    """Where each key, item and scalar of a composed YAML document is (1-based file lines).

    ``offset`` is the number of file lines before the YAML text (a front matter's
    opening ``---``). ``scalars[path] = (line, column, indent)`` locates a
    scalar's text: for block scalars (``|``, ``>``) the first text line and its
    indentation, else the character after an opening quote.
    """

    def __init__(
        self, source: str, *, offset: int = 0, error_cls: type[ConfigError] = ConfigError
    ) -> None:
        self.source = source
        self.offset = offset
        self.error_cls = error_cls
        self.lines: dict[Path_, int] = {}
        self.scalars: dict[Path_, tuple[int, int, int]] = {}

    def line(self, path: Path_) -> int | None:
        """The line of ``path``, or of its nearest ancestor that has one."""
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return self.lines.get(())

    def error(self, problem: str, path: Path_) -> ConfigError:
        return self.error_cls(
            problem, source=self.source, line=self.line(path), field=field_path(path)
        )


def compose_yaml(
    text: str,
    doc: YamlDoc,
    *,
    what: str = "",
    key_types: tuple[type, ...] = (str, int, float, bool),
) -> Any:
    """YAML text -> plain data (safe types only), noting every position in ``doc``.

    Refuses duplicate keys, merge keys (``<<``) and keys that are not of
    ``key_types``; a YAML syntax error names its line and column. ``what``
    prefixes the syntax-error message (``"front matter is "``).
    """
    err = doc.error_cls
    loader = yaml.SafeLoader(text)
    try:
        try:
            check_size(text, doc, what=what)
            node = loader.get_single_node()
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = mark.line + 1 + doc.offset if mark is not None else None
            col = f" at column {mark.column + 1}" if mark is not None else ""
            raise err(
                f"{what}not valid YAML{col}: {exc.problem or exc}", source=doc.source, line=line
            ) from None
        except yaml.YAMLError as exc:
            raise err(f"{what}not valid YAML: {exc}", source=doc.source) from None
        if node is None:
            return None
        lines = text.splitlines()

        def walk(n: yaml.Node, path: Path_) -> Any:
            doc.lines.setdefault(path, n.start_mark.line + 1 + doc.offset)
            if isinstance(n, yaml.MappingNode):
                out: dict[Any, Any] = {}
                for key_node, value_node in n.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        raise doc.error("YAML merge keys (<<) are not supported", path)
                    key = loader.construct_object(key_node, deep=True)
                    if (
                        isinstance(key, bool)
                        and str in key_types
                        and bool not in key_types
                        and isinstance(key_node, yaml.ScalarNode)
                        and not key_node.style
                    ):
                        key = key_node.value  # a name like on/off/yes/no, not YAML 1.1's bool
                    line = key_node.start_mark.line + 1 + doc.offset
                    if key is None or not isinstance(key, key_types):
                        raise err(
                            f"keys must be plain names, got {key!r}",
                            source=doc.source,
                            line=line,
                            field=field_path(path),
                        )
                    if key in out:
                        raise err(
                            f"duplicate key '{key}'",
                            source=doc.source,
                            line=line,
                            field=field_path((*path, key)),
                        )
                    doc.lines[(*path, key)] = line
                    out[key] = walk(value_node, (*path, key))
                return out
            if isinstance(n, yaml.SequenceNode):
                return [walk(item, (*path, i)) for i, item in enumerate(n.value)]
            start = n.start_mark
            style = getattr(n, "style", None)
            if style in ("|", ">"):
                first_index = start.line + 1  # the indicator's line; the text starts below it
                first = lines[first_index] if first_index < len(lines) else ""
                indent = len(first) - len(first.lstrip())
                doc.scalars[path] = (first_index + 1 + doc.offset, indent + 1, indent)
            else:
                shift = 1 if style in ('"', "'") else 0
                doc.scalars[path] = (start.line + 1 + doc.offset, start.column + 1 + shift, 0)
            return loader.construct_object(n, deep=True)

        return walk(node, ())
    finally:
        loader.dispose()


def load_yaml_file(
    path: str | Path,
    *,
    error_cls: type[ConfigError] = ConfigError,
    key_types: tuple[type, ...] = (str,),
) -> tuple[Any, YamlDoc]:
    """Read a YAML file and compose it (:func:`compose_yaml`: bounded, positions noted):
    its data and the :class:`YamlDoc` whose errors name that file. A file that cannot be
    read is an ``error_cls`` naming it."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise error_cls(f"cannot read: {why}", source=source) from None
    doc = YamlDoc(source, error_cls=error_cls)
    return compose_yaml(text, doc, key_types=key_types), doc


def check_size(
    text: str,
    doc: YamlDoc,
    *,
    what: str = "",
    max_nodes: int = MAX_NODES,
    max_depth: int = MAX_DEPTH,
) -> None:
    """Refuse (``doc.error_cls``) YAML with more than ``max_nodes`` values once its aliases are
    expanded, or nested deeper than ``max_depth``, reading its events only (no tree is built).

    Stops at the first value past a limit, so the cost is bounded by the limits and the
    text's length, not by what the text would expand to. Raises ``yaml.YAMLError`` for a syntax error met first.
    """
    try:
        _check_events(text, doc, what, max_nodes, max_depth)
    except yaml.MarkedYAMLError as exc:
        if "maximum nesting depth" not in str(exc.problem):
            raise
        mark = exc.problem_mark
        raise doc.error_cls(
            f"{what}nested more than {max_depth} levels deep: flatten it",
            source=doc.source,
            line=mark.line + 1 + doc.offset if mark is not None else None,
        ) from None


def _check_events(text: str, doc: YamlDoc, what: str, max_nodes: int, max_depth: int) -> None:
    # libyaml's parser when it is there: fast, and it refuses absurd nesting by itself
    # per open mapping or list: its anchor, the node count when it opened, its tallest child
    stack: list[tuple[str | None, int, list[int]]] = []
    sizes: dict[str, tuple[int, int]] = {}  # anchor -> (values, height) of what it names
    nodes = 0
    for event in yaml.parse(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
        if isinstance(event, yaml.MappingStartEvent | yaml.SequenceStartEvent):
            nodes += 1
            stack.append((event.anchor, nodes, [0]))
            height = len(stack)
        elif isinstance(event, yaml.CollectionEndEvent):
            anchor, start, tallest = stack.pop()
            size, height = nodes - start + 1, tallest[0] + 1
            if anchor is not None:
                sizes[anchor] = (size, height)
            if stack:
                stack[-1][2][0] = max(stack[-1][2][0], height)
            continue
        elif isinstance(event, yaml.ScalarEvent | yaml.AliasEvent):
            size, height = (1, 1)
            if isinstance(event, yaml.AliasEvent):
                size, height = sizes.get(event.anchor or "", (1, 1))
            elif event.anchor is not None:
                sizes[event.anchor] = (1, 1)
            nodes += size
            if stack:
                stack[-1][2][0] = max(stack[-1][2][0], height)
            height += len(stack)
        else:
            continue
        line = event.start_mark.line + 1 + doc.offset if event.start_mark is not None else None
        if nodes > max_nodes:
            raise doc.error_cls(
                f"{what}too large: more than {max_nodes} values once its aliases (*name) are "
                "expanded; write the values out, or split the file",
                source=doc.source,
                line=line,
            )
        if height > max_depth:
            raise doc.error_cls(
                f"{what}nested more than {max_depth} levels deep: flatten it",
                source=doc.source,
                line=line,
            )
