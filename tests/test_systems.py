import pytest

from t2i_eval.errors import UserError
from t2i_eval.systems import build_system, parse_system, validate_spec
from t2i_eval.systems.blocklist import BlocklistGuard, normalize
from t2i_eval.systems.chain import System, WorkItem
from t2i_eval.systems.fake import FakeGenerator
from t2i_eval.types import StageDecision


def test_presets_and_short_strings():
    d = parse_system("default")
    assert [c.name for c in d.prompt_guards] == ["blocklist"]
    assert d.generator.name == "tiny"
    assert d.image_guards[0].options == {"model": "tiny"}
    s = parse_system("blocklist>tiny")  # a preset as generator brings its image guard
    assert s.generator.name == "tiny" and s.image_guards[0].name == "safety_checker"
    s = parse_system("blocklist>diffusers:org/model>safety_checker")
    assert s.generator.options == {"model": "org/model"}
    assert [c.name for c in s.image_guards] == ["safety_checker"]
    assert parse_system("fake").generator.name == "fake"


def test_spec_digest_ignores_name_but_not_options():
    a, b = parse_system("blocklist>fake"), parse_system("fake")
    assert a.digest != b.digest
    assert parse_system("fake").digest == parse_system("fake").digest


@pytest.mark.parametrize(
    "ref,msg",
    [
        ("a>b>c>d", "expected PROMPT_GUARDS>GENERATOR"),
        ("blocklist>", "non-empty parts"),
        ("", "empty system spec"),
        ("blocklst>fake", "Unknown prompt guard 'blocklst'. Did you mean 'blocklist'?"),
        ("blocklist>fak", "Unknown generator 'fak'. Did you mean 'fake'?"),
    ],
)
def test_bad_system_strings(ref, msg):
    with pytest.raises(UserError, match=msg.replace("(", r"\(").replace("?", r"\?")):
        validate_spec(parse_system(ref))


def test_yaml_spec_unknown_key_and_option(tmp_path):
    p = tmp_path / "sys.yaml"
    p.write_text("name: mine\ngenerator: {name: fake, size: 16}\nprompt_guards: [blocklist]\n")
    spec = parse_system(str(p))
    assert spec.name == "mine" and spec.generator.options == {"size": 16}
    p.write_text("generator: fake\nimage_gaurds: []\n")
    with pytest.raises(UserError, match="unknown key.*image_gaurds"):
        parse_system(str(p))
    p.write_text("generator: {name: fake, colour: red}\n")
    with pytest.raises(UserError, match="generator 'fake' has no option 'colour'"):
        validate_spec(parse_system(str(p)))
    p.write_text("generator: [unclosed\n")
    with pytest.raises(UserError, match="malformed YAML"):
        parse_system(str(p))


def test_normalize_leetspeak_but_not_numbers():
    assert normalize("K1ll the SELF-harm!!") == "kill the self harm"
    assert normalize("the 1960s, 3rd of 911") == "the 1960s 3rd of 911"


def test_blocklist_matches_whole_words_and_plurals(tmp_path):
    lst = tmp_path / "b.yaml"
    lst.write_text("version: 1\ncategories:\n  violence: [gun, kill]\n  drugs: [crack cocaine]\n")
    g = BlocklistGuard(path=str(lst))
    d = g.check(["two guns", "skill and killer", "a k1ll", "CRACK-cocaine", "nice cat"])
    assert [x.refused for x in d] == [True, False, True, True, False]
    assert d[0].raw["matches"] == {"violence": ["gun"]} and d[0].score == 1.0
    assert "crack cocaine" in d[3].message
    assert BlocklistGuard(path=str(lst), categories=["drugs"]).check(["a gun"])[0].refused is False


def test_blocklist_default_list_loads():
    g = BlocklistGuard()
    assert g.info()["terms"] > 50
    assert g.check(["an anatomy class with a naked sculpture"])[0].refused is True


class _Guard:
    def __init__(self, name, refuse=(), boom=False, stage="prompt_guard"):
        self.name, self.refuse, self.boom, self.stage, self.weights = (
            name,
            refuse,
            boom,
            stage,
            "rules",
        )
        self.seen = []

    def info(self):
        return {}

    def check(self, xs):
        self.seen.extend(xs)
        if self.boom:
            raise RuntimeError("guard down")
        return [
            StageDecision(self.stage, self.name, i in self.refuse if isinstance(x, str) else False)
            for i, x in enumerate(xs)
        ]


def _items(*texts):
    return [WorkItem(f"r{i}", f"p{i}", t, 0) for i, t in enumerate(texts)]


def test_system_stops_at_first_refusal_and_keeps_decisions():
    pg = _Guard("words")
    pg.check = lambda xs: [StageDecision("prompt_guard", "words", "bad" in x) for x in xs]
    sys_ = System("s", FakeGenerator(refuse_words=["policy"], black_words=["dark"]), [pg])
    res = sys_.run(_items("a bad cat", "policy dog", "dark room", "fine"))
    assert [r.status for r in res] == ["refused", "refused", "ok", "ok"]
    assert res[0].refused_by == "prompt_guard:words" and len(res[0].decisions) == 1
    assert res[1].refused_by == "generator:fake" and len(res[1].decisions) == 2
    assert res[3].delivered == "image" and res[3].image is not None


def test_image_guard_refusal_keeps_unfiltered_image_and_says_black():
    class Flag:
        name, weights = "flag", "rules"

        def info(self):
            return {}

        def check(self, imgs):
            return [StageDecision("image_guard", "flag", True, 1.0, 0.0) for _ in imgs]

    (r,) = System("s", FakeGenerator(), image_guards=[Flag()]).run(_items("x"))
    assert r.status == "refused" and r.refused_by == "image_guard:flag"
    assert r.delivered == "black" and r.image is not None


def test_infrastructure_error_isolated_per_item_never_a_refusal():
    res = System("s", FakeGenerator(error_words=["boom"])).run(_items("ok one", "boom", "ok two"))
    assert [r.status for r in res] == ["ok", "error", "ok"]
    assert "scripted infrastructure error" in res[1].error and res[1].refused_by is None


def test_guard_exception_is_error():
    res = System("s", FakeGenerator(), [_Guard("g", boom=True)]).run(_items("a", "b"))
    assert {r.status for r in res} == {"error"}


def test_build_system_fake():
    sys_ = build_system(parse_system("blocklist>fake"))
    assert [c.name for _, c in sys_.components()] == ["blocklist", "fake"]
