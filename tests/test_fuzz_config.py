"""Property tests of the config parser: any dotted overrides or YAML document either give a validated
RunConfig or a ConfigError that names the offending key (or the file), never any other exception.

The schema is read from the dataclasses at test time, so new sections and fields are fuzzed too.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import os
import types
import typing

import pytest
import yaml
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from uniopd.config import ConfigError, RunConfig, field_help, load_config

# UNIOPD_FUZZ_EXAMPLES=20000 for a longer hunt.
FUZZ = settings(max_examples=int(os.environ.get("UNIOPD_FUZZ_EXAMPLES", 300)), deadline=None,
                suppress_health_check=[HealthCheck.too_slow])

REAL_KEYS = [key for key, _, _ in field_help()]
TEACHER_NAMES = ["t", "math", "code", "a b", "1", "é", "<name>"]
SEGMENTS = sorted({seg for key in REAL_KEYS for seg in key.split(".")} - {"<name>"})
YAML_SPECIAL = ["null", "Null", "~", "", " ", "yes", "no", "on", "off", "true", "True", "y", "n", "1e-3", "1E3",
                "1.0e+3", ".inf", "-.inf", ".nan", "0x1F", "0o17", "017", "1_000", "2024-01-01", "12:30:00", "[1,",
                "]", ":", "a: b", "- a", "{", "}", "{a: 1", "[1, [2, {a: 3}]]", "{lr: 1, x: [1]}", "&a [*a]", "*a",
                "!!str 1", "!!int x", "!!float 1", "!!binary aGk=", "!!set {a}", "!!python/object:os.system x",
                "? a", "'", '"', "'a'", '"\\x00"', "#", "a #b", "|", ">", "%", "@", "`", "=", "a=b", ",", "\t", "\n",
                "---", "...", "[]", "{}", "[[]]", "-1", "0", "1", "2.5", "-0.0", "1e400", "*", "'*'", "[math, code]"]


def _expected_key(dotted: str) -> str:
    """The part of a dotted key an error must name: up to the first wrong segment, or up to the value
    it descends into, or the whole key when every segment exists (then the value is what is wrong)."""
    parts = dotted.strip().split(".")
    tp: typing.Any = RunConfig
    for i, part in enumerate(parts):
        if dataclasses.is_dataclass(tp):
            if part not in {f.name for f in dataclasses.fields(tp)}:
                return ".".join(parts[: i + 1])
            tp = typing.get_type_hints(tp)[part]
        elif typing.get_origin(tp) is dict:
            tp = typing.get_args(tp)[1]  # any name is a valid key of a mapping (teachers.<name>, field_map.<k>)
        else:
            return ".".join(parts[:i])
    return ".".join(parts)


def _acceptable_names(assignment: str) -> list[str]:
    if "=" not in assignment:
        return [repr(assignment)]
    dotted = assignment.split("=", 1)[0]
    if not all(dotted.strip().split(".")):
        return [repr(assignment)]
    return [_expected_key(dotted)]


# ----------------------------------------------------------------------------- strategies

_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
_junk_segment = st.one_of(_text, st.sampled_from(SEGMENTS).map(lambda s: s + "x"), st.sampled_from(["", " ", "_"]))
_real_key = st.builds(lambda k, name: k.replace("<name>", name), st.sampled_from(REAL_KEYS),
                      st.sampled_from(TEACHER_NAMES))
_mixed_key = st.lists(st.one_of(st.sampled_from(SEGMENTS), _junk_segment), min_size=1, max_size=4).map(".".join)
_key = st.one_of(_real_key, _real_key, _mixed_key,
                 st.builds(lambda k, tail: f"{k}.{tail}", _real_key, _junk_segment),  # one level too deep
                 st.builds(lambda k: k.rsplit(".", 1)[0], _real_key))  # a section given a value

_scalar = st.one_of(st.none(), st.booleans(), st.integers(-10**30, 10**30),
                    st.floats(allow_nan=True, allow_infinity=True), _text, st.sampled_from(YAML_SPECIAL))
_value_tree = st.recursive(_scalar, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.one_of(_text, st.sampled_from(SEGMENTS)), inner, max_size=3)),
    max_leaves=8)


def _as_json(v: typing.Any) -> str:
    return json.dumps(v, allow_nan=False) if _json_ok(v) else str(v)


def _json_ok(v: typing.Any) -> bool:
    if isinstance(v, float):
        return math.isfinite(v)
    if isinstance(v, list):
        return all(_json_ok(x) for x in v)
    if isinstance(v, dict):
        return all(_json_ok(x) for x in v.values())
    return True


_raw_value = st.one_of(st.sampled_from(YAML_SPECIAL), _text, _value_tree.map(_as_json),
                       _value_tree.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip()),
                       st.lists(st.sampled_from(YAML_SPECIAL), max_size=4).map("".join))


def _leaf_type(dotted: str) -> typing.Any:
    tp: typing.Any = RunConfig
    for part in dotted.split("."):
        tp = typing.get_type_hints(tp)[part] if dataclasses.is_dataclass(tp) else typing.get_args(tp)[1]
    return tp


def _typed(tp: typing.Any, default: typing.Any) -> st.SearchStrategy:
    """Values of the field's own type (so validation ranges and choices get exercised, and some configs pass)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*[st.none() if a is type(None) else _typed(a, default) for a in typing.get_args(tp)])
    if origin is list:
        return st.lists(_typed(typing.get_args(tp)[0], None), max_size=3)
    if origin is dict:
        return st.dictionaries(_text, _typed(typing.get_args(tp)[1], None), max_size=2)
    base = {bool: st.booleans(), int: st.integers(-2, 300),
            float: st.one_of(st.floats(-2, 3, allow_nan=False), st.sampled_from([0.0, 1e-3, 0.5, 1.0])),
            str: _text}.get(tp, st.none())
    return st.one_of(base, st.just(default)) if default is not None else base


