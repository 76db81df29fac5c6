"""The envelope's rule language: tokenizer, parser, precedence, errors, evaluation, no eval."""

from __future__ import annotations

import builtins
import math
from collections.abc import Mapping
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from safety.expr import (
    Binary,
    Bool,
    Compare,
    EvaluationError,
    Expr,
    ListLit,
    Member,
    Name,
    Num,
    RuleSyntaxError,
    RuleTypeError,
    Str,
    Unary,
    parse,
    parse_expr,
    to_source,
)

STATE: dict[str, Any] = {
    "hotplate.heater": True,
    "hotplate.stirrer_rpm": 300,
    "enclosure.lid": "closed",
    "red.volume": 0.5,
    "green.volume": 1.0,
    "blue.volume": 1.25,
    "off": False,
    "n": 4,
}


def ev(text: str, state: Mapping[str, Any] = STATE) -> Any:
    return parse(text, boolean=False).evaluate(state)


# ------------------------------------------------------------------ operators
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1 + 2", 3),
        ("7 - 10", -3),
        ("3 * 4", 12),
        ("7 / 2", 3.5),
        ("-n", -4),
        ("--n", 4),
        ("2.8", 2.8),
        ("1e-3", 0.001),
        ("1.5E+2", 150.0),
        (".5", 0.5),
        ("'single'", "single"),
        ('"dou\\"ble"', 'dou"ble'),
        ('"a\\\\b\\n\\t\\\'"', "a\\b\n\t'"),
        ("true", True),
        ("False", False),
        ("n == 4", True),
        ("n != 4", False),
        ("n < 5", True),
        ("n <= 4", True),
        ("n > 4", False),
        ("n >= 4.0", True),
        ("'abc' < 'abd'", True),
        ("hotplate.heater and off", False),
        ("hotplate.heater or off", True),
        ("not off", True),
        ("off -> off", True),
        ("true -> false", False),
        ("false -> false", True),
        ("enclosure.lid in ['open', 'closed']", True),
        ("enclosure.lid in ['open']", False),
        ("enclosure.lid not in ['open']", True),
        ("n in [1, 2, 2 + 2]", True),
        ("n in []", False),
        ("0 <= n <= 10", True),
        ("0 <= n <= 3", False),
        ("1 < 2 < 3 < 2", False),
        ("red.volume + green.volume + blue.volume <= 2.8", True),
        ('hotplate.heater -> hotplate.stirrer_rpm >= 100 and enclosure.lid == "closed"', True),
    ],
)
def test_every_operator_evaluates(text: str, expected: Any) -> None:
    result = ev(text)
    assert result == expected and type(result) is type(expected)


@pytest.mark.parametrize(
    ("text", "tree"),
    [
        ("a or b and c", Binary("or", Name("a"), Binary("and", Name("b"), Name("c")))),
        ("a and b or c", Binary("or", Binary("and", Name("a"), Name("b")), Name("c"))),
        ("not a and b", Binary("and", Unary("not", Name("a")), Name("b"))),
        ("not a == b", Unary("not", Compare(("==",), (Name("a"), Name("b"))))),
        ("a -> b -> c", Binary("->", Name("a"), Binary("->", Name("b"), Name("c")))),
        ("a or b -> c", Binary("->", Binary("or", Name("a"), Name("b")), Name("c"))),
        ("a -> b or c", Binary("->", Name("a"), Binary("or", Name("b"), Name("c")))),
        (
            "1 + 2 * 3 == 7",
            Compare(("==",), (Binary("+", Num(1), Binary("*", Num(2), Num(3))), Num(7))),
        ),
        ("(1 + 2) * 3", Binary("*", Binary("+", Num(1), Num(2)), Num(3))),
        ("1 - 2 - 3", Binary("-", Binary("-", Num(1), Num(2)), Num(3))),
        ("8 / 4 / 2", Binary("/", Binary("/", Num(8), Num(4)), Num(2))),
        ("-2 * 3", Binary("*", Unary("-", Num(2)), Num(3))),
        ("x - -1", Binary("-", Name("x"), Unary("-", Num(1)))),
        ("0 <= x < 10", Compare(("<=", "<"), (Num(0), Name("x"), Num(10)))),
        ("x + 1 in [1, 2]", Member(Binary("+", Name("x"), Num(1)), ListLit((Num(1), Num(2))))),
        ("x not in ['a',]", Member(Name("x"), ListLit((Str("a"),)), True)),
        ("agent not in trusted", Member(Name("agent"), Name("trusted"), True)),
        ("a.b.c", Name("a.b.c")),
    ],
)
def test_precedence_and_associativity(text: str, tree: Expr) -> None:
    assert parse_expr(text) == tree
    assert parse_expr(to_source(tree)) == tree


