"""The rule language's errors, and where in its file a rule's text sits (for their messages).

:class:`RuleSyntaxError` (and :class:`RuleTypeError`) are configuration errors found when a
rule is parsed, :class:`EvaluationError` a rule that cannot be computed against a state;
:class:`SourceText` turns an offset in a rule's text into the file, line and column of an
error. :mod:`safety.expr` (which re-exports the errors) describes the language.
"""

from __future__ import annotations


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


class SourceText:
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


__all__ = ["EvaluationError", "RuleSyntaxError", "RuleTypeError", "SourceText"]
