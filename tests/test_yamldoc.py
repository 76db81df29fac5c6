"""Bounded YAML (issue 13): alias expansion, node count and depth are refused with a config error
before anything walks the tree, quickly, and never as a RecursionError."""

from __future__ import annotations

import pytest

from loops.program import ProgramError, load_program
from safety.yamldoc import MAX_DEPTH, ConfigError, YamlDoc, check_size, compose_yaml


def laughs(levels: int = 9) -> str:
    """A "billion laughs": each anchor repeats the previous one nine times (9**levels strings)."""
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def test_a_billion_laughs_is_refused_naming_the_line() -> None:
    text = laughs()
    assert len(text) < 1000
    with pytest.raises(ConfigError) as info:
        compose_yaml(text, YamlDoc("lab.yaml"))
    assert str(info.value).startswith("lab.yaml:6: too large: more than 100000 values")
    assert "aliases" in str(info.value)


def test_a_billion_laughs_in_a_program_front_matter_is_a_program_error() -> None:
    text = "---\nname: x\nfixed:\n" + "".join("  " + line + "\n" for line in laughs().splitlines())
    with pytest.raises(ProgramError, match=r"^mqtt:start:\d+: front matter is too large"):
        load_program(text + "---\n", source="mqtt:start")


@pytest.mark.parametrize(
    "text",
    [
        "a: " + "[" * 5000 + "]" * 5000,  # flow: libyaml's own limit or ours
        "a:\n" + "".join("  " * i + "-\n" for i in range(1, 300)),  # block
        "a: " + "{b: " * 150 + "1" + "}" * 150,
    ],
)
def test_deep_yaml_is_a_config_error_not_a_recursion_error(text: str) -> None:
    with pytest.raises(
        ConfigError, match=r"^f\.yaml:\d+: nested more than 100 levels deep: flatten it$"
    ):
        compose_yaml(text, YamlDoc("f.yaml"))


def test_aliases_count_what_they_repeat_in_depth_too() -> None:
    inner = "[" * 60 + "1" + "]" * 60
    text = f"a: &a {inner}\nb: " + "[" * 60 + "*a" + "]" * 60 + "\n"
    with pytest.raises(ConfigError, match=f"nested more than {MAX_DEPTH} levels"):
        check_size(text, YamlDoc("f.yaml"))


def test_ordinary_documents_with_aliases_still_load() -> None:
    data = compose_yaml("a: &x [1, 2]\nb: *x\nc: {d: [1, {e: f}]}\n", YamlDoc("f.yaml"))
    assert data == {"a": [1, 2], "b": [1, 2], "c": {"d": [1, {"e": "f"}]}}
    # just inside the limits
    check_size("a: " + "[" * 99 + "]" * 99, YamlDoc("f.yaml"))
    check_size("a: [" + ",".join(["1"] * 99_000) + "]", YamlDoc("f.yaml"))