def _literal(text: str) -> typing.Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return None


_DEFAULTS = {key: _literal(default) for key, default, _ in field_help()}
_plausible = st.sampled_from(REAL_KEYS).flatmap(lambda k: st.tuples(
    st.just(k), st.sampled_from(TEACHER_NAMES[:3]), _typed(_leaf_type(k.replace("<name>", "t")), _DEFAULTS[k])
)).map(lambda kv: f"{kv[0].replace('<name>', kv[1])}={json.dumps(kv[2], ensure_ascii=False)}")

_assignment = st.one_of(
    _plausible, _plausible,
    st.builds(lambda k, v: f"{k}={v}", _key, _raw_value),
    _text,  # no '=' at all, or a stray one somewhere
    st.builds(lambda k: k, _key),
)

# YAML documents: a tree of real and junk sections/fields (any key type YAML allows) holding random values.
_doc_key = st.one_of(st.sampled_from(SEGMENTS), st.sampled_from(SEGMENTS), _text, st.integers(-3, 3), st.none(),
                     st.booleans())
_section = st.one_of(st.dictionaries(_doc_key, _value_tree, max_size=4), _value_tree,
                     st.dictionaries(st.sampled_from(TEACHER_NAMES),  # teachers.<name>.<field>
                                     st.dictionaries(st.sampled_from(SEGMENTS), _value_tree, max_size=3), max_size=2))


def _nest(assignments: list[str]) -> dict:
    tree: dict = {}
    for a in assignments:
        dotted, raw = a.split("=", 1)
        *path, leaf = dotted.split(".")
        node = tree
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = json.loads(raw)
    return tree


_doc_tree = st.one_of(st.dictionaries(_doc_key, _section, max_size=4), st.lists(_plausible, max_size=5).map(_nest))
_yaml_fragment = st.one_of(st.sampled_from(YAML_SPECIAL), st.sampled_from([s + ":" for s in SEGMENTS]),
                           st.sampled_from(["\n", "\n  ", "\n    ", ": ", "- ", ", "]), _text)
_raw_doc = st.lists(_yaml_fragment, max_size=16).map("".join)


# ----------------------------------------------------------------------------- properties