def test_a_named_list_after_in_is_looked_up_and_must_be_a_list() -> None:
    rule = parse("agent not in trusted or n in limits")
    assert rule.names() == {"agent", "trusted", "n", "limits"}
    state = {"agent": "bob", "trusted": ["alice", "lims"], "n": 2, "limits": (1, 2)}
    assert rule.evaluate(state) is True
    assert rule.evaluate({**state, "n": 3}) is True  # bob is not trusted
    assert rule.evaluate({**state, "agent": "lims", "n": 3}) is False
    for bad, problem in (
        ({**state, "trusted": "alice"}, "'in' needs a list on its right, got trusted='alice'"),
        ({**state, "trusted": [1, 2]}, "cannot apply '=='"),  # strict: a string vs numbers
    ):
        with pytest.raises(EvaluationError) as info:
            rule.evaluate(bad)
        assert problem in str(info.value), info.value
    with pytest.raises(EvaluationError, match="unknown name 'trusted'"):
        rule.evaluate({"agent": "bob"})


def test_implication_is_not_a_or_b() -> None:
    for a in (True, False):
        for b in (True, False):
            assert ev("a -> b", {"a": a, "b": b}) == ((not a) or b)


def test_names_lists_every_referenced_channel() -> None:
    rule = parse(
        "hotplate.heater -> hotplate.stirrer_rpm >= 100 and enclosure.lid in ['closed', x.y]"
    )
    assert rule.names() == {"hotplate.heater", "hotplate.stirrer_rpm", "enclosure.lid", "x.y"}


# --------------------------------------------------------------------- errors
def test_syntax_error_names_file_line_column_and_token() -> None:
    with pytest.raises(RuleSyntaxError) as info:
        parse("hotplate.heater -> > 3", source="lab.yaml", line=14, column=13)
    err = info.value
    assert str(err) == "lab.yaml:14:32: unexpected token '>' in rule \"hotplate.heater -> > 3\""
    assert (err.source, err.line, err.column, err.token) == ("lab.yaml", 14, 32, ">")
    assert isinstance(err, ValueError)  # a configuration error


def test_syntax_error_on_a_later_line_of_a_multiline_rule() -> None:
    with pytest.raises(RuleSyntaxError) as info:
        parse("a and\n  b ==", source="f.yaml", line=3, column=9)
    assert (info.value.line, info.value.column) == (4, 7)
    assert "unexpected end of rule" in str(info.value)


