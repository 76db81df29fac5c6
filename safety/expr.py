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
    comparison  := sum ( ("in" | "not" "in") list             # membership, not chained
                       | (("=="|"!="|"<"|"<="|">"|">=") sum)* )  # chained like Python
    sum         := product ( ("+"|"-") product )*
    product     := unary ( ("*"|"/") unary )*
    unary       := "-" unary | atom
    atom        := NUMBER | STRING | "true" | "false" | NAME | "(" implication ")"
    list        := "[" ( sum ( "," sum )* ","? )? "]"

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
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

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


# ---------------------------------------------------------------------- errors
class RuleSyntaxError(ValueError):
    """A rule that does not parse: a configuration error.

    The message reads ``<source>:<line>:<column>: <problem> in rule "<text>"``;
    the parts are attributes too (``line`` and ``column`` are 1-based).
    """

    def __init__(
        self, problem: str, *, text: str, source: str, line: int, column: int, token: str
    ) -> None:
        super().__init__(f'{source}:{line}:{column}: {problem} in rule "{text}"')
        self.problem = problem
        self.text = text
        self.source = source
        self.line = line
        self.column = column
        self.token = token


class RuleTypeError(RuleSyntaxError):
    """A rule that parses but mixes types between literals (``"a" + 1``, ``not 3``)."""


class EvaluationError(Exception):
    """A rule could not be evaluated against a state (unknown name, type error, division by 0,
    a NaN or an overflow)."""


# ---------------------------------------------------------------------- tokens
@dataclass(frozen=True)
class Token:
    kind: str  # NUM STR NAME KW OP EOF
    text: str
    pos: int  # offset in the rule text
    value: Any = None


KEYWORDS = {"and", "or", "not", "in", "true", "false", "True", "False"}
OPERATORS = ("->", "==", "!=", "<=", ">=", "<", ">", "+", "-", "*", "/", "(", ")", "[", "]", ",")
_NUMBER_RE = re.compile(r"(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")
_ESCAPES = {"\\": "\\", '"': '"', "'": "'", "n": "\n", "t": "\t"}
#: how deeply parentheses, ``not``, unary ``-`` and ``->`` may nest in one rule
MAX_NESTING = 50
#: how many operations deep a rule's tree may be (``a + b + c`` is two deep)
MAX_DEPTH = 100


class _Source:
    """Where a rule's text sits (for messages): file, line and column of its first character."""

    def __init__(self, text: str, source: str, line: int, column: int, indent: int = 0) -> None:
        self.text = text
        self.source = source
        self.line = line
        self.column = column
        self.indent = indent  # columns before the text on its later lines (a YAML block scalar)

    def error(
        self, problem: str, pos: int, token: str, cls: type[RuleSyntaxError] = RuleSyntaxError
    ) -> RuleSyntaxError:
        before = self.text[:pos]
        newlines = before.count("\n")
        if newlines:
            line, column = self.line + newlines, self.indent + pos - before.rfind("\n")
        else:
            line, column = self.line, self.column + pos
        return cls(
            problem, text=self.text, source=self.source, line=line, column=column, token=token
        )


