"""The rule language of the safety envelope: a tokenizer and a recursive-descent parser, no eval.

A rule is one boolean expression over the station's flat channel names::

    hotplate.heater -> hotplate.stirrer_rpm >= 100 and enclosure.lid == "closed"
    acid.rate_ml_min + base.rate_ml_min <= 12 or beaker.volume >= 1
    enclosure.lid in ["open", "closed"]

Grammar, lowest precedence first (``parse`` builds an AST of frozen dataclasses)::

    rule        := implication EOF
    implication := disjunction ( "->" implication )?          # right associative
    disjunction := conjunction ( "or" conjunction )*
    conjunction := negation ( "and" negation )*
    negation    := "not" negation | comparison
    comparison  := sum ( ("in" | "not" "in") (list | NAME)    # membership, not chained
                       | (("=="|"!="|"<"|"<="|">"|">=") sum)* )  # chained like Python
    sum         := product ( ("+"|"-") product )*
    product     := unary ( ("*"|"/") unary )*
    unary       := "-" unary | atom
    atom        := NUMBER | STRING | "true" | "false" | NAME | "(" implication ")"
    list        := "[" ( sum ( "," sum )* ","? )? "]"

``x in NAME`` looks a list up in the state (``agent not in trusted``: an approval
policy's named list); anything but a list there is an :class:`EvaluationError`.
``a -> b`` means ``not a or b``. Comparisons chain like Python's
(``0 <= x <= 10`` is ``0 <= x and x <= 10``, the middle operand evaluated once).
Numbers: ``12``, ``2.8``, ``1e-3``, ``.5`` (a leading ``-`` is the unary
minus). Strings: double or single quotes, escapes ``\\\\ \\" \\' \\n \\t``. Names:
identifiers joined by dots (``hotplate.stirrer_rpm``); ``true``/``false``
(also ``True``/``False``) and ``and or not in`` are reserved. There are no
calls, attributes, indexing or assignment: ``__import__('os')`` is a syntax
error, and a name is only ever a key looked up in the state mapping.

Evaluation is strict, so a typo cannot silently make a rule true: ``and``,
``or``, ``not`` and ``->`` need booleans (and short-circuit), arithmetic needs
numbers (``bool`` is not a number), ``==``/``!=``/``in`` need operands of the
same type (number, string or boolean), ordering needs two numbers or two
strings; anything else, an unknown name or a division by zero raises
:class:`EvaluationError` naming the operands. Obvious type mistakes between
literals (``"a" + 1``, ``not 3``, a rule that is a number) are refused at
parse time (:class:`RuleTypeError`).

Modules: ``safety/exprerrors.py`` (the errors), ``safety/exprast.py`` (the syntax tree,
evaluation, pretty-printing), ``safety/exprparse.py`` (tokenizer and parser),
``safety/exprcheck.py`` (static type checks), and this one (:func:`parse`,
:class:`Expression`; every public name of the language is importable from here).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from safety.exprast import (
    Binary,
    Bool,
    Compare,
    Expr,
    ListLit,
    Member,
    Name,
    Num,
    Str,
    Unary,
    evaluate,
    to_source,
)
from safety.exprcheck import static_type
from safety.exprerrors import EvaluationError, RuleSyntaxError, RuleTypeError, SourceText
from safety.exprparse import Parser, check_depth

__all__ = [
    "Binary",
    "Bool",
    "Compare",
    "EvaluationError",
    "Expr",
    "Expression",
    "ListLit",
    "Member",
    "Name",
    "Num",
    "RuleSyntaxError",
    "RuleTypeError",
    "Str",
    "Unary",
    "evaluate",
    "parse",
    "parse_expr",
    "to_source",
]


@dataclass(frozen=True)
class Expression:
    """A parsed rule: its text, where it came from, and its AST."""

    text: str
    ast: Expr
    source: str = "<rule>"
    line: int = 1
    column: int = 1

    def evaluate(self, state: Mapping[str, Any]) -> Any:
        """The rule's value in ``state``; :class:`EvaluationError` if it cannot be computed."""
        return self.ast.eval(state)

    def names(self) -> set[str]:
        """Every channel name the rule refers to."""
        return self.ast.names()

    def names_in_order(self) -> list[str]:
        """Every channel name the rule refers to, in the order they first appear (for messages)."""
        seen: dict[str, None] = {}
        for node in self.ast.walk():
            if isinstance(node, Name):
                seen.setdefault(node.name)
        return list(seen)

    def __str__(self) -> str:
        return self.text


def parse_expr(
    text: str, *, source: str = "<rule>", line: int = 1, column: int = 1, indent: int = 0
) -> Expr:
    """Parse (and statically type-check) ``text`` into an AST. See :func:`parse`."""
    src = SourceText(text, source, line, column, indent)
    node = Parser(text, src).rule()
    check_depth(node, src)
    static_type(node, src)
    return node


def parse(
    text: str,
    *,
    source: str = "<rule>",
    line: int = 1,
    column: int = 1,
    indent: int = 0,
    boolean: bool = True,
) -> Expression:
    """Parse a rule. ``source``/``line``/``column`` locate ``text``'s first character in its file,
    ``indent`` the columns before its later lines (a YAML block scalar), for messages.
    ``boolean``: the whole expression must be a condition (not a number/string).

    Raises :class:`RuleSyntaxError` (or its subclass :class:`RuleTypeError`).
    """
    if not isinstance(text, str):
        raise TypeError(f"a rule must be a string, got {type(text).__name__}")
    src = SourceText(text, source, line, column, indent)
    node = Parser(text, src).rule()
    check_depth(node, src)
    kind = static_type(node, src)
    if boolean and kind not in ("bool", "any"):
        raise src.error(
            f"a rule must be a condition (true/false), not a {kind}", node.pos, text, RuleTypeError
        )
    return Expression(text, node, source, line, column)