@pytest.mark.parametrize(
    ("text", "token", "problem"),
    [
        ("__import__('os')", "(", "unexpected token '('"),
        ("os.system('rm -rf /')", "(", "no function calls"),
        ("a.__class__", None, None),  # a plain (odd) name: parses, only ever a state key
        ("x[0]", "[", "unexpected token '['"),
        ("lambda: 1", ":", "unexpected character ':'"),
        ("1 if a else 2", "if", "unexpected token 'if'"),
        ("a = 1", "=", "unexpected character '='"),
        ("a ** 2", "*", "unexpected token '*'"),
        ("(a", "", "unexpected end of rule"),
        ("a)", ")", "unexpected token ')'"),
        ("", "", "empty rule"),
        ("3abc > 1", "3abc", "unexpected token '3abc'"),
        ("a.b. > 1", "a.b.", "unexpected token 'a.b.'"),
        ("'open", "'open", "unterminated string"),
        ('"a\\q"', "\\q", "unknown escape"),
        ("a in 3", "3", "expected a list '[...]' or the name of one"),
        ("a in b.c + 1", "+", "unexpected token '+'"),
        ("a in [1] in [2]", "in", "cannot be chained"),
        ("a < b in [1]", "in", "cannot be chained"),
        ("a and", "", "unexpected end of rule"),
        ("a $ b", "$", "unexpected character '$'"),
        ("[1, 2]", "[", "unexpected token '['"),
        ("a -> ", "", "unexpected end of rule"),
        ("a b", "b", "unexpected token 'b'"),
    ],
)
def test_syntax_errors(text: str, token: str | None, problem: str | None) -> None:
    if token is None:
        assert parse(text).names() == {text}
        return
    with pytest.raises(RuleSyntaxError) as info:
        parse(text, source="r")
    assert info.value.token == token, str(info.value)
    assert problem is not None and problem in str(info.value)
    assert str(info.value).startswith("r:1:")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('"a" + 1', "'+' needs a number, got string"),
        ("not 3", "'not' needs true/false, got number"),
        ("-true", "'-' needs a number, got bool"),
        ("1 and a", "'and' needs true/false"),
        ("x == 'a' -> 2", "'->' needs true/false"),
        ("1 + 2", "a rule must be a condition"),
        ("'closed'", "a rule must be a condition"),
        ("true < false", "cannot order true/false"),
        ("1 == 'a'", "cannot apply '==' to number 1 and string"),
        ("a in [1, 'x']", "list mixes number and string"),
        ("'a' in [1, 2]", "'in' compares string"),
    ],
)
def test_literal_type_mistakes_are_config_errors(text: str, problem: str) -> None:
    with pytest.raises(RuleTypeError) as info:
        parse(text, source="lab.yaml", line=2, column=11)
    assert problem in str(info.value)
    assert isinstance(info.value, RuleSyntaxError)
    assert str(info.value).startswith("lab.yaml:2:")


@pytest.mark.parametrize(
    ("text", "state", "message"),
    [
        ("enclosure.lid == 'closed'", {}, "unknown name 'enclosure.lid'"),
        (
            "enclosure.lid < 3",
            {"enclosure.lid": "open"},
            "cannot apply '<' to enclosure.lid='open' and 3",
        ),
        ("x == 1", {"x": "1"}, "cannot apply '==' to x='1' and 1"),
        ("x == true", {"x": 1}, "cannot apply '==' to x=1 and True"),
        ("x + 1 > 0", {"x": True}, "'+' needs a number, got x=True"),
        ("x > 0", {"x": None}, "cannot apply '>' to x=None and 0"),
        ("a and b", {"a": 1, "b": True}, "'and' needs true/false, got a=1"),
        ("a -> b", {"a": True, "b": "yes"}, "'->' needs true/false, got b='yes'"),
        ("not a", {"a": 0}, "'not' needs true/false, got a=0"),
        ("x / y > 1", {"x": 1, "y": 0}, "division by zero: y=0 in x / y"),
        ("x in ['a', 'b']", {"x": 3}, "cannot apply '==' to x=3 and 'a'"),
        ("x < y", {"x": True, "y": False}, "cannot apply '<' to x=True and y=False"),
        ("x == y", {"x": [1], "y": [1]}, "cannot apply '=='"),
    ],
)
def test_evaluation_errors_name_the_operands(
    text: str, state: Mapping[str, Any], message: str
) -> None:
    with pytest.raises(EvaluationError) as info:
        parse(text).evaluate(state)
    assert message in str(info.value)


def test_logic_short_circuits_like_python() -> None:
    assert parse("off and missing.name").evaluate(STATE) is False
    assert parse("hotplate.heater or missing.name").evaluate(STATE) is True
    assert parse("off -> missing.name").evaluate(STATE) is True
    assert parse("0 > 1 > missing.name").evaluate({}) is False
    with pytest.raises(EvaluationError, match="unknown name 'missing.name'"):
        parse("hotplate.heater -> missing.name").evaluate(STATE)


def test_no_eval_exec_or_compile_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the rule language must not use eval/exec/compile")

    for name in ("eval", "exec", "compile"):
        monkeypatch.setattr(builtins, name, forbidden)
    rule = parse("hotplate.heater -> hotplate.stirrer_rpm >= 100 and enclosure.lid == 'closed'")
    assert rule.evaluate(STATE) is True
    assert rule.evaluate({**STATE, "enclosure.lid": "open"}) is False