def tokenize(text: str, src: _Source | None = None) -> list[Token]:
    """Split a rule into tokens (the last one is ``EOF``). Raises :class:`RuleSyntaxError`."""
    src = src or _Source(text, "<rule>", 1, 1)
    tokens: list[Token] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch.isspace():
            i += 1
            continue
        if ch.isdigit() or (ch == "." and i + 1 < n and text[i + 1].isdigit()):
            m = _NUMBER_RE.match(text, i)
            assert m is not None
            end = m.end()
            if end < n and (text[end].isalnum() or text[end] in "_."):
                bad = _NAME_RE.match(text, end)
                tail = bad.group(0) if bad else text[end]
                raise src.error(f"unexpected token '{text[i:end]}{tail}'", i, text[i:end] + tail)
            literal = m.group(0)
            try:
                value: int | float = int(literal) if literal.isdigit() else float(literal)
            except ValueError:  # more digits than int() accepts
                raise src.error(f"number {literal[:20]}... is too long", i, literal) from None
            if isinstance(value, float) and not math.isfinite(value):
                raise src.error(f"number {literal} is too large", i, literal)
            tokens.append(Token("NUM", literal, i, value))
            i = end
            continue
        if ch.isalpha() or ch == "_":
            m = _NAME_RE.match(text, i)
            assert m is not None
            word = m.group(0)
            if m.end() < n and text[m.end()] == ".":
                raise src.error(f"unexpected token '{word}.'", i, word + ".")
            kind = "KW" if word in KEYWORDS else "NAME"
            tokens.append(Token(kind, word, i, word))
            i = m.end()
            continue
        if ch in "\"'":
            j = i + 1
            chars: list[str] = []
            while True:
                if j >= n:
                    raise src.error("unterminated string", i, text[i:])
                c = text[j]
                if c == ch:
                    break
                if c == "\\":
                    if j + 1 >= n:
                        raise src.error("unterminated string", i, text[i:])
                    esc = text[j + 1]
                    if esc not in _ESCAPES:
                        raise src.error(f"unknown escape '\\{esc}' in string", j, "\\" + esc)
                    chars.append(_ESCAPES[esc])
                    j += 2
                    continue
                chars.append(c)
                j += 1
            tokens.append(Token("STR", text[i : j + 1], i, "".join(chars)))
            i = j + 1
            continue
        for op in OPERATORS:
            if text.startswith(op, i):
                tokens.append(Token("OP", op, i))
                i += len(op)
                break
        else:
            raise src.error(f"unexpected character '{ch}'", i, ch)
    tokens.append(Token("EOF", "", n))
    return tokens


# ------------------------------------------------------------------------- AST
# Precedence levels (higher binds tighter), used by the pretty-printer.
P_IMPLIES, P_OR, P_AND, P_NOT, P_COMPARE, P_SUM, P_PRODUCT, P_UNARY, P_ATOM = range(9)


class Expr:
    """Base of the AST nodes. ``pos`` (offset in the source text) is not part of equality."""

    prec: ClassVar[int] = P_ATOM
    pos: int

    def children(self) -> Iterator[Expr]:
        return iter(())

    def eval(self, state: Mapping[str, Any]) -> Any:
        raise NotImplementedError

    def names(self) -> set[str]:
        out: set[str] = set()
        for node in self.walk():
            if isinstance(node, Name):
                out.add(node.name)
        return out

    def walk(self) -> Iterator[Expr]:
        yield self
        for child in self.children():
            yield from child.walk()

    def __str__(self) -> str:
        return to_source(self)


@dataclass(frozen=True, eq=True)
class Num(Expr):
    value: int | float
    pos: int = field(default=0, compare=False, repr=False)

    def eval(self, state: Mapping[str, Any]) -> Any:
        return self.value


@dataclass(frozen=True, eq=True)
class Str(Expr):
    value: str
    pos: int = field(default=0, compare=False, repr=False)

    def eval(self, state: Mapping[str, Any]) -> Any:
        return self.value


@dataclass(frozen=True, eq=True)
class Bool(Expr):
    value: bool
    pos: int = field(default=0, compare=False, repr=False)

    def eval(self, state: Mapping[str, Any]) -> Any:
        return self.value


@dataclass(frozen=True, eq=True)
class Name(Expr):
    name: str
    pos: int = field(default=0, compare=False, repr=False)

    def eval(self, state: Mapping[str, Any]) -> Any:
        try:
            return state[self.name]
        except KeyError:
            raise EvaluationError(f"unknown name '{self.name}'") from None


@dataclass(frozen=True, eq=True)
class ListLit(Expr):
    items: tuple[Expr, ...]
    pos: int = field(default=0, compare=False, repr=False)

    def children(self) -> Iterator[Expr]:
        return iter(self.items)

    def eval(self, state: Mapping[str, Any]) -> Any:
        return [item.eval(state) for item in self.items]


@dataclass(frozen=True, eq=True)
class Unary(Expr):
    op: str  # "-" | "not"
    operand: Expr
    pos: int = field(default=0, compare=False, repr=False)

    @property
    def prec(self) -> int:  # type: ignore[override]
        return P_NOT if self.op == "not" else P_UNARY

    def children(self) -> Iterator[Expr]:
        yield self.operand

    def eval(self, state: Mapping[str, Any]) -> Any:
        value = self.operand.eval(state)
        if self.op == "not":
            return not _need_bool("not", self.operand, value)
        return -_need_number("-", self.operand, value)


