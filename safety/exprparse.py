"""The rule language's tokenizer and recursive-descent parser (no eval).

:func:`tokenize` splits a rule into tokens, :class:`Parser` builds its syntax tree
(:mod:`safety.exprast`) by the grammar in :mod:`safety.expr`'s docstring, and
:func:`check_depth` refuses a tree too deep to evaluate.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from safety.exprast import Binary, Bool, Compare, Expr, ListLit, Member, Name, Num, Str, Unary
from safety.exprerrors import RuleSyntaxError, SourceText


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


def tokenize(text: str, src: SourceText | None = None) -> list[Token]:
    """Split a rule into tokens (the last one is ``EOF``). Raises :class:`RuleSyntaxError`."""
    src = src or SourceText(text, "<rule>", 1, 1)
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


# ---------------------------------------------------------------------- parser
_COMPARE_OPS = ("==", "!=", "<", "<=", ">", ">=")


class Parser:
    def __init__(self, text: str, src: SourceText) -> None:
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
            items: ListLit | Name
            if self.at("NAME"):  # a named list the state holds (``agent in trusted``)
                name = self.next()
                items = Name(name.text, name.pos)
            else:
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
            raise self.unexpected("a list '[...]' or the name of one after 'in'")
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


def check_depth(node: Expr, src: SourceText) -> None:
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


__all__ = [
    "KEYWORDS",
    "MAX_DEPTH",
    "MAX_NESTING",
    "OPERATORS",
    "Parser",
    "Token",
    "check_depth",
    "tokenize",
]