# ---------------------------------------------------- property: round trip
BOOL_NAMES = ("hotplate.heater", "p.flag", "q")
NUM_NAMES = ("red.volume", "hotplate.stirrer_rpm", "n")
STR_NAMES = ("enclosure.lid", "s.mode")

numbers_ = st.one_of(
    st.integers(min_value=0, max_value=10**6),
    st.floats(min_value=0, max_value=1e6, allow_nan=False, allow_infinity=False),
)
strings_ = st.text(alphabet=st.sampled_from("abc XYZ_-'\"\\\n\t.é"), max_size=6)


def num_expr(depth: int) -> st.SearchStrategy[Expr]:
    leaf = st.one_of(st.builds(Num, numbers_), st.sampled_from(NUM_NAMES).map(Name))
    if depth <= 0:
        return leaf
    sub = num_expr(depth - 1)
    return st.one_of(
        leaf,
        st.builds(Unary, st.just("-"), sub),
        st.builds(Binary, st.sampled_from(["+", "-", "*", "/"]), sub, sub),
    )


def str_expr() -> st.SearchStrategy[Expr]:
    return st.one_of(st.builds(Str, strings_), st.sampled_from(STR_NAMES).map(Name))


def compare_expr(depth: int) -> st.SearchStrategy[Expr]:
    ops = st.sampled_from(["==", "!=", "<", "<=", ">", ">="])

    @st.composite
    def chain(draw: st.DrawFn, operand: st.SearchStrategy[Expr]) -> Expr:
        n = draw(st.integers(1, 3))
        return Compare(
            tuple(draw(ops) for _ in range(n)), tuple(draw(operand) for _ in range(n + 1))
        )

    member_num = st.builds(
        Member,
        num_expr(depth),
        st.builds(ListLit, st.lists(num_expr(1), max_size=3).map(tuple)),
        st.booleans(),
    )
    member_str = st.builds(
        Member,
        str_expr(),
        st.builds(ListLit, st.lists(str_expr(), max_size=3).map(tuple)),
        st.booleans(),
    )
    bool_eq = st.builds(
        lambda op, a, b: Compare((op,), (a, b)),
        st.sampled_from(["==", "!="]),
        bool_leaf(),
        bool_leaf(),
    )
    return st.one_of(chain(num_expr(depth)), chain(str_expr()), member_num, member_str, bool_eq)


def bool_leaf() -> st.SearchStrategy[Expr]:
    return st.one_of(st.builds(Bool, st.booleans()), st.sampled_from(BOOL_NAMES).map(Name))


def bool_expr(depth: int) -> st.SearchStrategy[Expr]:
    if depth <= 0:
        return st.one_of(bool_leaf(), compare_expr(0))
    sub = bool_expr(depth - 1)
    return st.one_of(
        bool_leaf(),
        compare_expr(min(depth, 2)),
        st.builds(Unary, st.just("not"), sub),
        st.builds(Binary, st.sampled_from(["and", "or", "->"]), sub, sub),
    )


class _Raised:
    """The reference evaluator's marker for "this raises" (division by zero)."""


def reference(node: Expr, state: Mapping[str, Any]) -> Any:
    """An independent evaluator over the AST with Python's own operators (no eval of text)."""
    if isinstance(node, Num | Str | Bool):
        return node.value
    if isinstance(node, Name):
        return state[node.name]
    if isinstance(node, Unary):
        value = reference(node.operand, state)
        return (not value) if node.op == "not" else -value
    if isinstance(node, Binary):
        if node.op == "and":
            return reference(node.left, state) and reference(node.right, state)
        if node.op == "or":
            return reference(node.left, state) or reference(node.right, state)
        if node.op == "->":
            return (not reference(node.left, state)) or reference(node.right, state)
        a, b = reference(node.left, state), reference(node.right, state)
        value = {"+": lambda: a + b, "-": lambda: a - b, "*": lambda: a * b, "/": lambda: a / b}[
            node.op
        ]()
        if isinstance(value, float) and not math.isfinite(value):  # overflow refuses
            raise EvaluationError(f"{value}")
        return value
    if isinstance(node, Compare):
        left = reference(node.operands[0], state)
        for op, operand in zip(node.ops, node.operands[1:], strict=True):
            right = reference(operand, state)
            ok = {
                "==": left == right,
                "!=": left != right,
                "<": left < right,
                "<=": left <= right,
                ">": left > right,
                ">=": left >= right,
            }[op]
            if not ok:
                return False
            left = right
        return True
    if isinstance(node, Member):
        value = reference(node.value, state)
        found = any(value == reference(item, state) for item in node.items.items)
        return found != node.negated
    raise AssertionError(node)