@FUZZ
@given(st.lists(_assignment, min_size=1, max_size=5))
@example(["trainer.lr.x=1"])
@example(["trainer.lr=1", "trainer.lr.x=2"])
@example(["trainer=5", "trainer.lr=1"])
@example(["teachers.a.domains=[math]", "teachers.b.domains=[math]"])
@example(["teachers=[1]"])
@example(["teachers.t=null"])
@example(["data.field_map={a: {b: 1}}"])
@example(["model.path=&a [*a]"])
@example(["trainer.betas=!!set {a, b}"])
@example(["..=1"])
@example(["=1"])
@example(["trainer.steps=1e3", "trainer.lr=1e-3"])
def test_overrides_give_a_config_or_a_config_error_naming_the_key(overrides):
    try:
        cfg = load_config(None, overrides)
    except ConfigError as exc:
        msg = str(exc)
        names = [n for o in overrides for n in _acceptable_names(o)]
        assert any(n in msg for n in names), (msg, names)
        event("ConfigError")
    else:
        assert isinstance(cfg, RunConfig)
        event("RunConfig")


def _check_file(path, text: str) -> None:
    path.write_text(text, encoding="utf-8")
    try:
        cfg = load_config(path, [])
    except ConfigError as exc:
        msg = str(exc)
        event("ConfigError")
        if str(path) in msg:
            return
        # Validation errors (checked after the tree is built) name the dotted key, which starts at a
        # top-level key of the document.
        tree = yaml.safe_load(text)
        assert isinstance(tree, dict) and any(msg.startswith(f"{k}.") or msg.startswith(f"{k}:") for k in tree), msg
    else:
        assert isinstance(cfg, RunConfig)
        event("RunConfig")


@pytest.fixture(scope="module")
def doc_path(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz") / "recipe.yaml"


@FUZZ
@given(_doc_tree)
@example({"trainer": {"steps": 0}})
@example({"teachers": {"a": {"domains": ["x"]}, "b": {"domains": ["x"]}}})
@example({1: 2})
@example({None: {"lr": 1}})
@example({"trainer": {True: 1}})
@example({"teachers": {"t": None}})
def test_yaml_documents_give_a_config_or_a_config_error_naming_the_key(doc_path, tree):
    _check_file(doc_path, yaml.safe_dump(tree, allow_unicode=True))


@FUZZ
@given(_raw_doc)
@example("trainer:\n  lr: [")
@example("- 1")
@example("? [a, b]\n: 1")
@example("&a {model: *a}")
@example("trainer: !!python/object:os.system x")
@example("trainer: {lr: \x00}")
@example("---\na: 1\n---\nb: 2")
@example("%YAML 9.9\n---\n{}")
def test_raw_yaml_text_gives_a_config_or_a_config_error_naming_the_file_or_key(doc_path, text):
    _check_file(doc_path, text)


# ----------------------------------------------------------------------------- regressions found by the fuzzer


# Values on which PyYAML raises other exceptions than yaml.YAMLError (a plain impossible date too); these
# once escaped load_config as ValueError/KeyError/AttributeError/IndexError/RecursionError.
PYYAML_GAPS = {"bad_date": "2024-02-30", "int_tag": "!!int x", "float_tag": "!!float .", "bool_tag": "!!bool x",
               "timestamp_tag": "!!timestamp x", "empty_tag": "!!int", "huge_int": "9" * 5000,
               "deep": "[" * 700 + "]" * 700}


@pytest.mark.parametrize("value", list(PYYAML_GAPS.values()), ids=list(PYYAML_GAPS))
def test_override_values_pyyaml_chokes_on_give_a_config_or_config_error(value):
    try:
        load_config(None, [f"model.revision={value}"])
    except ConfigError as exc:
        assert "model.revision" in str(exc)


FILE_GAPS = {"not_utf8": b"\xff\xfetrainer: {}", "dir": None,
             **{k: f"model:\n  revision: {v}\n".encode() for k, v in PYYAML_GAPS.items()}}


@pytest.mark.parametrize("content", list(FILE_GAPS.values()), ids=list(FILE_GAPS))
def test_unreadable_config_files_raise_config_error_naming_the_file(tmp_path, content):
    path = tmp_path / "recipe.yaml"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match="recipe.yaml"):
        load_config(path, [])


@pytest.mark.parametrize("override", ["rollout.temperature=.nan", "rollout.top_p=.nan", "loss.beta=.nan",
                                      "trainer.lr=.nan", "calibration.delta=.nan"])
def test_nan_in_a_range_checked_field_is_rejected(override):
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        load_config(None, [override])