_BINARY_PREC = {"->": P_IMPLIES, "or": P_OR, "and": P_AND, "+": P_SUM, "-": P_SUM}
_BINARY_PREC.update({"*": P_PRODUCT, "/": P_PRODUCT})


@dataclass(frozen=True, eq=True)
class Binary(Expr):
    op: str  # -> or and + - * /
    left: Expr
    right: Expr
    pos: int = field(default=0, compare=False, repr=False)

    @property
    def prec(self) -> int:  # type: ignore[override]
        return _BINARY_PREC[self.op]

    def children(self) -> Iterator[Expr]:
        yield self.left
        yield self.right

    def eval(self, state: Mapping[str, Any]) -> Any:
        op = self.op
        if op in ("and", "or", "->"):
            left = _need_bool(op, self.left, self.left.eval(state))
            if op == "and" and not left:
                return False
            if op == "or" and left:
                return True
            if op == "->" and not left:
                return True
            return _need_bool(op, self.right, self.right.eval(state))
        a = _need_number(op, self.left, self.left.eval(state))
        b = _need_number(op, self.right, self.right.eval(state))
        if op == "/" and b == 0:
            raise EvaluationError(f"division by zero: {_show(self.right, b)} in {to_source(self)}")
        try:
            if op == "+":
                value = a + b
            elif op == "-":
                value = a - b
            elif op == "*":
                value = a * b
            else:
                value = a / b
        except OverflowError:
            value = math.inf
        if isinstance(value, float) and not math.isfinite(value):
            raise EvaluationError(
                f"{to_source(self)} overflows with {_show(self.left, a)} and {_show(self.right, b)}"
            )
        return value


@dataclass(frozen=True, eq=True)
class Compare(Expr):
    """``operands[0] ops[0] operands[1] ops[1] operands[2] ...`` (chained like Python)."""

    ops: tuple[str, ...]
    operands: tuple[Expr, ...]
    pos: int = field(default=0, compare=False, repr=False)
    prec: ClassVar[int] = P_COMPARE

    def children(self) -> Iterator[Expr]:
        return iter(self.operands)

    def eval(self, state: Mapping[str, Any]) -> Any:
        left_node = self.operands[0]
        left = left_node.eval(state)
        for op, right_node in zip(self.ops, self.operands[1:], strict=True):
            right = right_node.eval(state)
            if not compare(op, left, right, left_node, right_node):
                return False
            left, left_node = right, right_node
        return True


@dataclass(frozen=True, eq=True)
class Member(Expr):
    """``value in [items]`` (``negated``: ``not in``)."""

    value: Expr
    items: ListLit
    negated: bool = False
    pos: int = field(default=0, compare=False, repr=False)
    prec: ClassVar[int] = P_COMPARE

    def children(self) -> Iterator[Expr]:
        yield self.value
        yield self.items

    def eval(self, state: Mapping[str, Any]) -> Any:
        value = self.value.eval(state)
        found = False
        for node in self.items.items:
            if compare("==", value, node.eval(state), self.value, node):
                found = True
                break
        return found != self.negated


