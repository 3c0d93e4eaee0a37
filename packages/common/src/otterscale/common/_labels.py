"""Kubernetes-style labels and label selectors, for labels the hub's configuration gives clusters.

``clusters.<name>.labels`` in ``otterscale.yaml`` gives each cluster labels with the syntax and
limits of Kubernetes object labels; a fan-out call (and an ``access`` rule) picks clusters with a
selector in Kubernetes' label selector syntax::

    env=prod,region in (eu, us),!legacy,tier!=db

Requirements are separated by commas and all must hold: ``key`` (the label exists), ``!key``
(it does not), ``key=value`` / ``key==value``, ``key!=value`` (true also when the label is
missing, as in Kubernetes), ``key in (a,b)``, ``key notin (a,b)`` (true also when missing).

Parsing is strict and bounded (:data:`MAX_SELECTOR_LENGTH`): a selector comes from a client and
an error names what is wrong without repeating more than a few characters of it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass

logger = logging.getLogger(__name__)

#: Longest selector accepted (characters); far beyond any real one.
MAX_SELECTOR_LENGTH = 4096
#: Most requirements in one selector, and values in one ``in``/``notin`` set.
MAX_REQUIREMENTS = 64
MAX_SET_VALUES = 256

_NAME = r"[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?"
_NAME_RE = re.compile(_NAME)
_PREFIX_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*")
_VALUE_RE = re.compile(rf"({_NAME})?")
_TOKEN_RE = re.compile(r"\s*(!=|==|=|\(|\)|,|!|[^\s!=(),]+)")


class LabelSyntaxError(ValueError):
    """A label key, value or selector is not valid; the message says why."""


def label_key_problem(key: str) -> str | None:
    """Why ``key`` is not a valid label key (``[prefix/]name``), or None."""
    prefix, slash, name = key.rpartition("/")
    if slash and (not prefix or len(prefix) > 253 or not _PREFIX_RE.fullmatch(prefix)):
        return "the prefix of a label key must be a DNS subdomain (lower case, at most 253 characters)"
    if not _NAME_RE.fullmatch(name):
        return (
            "a label key's name must be at most 63 characters: letters, digits, '-', '_' or '.', "
            "starting and ending with a letter or digit"
        )
    return None


def label_value_problem(value: str) -> str | None:
    """Why ``value`` is not a valid label value, or None (the empty value is valid)."""
    if not _VALUE_RE.fullmatch(value):
        return (
            "a label value must be empty or at most 63 characters: letters, digits, '-', '_' or '.', "
            "starting and ending with a letter or digit"
        )
    return None


@dataclass(frozen=True, slots=True)
class Requirement:
    """One requirement of a selector: ``operator`` is exists, !, =, !=, in or notin."""

    key: str
    operator: str
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Whether ``labels`` satisfy this requirement."""
        present = self.key in labels
        if self.operator == "exists":
            return present
        if self.operator == "!":
            return not present
        if self.operator in ("=", "in"):
            return present and labels[self.key] in self.values
        # != and notin: also true when the label is missing (Kubernetes semantics).
        return not present or labels[self.key] not in self.values


@dataclass(frozen=True, slots=True)
class LabelSelector:
    """A parsed selector (all requirements must hold); the empty selector matches everything."""

    requirements: tuple[Requirement, ...] = ()
    text: str = ""

    @classmethod
    def parse(cls, text: str) -> LabelSelector:
        """Parse ``text``; raise :class:`LabelSyntaxError` saying what is wrong."""
        if len(text) > MAX_SELECTOR_LENGTH:
            raise LabelSyntaxError(f"the selector is longer than {MAX_SELECTOR_LENGTH} characters")
        tokens = _tokens(text)
        requirements: list[Requirement] = []
        position = 0
        while position < len(tokens):
            requirement, position = _requirement(tokens, position)
            requirements.append(requirement)
            if len(requirements) > MAX_REQUIREMENTS:
                raise LabelSyntaxError(f"the selector has more than {MAX_REQUIREMENTS} requirements")
            if position < len(tokens):
                if tokens[position] != ",":
                    raise LabelSyntaxError(f"expected ',' before {_show(tokens[position])}")
                position += 1
                if position == len(tokens):
                    raise LabelSyntaxError("the selector ends with ','")
        return cls(tuple(requirements), text.strip())

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Whether every requirement holds for ``labels``."""
        return all(requirement.matches(labels) for requirement in self.requirements)

    def __bool__(self) -> bool:
        return bool(self.requirements)


def _tokens(text: str) -> list[str]:
    tokens: list[str] = []
    position = 0
    stripped = text.rstrip()
    while position < len(stripped):
        match = _TOKEN_RE.match(stripped, position)
        if match is None:  # pragma: no cover - the pattern matches any non-space character
            raise LabelSyntaxError("the selector cannot be read")
        tokens.append(match.group(1))
        position = match.end()
    return tokens


def _show(token: str) -> str:
    return repr(token if len(token) <= 20 else token[:20] + "...")


def _key(token: str) -> str:
    if token in ("!=", "==", "=", "(", ")", ",", "!"):
        raise LabelSyntaxError(f"expected a label key, found {_show(token)}")
    problem = label_key_problem(token)
    if problem:
        raise LabelSyntaxError(f"{_show(token)}: {problem}")
    return token


def _value(token: str) -> str:
    problem = label_value_problem(token)
    if problem or token in ("(", ")", ",", "!", "=", "==", "!="):
        raise LabelSyntaxError(f"{_show(token)}: {problem or 'expected a label value'}")
    return token


def _requirement(tokens: list[str], position: int) -> tuple[Requirement, int]:
    if tokens[position] == "!":
        if position + 1 >= len(tokens):
            raise LabelSyntaxError("'!' must be followed by a label key")
        key = _key(tokens[position + 1])
        return Requirement(key, "!"), position + 2
    key = _key(tokens[position])
    position += 1
    if position == len(tokens) or tokens[position] == ",":
        return Requirement(key, "exists"), position
    operator = tokens[position]
    position += 1
    if operator in ("=", "==", "!="):
        # An empty value ("env=") is allowed, as in Kubernetes.
        if position == len(tokens) or tokens[position] == ",":
            value = ""
        else:
            value = _value(tokens[position])
            position += 1
        return Requirement(key, "!=" if operator == "!=" else "=", frozenset({value})), position
    if operator in ("in", "notin"):
        if position >= len(tokens) or tokens[position] != "(":
            raise LabelSyntaxError(f"'{operator}' must be followed by '(value, ...)'")
        position += 1
        values: set[str] = set()
        while True:
            if position >= len(tokens):
                raise LabelSyntaxError(f"the value set of {_show(key)} is not closed with ')'")
            word = tokens[position]
            if word == ")" and not values:
                raise LabelSyntaxError(f"the value set of {_show(key)} is empty")
            values.add(_value(word))
            if len(values) > MAX_SET_VALUES:
                raise LabelSyntaxError(f"a value set has more than {MAX_SET_VALUES} values")
            position += 1
            if position < len(tokens) and tokens[position] == ")":
                return Requirement(key, operator, frozenset(values)), position + 1
            if position >= len(tokens) or tokens[position] != ",":
                raise LabelSyntaxError(f"expected ',' or ')' in the value set of {_show(key)}")
            position += 1
    raise LabelSyntaxError(f"unknown operator {_show(operator)} (use =, ==, !=, in or notin)")