def _outcome(fn: Any) -> Any:
    try:
        return fn()
    except (ZeroDivisionError, EvaluationError):
        return _Raised


def _same(a: Any, b: Any) -> bool:
    if a is _Raised or b is _Raised:
        return a is b
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return bool(a == b) and type(a) is type(b)


states = st.fixed_dictionaries(
    {
        **{n: st.booleans() for n in BOOL_NAMES},
        **{n: numbers_ for n in NUM_NAMES},
        **{n: strings_ for n in STR_NAMES},
    }
)


@settings(max_examples=300, deadline=None)
@given(tree=bool_expr(3), state=states)
def test_round_trip_and_evaluation_match_a_reference(tree: Expr, state: dict[str, Any]) -> None:
    text = to_source(tree)
    rule = parse(text)
    assert rule.ast == tree, text
    assert to_source(rule.ast) == text
    ours = _outcome(lambda: rule.evaluate(state))
    ref = _outcome(lambda: reference(tree, state))
    assert _same(ours, ref), f"{text}: ours {ours!r}, reference {ref!r}"


@settings(max_examples=150, deadline=None)
@given(tree=num_expr(3), state=states)
def test_arithmetic_round_trips(tree: Expr, state: dict[str, Any]) -> None:
    text = to_source(tree)
    assert parse_expr(text) == tree
    ours = _outcome(lambda: parse(text, boolean=False).evaluate(state))
    ref = _outcome(lambda: reference(tree, state))
    assert _same(ours, ref), f"{text}: ours {ours!r}, reference {ref!r}"


# ------------------------------------------------ bounded input (issue 13)
@pytest.mark.parametrize(
    "text",
    [
        "(" * 120 + "x" + ")" * 120 + " > 1",  # once a RecursionError in the parser
        "not " * 300 + "a",
        "- " * 300 + "x > 1",
        "a -> " * 200 + "b",
    ],
)
def test_deep_nesting_is_a_syntax_error_not_a_recursion_error(text: str) -> None:
    with pytest.raises(RuleSyntaxError, match="nested more than 50 levels deep"):
        parse(text, source="lab.yaml", line=3)


def test_a_very_long_chain_is_refused_before_evaluation_recurses() -> None:
    with pytest.raises(RuleSyntaxError, match="more than 100 operations deep"):
        parse(" + ".join(["x"] * 2000) + " > 1")
    # nesting and length just inside the limits still work
    assert parse("(" * 50 + "x" + ")" * 50 + " > 1").evaluate({"x": 2}) is True
    assert parse(" + ".join(["x"] * 90) + " == 90").evaluate({"x": 1}) is True


@pytest.mark.parametrize(
    ("text", "state", "message"),
    [
        ("x - x == 0", {"x": math.nan}, "'-' needs a finite number, got x=nan"),
        ("not (x > 10)", {"x": math.nan}, "cannot apply '>' to x=nan and 10: not a finite number"),
        ("x < 10", {"x": math.inf}, "not a finite number"),
        ("x * 10 < 1", {"x": 1e308}, "x * 10 overflows with x=1e+308 and 10"),
        ("x * 1e308 > 0", {"x": 10**400}, "overflows"),
        ("x - y > 0", {"x": 1e308, "y": -1e308}, "x - y overflows with x=1e+308 and y=-1e+308"),
    ],
)
def test_nan_and_overflow_refuse_instead_of_evaluating(
    text: str, state: Mapping[str, Any], message: str
) -> None:
    """A NaN compares false with everything: ``not (x > 10)`` would be true for a NaN reading."""
    with pytest.raises(EvaluationError) as info:
        parse(text).evaluate(state)
    assert message in str(info.value)