# ------------------------------------------------------------------ evaluation
def _kind(value: Any) -> str | None:
    """number | string | bool | None (anything else)."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, numbers.Real):
        return "number"
    if isinstance(value, str):
        return "string"
    return None


def _show(node: Expr, value: Any) -> str:
    """How an operand appears in a message: ``name=value`` for non-literals, else the value."""
    if isinstance(node, Num | Str | Bool):
        return repr(value)
    return f"{to_source(node)}={value!r}"


def _need_bool(op: str, node: Expr, value: Any) -> bool:
    if not isinstance(value, bool):
        raise EvaluationError(f"'{op}' needs true/false, got {_show(node, value)}")
    return value


def _not_finite(value: Any) -> bool:
    """A NaN or an infinity (a rule refuses them rather than compute with them)."""
    return isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral) and (
        not math.isfinite(value)
    )


def _need_number(op: str, node: Expr, value: Any) -> Any:
    if _kind(value) != "number":
        raise EvaluationError(f"'{op}' needs a number, got {_show(node, value)}")
    if _not_finite(value):
        raise EvaluationError(f"'{op}' needs a finite number, got {_show(node, value)}")
    return value


def compare(op: str, a: Any, b: Any, a_node: Expr, b_node: Expr) -> bool:
    """``a op b`` with the language's strict typing (see the module docstring)."""
    ka, kb = _kind(a), _kind(b)
    if ka is None or kb is None or ka != kb or (op not in ("==", "!=") and ka == "bool"):
        raise EvaluationError(f"cannot apply '{op}' to {_show(a_node, a)} and {_show(b_node, b)}")
    if _not_finite(a) or _not_finite(b):
        raise EvaluationError(
            f"cannot apply '{op}' to {_show(a_node, a)} and {_show(b_node, b)}: "
            "not a finite number"
        )
    if op == "==":
        return bool(a == b)
    if op == "!=":
        return bool(a != b)
    if op == "<":
        return bool(a < b)
    if op == "<=":
        return bool(a <= b)
    if op == ">":
        return bool(a > b)
    return bool(a >= b)


def evaluate(node: Expr, state: Mapping[str, Any]) -> Any:
    """Evaluate an AST against ``state`` (flat ``instrument.channel`` names -> values)."""
    return node.eval(state)


# ---------------------------------------------------------------------- parser
_COMPARE_OPS = ("==", "!=", "<", "<=", ">", ">=")


