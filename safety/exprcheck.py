"""The rule language's static type checks: literal type mistakes refused at parse time.

:func:`static_type` infers what a syntax tree evaluates to and raises
:class:`~safety.exprerrors.RuleTypeError` for mistakes visible without a state
(``"a" + 1``, ``not 3``, a list mixing numbers and strings).
"""

from __future__ import annotations

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
    to_source,
)
from safety.exprerrors import RuleTypeError, SourceText


def static_type(node: Expr, src: SourceText) -> str:
    """bool | number | string | list | any; raises RuleTypeError on a literal type mistake."""

    def fail(problem: str, at: Expr) -> RuleTypeError:
        err = src.error(problem, at.pos, to_source(at), RuleTypeError)
        assert isinstance(err, RuleTypeError)
        return err

    def need(kind: str, child: Expr, op: str) -> None:
        got = static_type(child, src)
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
        kinds = {static_type(item, src) for item in node.items} - {"any"}
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
        types = [static_type(o, src) for o in node.operands]
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
        value_kind = static_type(node.value, src)
        static_type(node.items, src)  # a mixed list is an error in itself
        literal = node.items.items if isinstance(node.items, ListLit) else ()
        item_kinds = {static_type(i, src) for i in literal} - {"any"}
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


__all__ = ["static_type"]
