"""A1111 LoRA tags in prompts and LoRA names resolved against the files on disk."""

import pytest

from lora_workbench.training.lora.prompt_syntax import (FORMS, LoraNotFoundError, LoraTag, PromptSyntaxError,
                                                        parse_lora_tags, resolve_lora_name)


def one(tag):
    _, tags = parse_lora_tags(tag)
    assert len(tags) == 1
    return tags[0]


@pytest.mark.parametrize("tag, name, te, unet", [
    ("<lora:style>", "style", 1.0, 1.0),
    ("<lora:style:0.8>", "style", 0.8, 0.8),
    ("<lora:style:0.3:0.9>", "style", 0.3, 0.9),  # A1111 order: text encoder, then UNet
    ("<lora: my style.v2 : 0.5 : 1 >", "my style.v2", 0.5, 1.0),
    ("<lora:people/alice.v2:1>", "people/alice.v2", 1.0, 1.0),
    ("<lora:style:-0.5>", "style", -0.5, -0.5),
    ("<lora:style:1e-1:-2.5E0>", "style", 0.1, -2.5),
    ("<lora:style:0.8:unet=0.5>", "style", 0.8, 0.5),
    ("<lora:style:unet=0.2>", "style", 1.0, 0.2),
    ("<lora:style:te=0.3>", "style", 0.3, 0.3),  # A1111: the UNet weight defaults to the te weight
    ("<lora:style:0.4:0.6:te=0>", "style", 0.0, 0.6),
    ("<lyco:style:1:0.7>", "style", 1.0, 0.7),
])
def test_tag_weights_follow_a1111(tag, name, te, unet):
    t = one(tag)
    assert (t.name, t.clip_strength, t.model_strength) == (name, te, unet)


def test_block_weights_and_other_named_arguments():
    t = one("<lora:style:0.8:lbw=OUTD:start=5>")
    assert t.block_weights == "OUTD" and t.extra == {"start": "5"} and t.clip_strength == 0.8
    t = one("<lyco:style:1:1:lbw=1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0>")
    assert t.kind == "lyco" and t.block_weights == "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0"
    assert one("<lora:style:1:1:16>").extra == {"dyn": "16"}


def test_prompt_is_cleaned_of_tags_and_leftover_separators():
    clean, tags = parse_lora_tags("<lora:a:0.5>, masterpiece,  <lora:b>, 1girl , <lora:c:1:1>  smiling,\n"
                                  "<lora:d> outdoors, <hypernet:h:1>")
    assert [t.name for t in tags] == ["a", "b", "c", "d"]
    assert clean == "masterpiece, 1girl, smiling\noutdoors, <hypernet:h:1>"
    assert parse_lora_tags("a cat,  (red:1.2)") == ("a cat,  (red:1.2)", [])  # no tags: untouched


@pytest.mark.parametrize("prompt, message", [
    ("a cat <lora:>", f"LoRA tag '<lora:>' has no LoRA name; write it as {FORMS}"),
    ("<lora:x:abc>", f"LoRA tag '<lora:x:abc>': weight 'abc' is not a number; write it as {FORMS}"),
    ("<lora:x:1:zz>", f"LoRA tag '<lora:x:1:zz>': UNet weight 'zz' is not a number; write it as {FORMS}"),
    ("<lora:x:unet=>", f"LoRA tag '<lora:x:unet=>': unet= '' is not a number; write it as {FORMS}"),
    ("<lora:x:nan>", f"LoRA tag '<lora:x:nan>': weight 'nan' is not a number; write it as {FORMS}"),
    ("a cat, <lora:x:0.5 smiling", f"LoRA tag '<lora:x:0.5 smiling' is not closed with '>'; write it as {FORMS}"),
    ("<lora:x <lora:y>", f"LoRA tag '<lora:x' is not closed with '>'; write it as {FORMS}"),
])
def test_malformed_tags_give_the_exact_error(prompt, message):
    with pytest.raises(PromptSyntaxError) as e:
        parse_lora_tags(prompt)
    assert str(e.value) == message
    assert isinstance(e.value, ValueError)


def test_unknown_named_argument_and_too_many_weights_are_errors():
    with pytest.raises(PromptSyntaxError, match=r"unknown argument 'unte='.*te=, unet=, lbw="):
        parse_lora_tags("<lora:x:unte=0.5>")
    with pytest.raises(PromptSyntaxError, match="has 4 weights"):
        parse_lora_tags("<lora:x:1:1:8:2>")


AVAILABLE = ["people/alice.v2.safetensors", "styles/Watercolor.safetensors", "bob.pt", "people/bob.safetensors"]


@pytest.mark.parametrize("name, found", [
    ("bob.pt", "bob.pt"),  # exact
    ("people/alice.v2", "people/alice.v2.safetensors"),  # without extension
    ("alice.v2", "people/alice.v2.safetensors"),  # without sub-folder (the dot is not an extension)
    ("people\\alice.v2", "people/alice.v2.safetensors"),  # Windows separators
    ("watercolor", "styles/Watercolor.safetensors"),  # case-insensitive
    ("bob", "bob.pt"),  # the top-level file wins over people/bob at the path-without-extension level
    ("people/bob", "people/bob.safetensors"),
])
def test_resolve_lora_name(name, found):
    assert resolve_lora_name(name, AVAILABLE) == found


def test_unknown_name_suggests_close_matches_and_the_folder():
    with pytest.raises(LoraNotFoundError) as e:
        resolve_lora_name("alcie.v2", AVAILABLE, where="models/loras")
    assert str(e.value) == ("LoRA 'alcie.v2' not found among 4 LoRA files in models/loras; "
                            "did you mean people/alice.v2.safetensors?")
    many = [f"style_{i}.safetensors" for i in range(9)]
    with pytest.raises(LoraNotFoundError, match="did you mean") as e:
        resolve_lora_name("style_", many)
    assert str(e.value).count("style_") == 6  # the name itself and at most 5 suggestions


def test_ambiguous_name_asks_for_the_folder():
    with pytest.raises(LoraNotFoundError, match=r"matches 2 files: \['a/x.safetensors', 'b/x.safetensors'\]"):
        resolve_lora_name("x", ["a/x.safetensors", "b/x.safetensors"])


def test_tag_names_flow_into_resolution():
    _, tags = parse_lora_tags("<lora:Alice.V2:0.7>")
    assert tags == [LoraTag("Alice.V2", 0.7, 0.7)]
    assert resolve_lora_name(tags[0].name, AVAILABLE) == "people/alice.v2.safetensors"