class _Parser:
    def __init__(self, text: str, src: _Source) -> None:
        self.text = text
        self.src = src
        self.tokens = tokenize(text, src)
        self.depth = 0
        self.i = 0

    @property
    def tok(self) -> Token:
        return self.tokens[self.i]

    def at(self, kind: str, text: str | None = None) -> bool:
        t = self.tok
        return t.kind == kind and (text is None or t.text == text)

    def at_op(self, *ops: str) -> bool:
        return self.tok.kind == "OP" and self.tok.text in ops

    def next(self) -> Token:
        t = self.tok
        self.i += 1
        return t

    def unexpected(self, expected: str | None = None) -> RuleSyntaxError:
        t = self.tok
        pos = t.pos
        if t.kind == "EOF":
            problem = "unexpected end of rule"
            pos = len(self.text.rstrip())  # just after the last character, not after a newline
        else:
            problem = f"unexpected token '{t.text}'"
        if expected:
            problem += f" (expected {expected})"
        return self.src.error(problem, pos, t.text)

    def expect_op(self, op: str) -> Token:
        if not self.at_op(op):
            raise self.unexpected(f"'{op}'")
        return self.next()

    def nested(self, tok: Token) -> None:
        """Count one more level of nesting at ``tok`` (the parser recurses on each)."""
        self.depth += 1
        if self.depth > MAX_NESTING:
            raise self.src.error(
                f"nested more than {MAX_NESTING} levels deep (parentheses, 'not', '-', '->'): "
                "simplify the rule or split it into several",
                tok.pos,
                tok.text,
            )

    # grammar ---------------------------------------------------------------
    def rule(self) -> Expr:
        if self.at("EOF"):
            raise self.src.error("empty rule", 0, "")
        node = self.implication()
        if not self.at("EOF"):
            raise self.unexpected()
        return node

    def implication(self) -> Expr:
        left = self.disjunction()
        if self.at_op("->"):
            tok = self.next()
            self.nested(tok)
            right = self.implication()
            self.depth -= 1
            return Binary("->", left, right, tok.pos)
        return left

    def disjunction(self) -> Expr:
        node = self.conjunction()
        while self.at("KW", "or"):
            tok = self.next()
            node = Binary("or", node, self.conjunction(), tok.pos)
        return node

    def conjunction(self) -> Expr:
        node = self.negation()
        while self.at("KW", "and"):
            tok = self.next()
            node = Binary("and", node, self.negation(), tok.pos)
        return node

    def negation(self) -> Expr:
        if self.at("KW", "not"):
            tok = self.next()
            self.nested(tok)
            operand = self.negation()
            self.depth -= 1
            return Unary("not", operand, tok.pos)
        return self.comparison()

    def comparison(self) -> Expr:
        first = self.sum()
        if self.at("KW", "in") or (self.at("KW", "not") and self.tokens[self.i + 1].text == "in"):
            tok = self.next()
            negated = tok.text == "not"
            if negated:
                self.next()
            items = self.list_literal()
            node: Expr = Member(first, items, negated, tok.pos)
            if self.at_op(*_COMPARE_OPS) or self.at("KW", "in"):
                raise self.unexpected("'in' cannot be chained; use parentheses")
            return node
        ops: list[str] = []
        operands = [first]
        pos = self.tok.pos
        while self.at_op(*_COMPARE_OPS):
            ops.append(self.next().text)
            operands.append(self.sum())
        if not ops:
            return first
        if self.at("KW", "in"):
            raise self.unexpected("'in' cannot be chained; use parentheses")
        return Compare(tuple(ops), tuple(operands), pos)

    def list_literal(self) -> ListLit:
        if not self.at_op("["):
            raise self.unexpected("a list '[...]' after 'in'")
        start = self.next()
        items: list[Expr] = []
        while not self.at_op("]"):
            items.append(self.sum())
            if self.at_op(","):
                self.next()
            elif not self.at_op("]"):
                raise self.unexpected("',' or ']'")
        self.next()
        return ListLit(tuple(items), start.pos)

    def sum(self) -> Expr:
        node = self.product()
        while self.at_op("+", "-"):
            tok = self.next()
            node = Binary(tok.text, node, self.product(), tok.pos)
        return node

    def product(self) -> Expr:
        node = self.unary()
        while self.at_op("*", "/"):
            tok = self.next()
            node = Binary(tok.text, node, self.unary(), tok.pos)
        return node

    def unary(self) -> Expr:
        if self.at_op("-"):
            tok = self.next()
            self.nested(tok)
            operand = self.unary()
            self.depth -= 1
            return Unary("-", operand, tok.pos)
        return self.atom()

    def atom(self) -> Expr:
        t = self.tok
        if t.kind == "NUM":
            self.next()
            return Num(t.value, t.pos)
        if t.kind == "STR":
            self.next()
            return Str(t.value, t.pos)
        if t.kind == "NAME":
            self.next()
            if self.at_op("("):
                raise self.src.error(
                    f"unexpected token '(' after '{t.text}' (rules have no function calls)",
                    self.tok.pos,
                    "(",
                )
            return Name(t.text, t.pos)
        if t.kind == "KW" and t.text in ("true", "True", "false", "False"):
            self.next()
            return Bool(t.text in ("true", "True"), t.pos)
        if self.at_op("("):
            self.nested(self.next())
            node = self.implication()
            self.expect_op(")")
            self.depth -= 1
            return node
        raise self.unexpected()


def _check_depth(node: Expr, src: _Source) -> None:
    """Refuse a tree deeper than :data:`MAX_DEPTH` (evaluating it would recurse that deep)."""
    stack = [(node, 1)]
    while stack:
        n, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise src.error(
                f"more than {MAX_DEPTH} operations deep: split the rule into several",
                n.pos,
                src.text[n.pos : n.pos + 20],
            )
        stack.extend((child, depth + 1) for child in n.children())


