"""A1111 ``<lora:...>`` prompt syntax -> the same plan as the Python API."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fusion import LoRARef, Plan, PromptSyntaxError, parse_prompt, plan_from_prompt
from fusion.syntax import format_tag, parse_tag

MIDD = "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0"


@pytest.mark.parametrize("tag, ref", [
    ("<lora:star>", LoRARef("star")),
    ("<lora:star:0.8>", LoRARef("star", 0.8)),
    ("<lora:star:0.5:0.8>", LoRARef("star", 0.8, te_weight=0.5)),
    ("<lora:star:te=0.5:unet=0.8>", LoRARef("star", 0.8, te_weight=0.5)),
    ("<lora:star:te=0.5>", LoRARef("star", 0.5)),  # A1111: unet defaults to te
    ("<lora:star:unet=0.3>", LoRARef("star", 0.3, te_weight=1.0)),
    ("<lora:star:0.8:lbw=MIDD:start=5:stop=20>", LoRARef("star", 0.8, lbw="MIDD", start=5, stop=20)),
    ("<lora:star:0.8:MIDD>", LoRARef("star", 0.8, lbw="MIDD")),  # LBW's older positional form
    ("<lora:star:1:0.5:OUTS>", LoRARef("star", 0.5, te_weight=1.0, lbw="OUTS")),
    (f"<lora:star:0.7:lbw={MIDD}>", LoRARef("star", 0.7, lbw=MIDD)),
    (f"<lora:star:0.7:{MIDD}>", LoRARef("star", 0.7, lbw=MIDD)),
    ("<lora:star:w=ALL0.5:step=3-9>", LoRARef("star", lbw="ALL0.5", start=3, stop=9)),
    ("<lora:star:stop=0.4>", LoRARef("star", stop=0.4)),
    ("<lyco:my style v2:0.6:cat=style>", LoRARef("my style v2", 0.6, category="style")),
    ("<lora:dog:lbw=BLORA_CONTENT>", LoRARef("dog", lbw="BLORA_CONTENT")),
    ("<lora:xl:1:lbw=" + ",".join(["1"] * 12) + ">", LoRARef("xl", lbw=",".join(["1"] * 12))),
    ("<lora:xl:1:lbw=" + ",".join(["0.5"] * 20) + ">", LoRARef("xl", lbw=",".join(["0.5"] * 20))),
    ("<lora:sd:1:lbw=" + ",".join(["0"] * 26) + ">", LoRARef("sd", lbw=",".join(["0"] * 26))),
])
def test_tags(tag, ref):
    clean, refs = parse_prompt(f"a photo, {tag}, outdoors")
    assert refs == [ref]
    assert clean == "a photo, outdoors"


@pytest.mark.parametrize("tag, message", [
    ("<lora::0.8>", "the LoRA name is empty"),
    ("<lora:star:abc>", "weight 'abc' is not a number"),
    ("<lora:star:0.8:lbw=1,0,0>", "has 3 values"),
    ("<lora:star:0.8:lbw=WHAT>", "unknown block-weight preset 'WHAT'"),
    ("<lora:star:0.8:bogus=1>", "unknown field\\(s\\) \\['bogus'\\]"),
    ("<lora:star:0.8:start=x>", "start 'x' is not a number"),
    ("<lora:star:start=9:stop=3>", "stop=3 must come after start=9"),
    ("<lora:star:1:1:1:1>", "too many fields"),
    ("<lora:star:1:1:NOPE>", "third field 'NOPE'"),
    ("<lora:star:dyn=4>", "not supported"),
    ("<lora:star:lbw=MIDD:w=MIDD>", "not both"),
    ("<lora:star:step=5>", "range A-B"),
    ("<lora:star:0.8::stop=4>", "empty field"),
    ("<lora:star:te=inf>", "not a finite number"),
])
def test_errors_name_the_tag(tag, message):
    with pytest.raises(PromptSyntaxError, match=message) as err:
        parse_prompt(f"a photo {tag} of a dog")
    assert tag in str(err.value)


def test_several_tags_and_the_clean_prompt():
    clean, refs = parse_prompt("<lora:a:0.5> a knight,<lora:b:1:lbw=OUTD>, in the rain <lora:c> ")
    assert [r.name for r in refs] == ["a", "b", "c"]
    assert clean == "a knight, in the rain"
    with pytest.raises(PromptSyntaxError, match="appears 2 times"):
        parse_prompt("<lora:a> and <lora:a:0.3>")
    assert parse_prompt("no loras here <hypernet:x:1>") == ("no loras here <hypernet:x:1>", [])


def test_prompt_and_python_api_give_the_same_plan():
    clean, plan = plan_from_prompt("a cat <lora:hero:0.8:lbw=MIDD:start=2:stop=20:cat=character> <lora:ink:0.6>")
    api = Plan(loras=[LoRARef("hero", 0.8, lbw="MIDD", start=2, stop=20, category="character"), LoRARef("ink", 0.6)],
               method="blockwise")
    assert (clean, plan) == ("a cat", api)
    assert plan_from_prompt("<lora:a:0.3> x")[1].method == "merge"
    _, switch = plan_from_prompt("<lora:a> <lora:b> x", method="switch", tau=3)
    assert switch == Plan([LoRARef("a"), LoRARef("b")], "switch", {"tau": 3})
    assert Plan.from_dict(plan.to_dict()) == plan


names = st.text(alphabet=st.characters(whitelist_categories=("Lu", "Ll", "Nd"), whitelist_characters=" _-."),
                min_size=1, max_size=12).filter(lambda s: s.strip() == s and s.strip())
weights = st.floats(min_value=-4, max_value=4, allow_nan=False).map(lambda x: round(x, 3))


@settings(max_examples=150, deadline=None)
@given(name=names, weight=weights, te=st.none() | weights, lbw=st.none() | st.sampled_from(["MIDD", "OUTS", MIDD]),
       start=st.none() | st.integers(1, 10), span=st.none() | st.integers(1, 10),
       category=st.none() | st.sampled_from(["character", "style"]))
def test_format_and_parse_round_trip(name, weight, te, lbw, start, span, category):
    stop = None if span is None else (start or 0) + span
    ref = LoRARef(name, weight, lbw=lbw, start=start, stop=stop, category=category,
                  te_weight=None if te == weight else te)
    tag = format_tag(ref)
    assert parse_tag(tag, tag[len("<lora:"):-1]) == ref
    assert parse_prompt(f"x {tag} y") == ("x y", [ref])
