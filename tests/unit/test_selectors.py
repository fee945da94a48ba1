import pytest
from pydantic import ValidationError

from podnet.model.selectors import LabelSelector, LabelSelectorRequirement


def sel(**kw):
    return LabelSelector.model_validate(kw)


def test_empty_selector_matches_everything_including_no_labels():
    assert sel().matches({})
    assert sel().matches({"a": "b"})
    assert sel().is_empty()


def test_match_labels_and_expressions_are_anded():
    s = sel(matchLabels={"app": "web"}, matchExpressions=[{"key": "tier", "operator": "In", "values": ["a", "b"]}])
    assert s.matches({"app": "web", "tier": "a"})
    assert not s.matches({"app": "web", "tier": "c"})
    assert not s.matches({"app": "db", "tier": "a"})
    assert not s.matches({"app": "web"})


@pytest.mark.parametrize(
    ("op", "values", "labels", "expected"),
    [
        ("In", ["x"], {"k": "x"}, True),
        ("In", ["x"], {}, False),
        ("NotIn", ["x"], {"k": "y"}, True),
        ("NotIn", ["x"], {}, True),  # upstream: a missing key satisfies NotIn
        ("NotIn", ["x"], {"k": "x"}, False),
        ("Exists", None, {"k": ""}, True),
        ("Exists", None, {}, False),
        ("DoesNotExist", None, {}, True),
        ("DoesNotExist", None, {"k": "v"}, False),
    ],
)
def test_operators(op, values, labels, expected):
    req = LabelSelectorRequirement.model_validate({"key": "k", "operator": op, "values": values})
    assert req.matches(labels) is expected


@pytest.mark.parametrize(
    ("req", "message"),
    [
        ({"key": "k", "operator": "In"}, "needs a non-empty values list"),
        ({"key": "k", "operator": "Exists", "values": ["a"]}, "takes no values"),
        ({"key": "k", "operator": "Has", "values": ["a"]}, "operator"),
        ({"key": "-bad", "operator": "Exists"}, "invalid label key"),
        ({"key": "k", "operator": "In", "values": ["no spaces"]}, "invalid label value"),
    ],
)
def test_invalid_requirements_are_rejected(req, message):
    with pytest.raises(ValidationError, match=message):
        LabelSelectorRequirement.model_validate(req)


def test_parse_kubectl_syntax():
    s = LabelSelector.parse("app=web,tier in (a, b),env!=prod,canary,!legacy")
    assert s.matches({"app": "web", "tier": "b", "env": "dev", "canary": "1"})
    assert not s.matches({"app": "web", "tier": "b", "env": "prod", "canary": "1"})
    assert not s.matches({"app": "web", "tier": "b", "canary": "1", "legacy": "y"})
    assert not s.matches({"app": "web", "tier": "b"})


def test_parse_rejects_garbage():
    with pytest.raises(ValueError, match="cannot parse"):
        LabelSelector.parse("a=b,(c")