# ------------------------------------------------------------- static typing
def _static(node: Expr, src: _Source) -> str:
    """bool | number | string | list | any; raises RuleTypeError on a literal type mistake."""

    def fail(problem: str, at: Expr) -> RuleTypeError:
        err = src.error(problem, at.pos, to_source(at), RuleTypeError)
        assert isinstance(err, RuleTypeError)
        return err

    def need(kind: str, child: Expr, op: str) -> None:
        got = _static(child, src)
        if got not in (kind, "any"):
            raise fail(
                f"'{op}' needs {'true/false' if kind == 'bool' else 'a ' + kind}, "
                f"got {got} {to_source(child)}",
                child,
            )

    if isinstance(node, Num):
        return "number"
    if isinstance(node, Str):
        return "string"
    if isinstance(node, Bool):
        return "bool"
    if isinstance(node, Name):
        return "any"
    if isinstance(node, ListLit):
        kinds = {_static(item, src) for item in node.items} - {"any"}
        if len(kinds) > 1:
            raise fail(f"list mixes {' and '.join(sorted(kinds))}", node)
        return "list"
    if isinstance(node, Unary):
        need("bool" if node.op == "not" else "number", node.operand, node.op)
        return "bool" if node.op == "not" else "number"
    if isinstance(node, Binary):
        kind = "bool" if node.op in ("and", "or", "->") else "number"
        need(kind, node.left, node.op)
        need(kind, node.right, node.op)
        return kind
    if isinstance(node, Compare):
        types = [_static(o, src) for o in node.operands]
        for op, a, b, na, nb in zip(
            node.ops, types, types[1:], node.operands, node.operands[1:], strict=False
        ):
            if a != "any" and b != "any" and a != b:
                raise fail(
                    f"cannot apply '{op}' to {a} {to_source(na)} and {b} {to_source(nb)}", na
                )
            if op not in ("==", "!=") and "bool" in (a, b):
                raise fail(f"cannot order true/false with '{op}'", na if a == "bool" else nb)
        return "bool"
    if isinstance(node, Member):
        value_kind = _static(node.value, src)
        _static(node.items, src)  # a mixed list is an error in itself
        item_kinds = {_static(i, src) for i in node.items.items} - {"any"}
        if value_kind == "list":
            raise fail("'in' needs a single value on its left", node.value)
        if value_kind != "any" and item_kinds and item_kinds != {value_kind}:
            raise fail(
                f"'in' compares {value_kind} {to_source(node.value)} with a list of "
                f"{' and '.join(sorted(item_kinds))}",
                node.value,
            )
        return "bool"
    raise TypeError(f"not an expression node: {node!r}")  # pragma: no cover


# --------------------------------------------------------------- pretty-print
def _quote(value: str) -> str:
    out = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
    return f'"{out}"'


def _number(value: int | float) -> str:
    text = repr(value)
    if isinstance(value, float) and text in ("inf", "nan", "-inf"):
        raise ValueError(f"{value} has no literal in the rule language")
    return text


def to_source(node: Expr) -> str:
    """The rule text of an AST, with the fewest parentheses that parse back to the same AST."""

    def wrap(child: Expr, min_prec: int) -> str:
        text = to_source(child)
        return f"({text})" if child.prec < min_prec else text

    if isinstance(node, Num):
        return _number(node.value)
    if isinstance(node, Str):
        return _quote(node.value)
    if isinstance(node, Bool):
        return "true" if node.value else "false"
    if isinstance(node, Name):
        return node.name
    if isinstance(node, ListLit):
        return "[" + ", ".join(wrap(i, P_SUM) for i in node.items) + "]"
    if isinstance(node, Unary):
        if node.op == "not":
            return "not " + wrap(node.operand, P_NOT)
        return "-" + wrap(node.operand, P_UNARY)
    if isinstance(node, Binary):
        p = node.prec
        if node.op == "->":  # right associative
            return f"{wrap(node.left, p + 1)} -> {wrap(node.right, p)}"
        return f"{wrap(node.left, p)} {node.op} {wrap(node.right, p + 1)}"
    if isinstance(node, Compare):
        parts = [wrap(node.operands[0], P_SUM)]
        for op, operand in zip(node.ops, node.operands[1:], strict=True):
            parts += [op, wrap(operand, P_SUM)]
        return " ".join(parts)
    if isinstance(node, Member):
        op = "not in" if node.negated else "in"
        return f"{wrap(node.value, P_SUM)} {op} {to_source(node.items)}"
    raise TypeError(f"not an expression node: {node!r}")  # pragma: no cover


# ---------------------------------------------------------------- public API
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
    src = _Source(text, source, line, column, indent)
    node = _Parser(text, src).rule()
    _check_depth(node, src)
    _static(node, src)
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
    src = _Source(text, source, line, column, indent)
    node = _Parser(text, src).rule()
    _check_depth(node, src)
    kind = _static(node, src)
    if boolean and kind not in ("bool", "any"):
        raise src.error(
            f"a rule must be a condition (true/false), not a {kind}", node.pos, text, RuleTypeError
        )
    return Expression(text, node, source, line, column)
