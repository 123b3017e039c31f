"""Prompt sets: loading, built-ins, the default manifest, the stratified sampler, the mask."""

import io
import json
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from marble_kit.errors import MarbleError
from marble_kit.prompts import (
    PromptSampler,
    PromptSet,
    applicability_mask,
    builtin_prompt_sets,
    load_manifest,
    load_prompt_file,
    load_prompt_sets,
    tagged_rewards,
)
from marble_kit.rewards import quoted_text
from marble_plugins import world


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------ files


def test_txt_skips_blank_lines_and_comments(tmp_path):
    path = _write(tmp_path / "mine.txt", "# header\n\n  a red circle  \n#note\na cat # not a comment\n\n")
    (prompt_set,) = load_prompt_file(path)
    assert prompt_set.name == "mine" and prompt_set.rewards is None and prompt_set.weight == 1.0
    assert prompt_set.prompts == ["a red circle", "a cat # not a comment"]


def test_jsonl_groups_lines_by_their_reward_tags(tmp_path):
    lines = [{"prompt": "a", "rewards": ["ocr"]}, {"prompt": "b"}, {"prompt": "c", "rewards": ["ocr"]},
             {"prompt": "d", "rewards": ["color", "shape"], "id": 7}]
    path = _write(tmp_path / "p.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n\n")
    sets = load_prompt_file(path)
    assert [(s.prompts, s.rewards) for s in sets] == [
        (["a", "c"], ["ocr"]), (["b"], None), (["d"], ["color", "shape"])]
    assert [s.name for s in sets] == ["p[ocr]", "p[all]", "p[color+shape]"]
    assert sum(s.weight for s in sets) == pytest.approx(1.0)
    assert sets[0].weight == pytest.approx(0.5)


@pytest.mark.parametrize("line, message", [
    ("{not json", "line 2 is not valid JSON"),
    ('["a list"]', "line 2 is a JSON list"),
    ('{"text": "no prompt key"}', 'line 2 has no non-empty string "prompt"'),
    ('{"prompt": "x", "rewards": "ocr"}', '"rewards" must be a list'),
])
def test_bad_jsonl_line_names_file_and_line(tmp_path, line, message):
    path = _write(tmp_path / "bad.jsonl", '{"prompt": "fine"}\n' + line + "\n")
    with pytest.raises(MarbleError, match=message) as info:
        load_prompt_file(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_empty_missing_and_unsupported_files_are_clear_errors(tmp_path):
    with pytest.raises(MarbleError, match="has no prompts"):
        load_prompt_file(_write(tmp_path / "empty.txt", "# only a comment\n\n"))
    with pytest.raises(MarbleError, match="does not exist"):
        load_prompt_file(tmp_path / "missing.txt")
    with pytest.raises(MarbleError, match="suffix '.csv'"):
        load_prompt_file(_write(tmp_path / "p.csv", "a\n"))
    with pytest.raises(MarbleError, match="neither a file nor a built-in set.*colors"):
        load_prompt_sets(str(tmp_path / "nowhere.txt"))
    with pytest.raises(MarbleError, match="no built-in prompt set 'builtin:nope'"):
        load_prompt_sets("builtin:nope")


# ------------------------------------------------------------------------- manifests, specs


def test_manifest_resolves_paths_tags_weights_and_names(tmp_path):
    _write(tmp_path / "a.txt", "one\ntwo\n")
    (tmp_path / "sub").mkdir()
    _write(tmp_path / "sub" / "b.jsonl", '{"prompt": "x", "rewards": ["ocr"]}\n{"prompt": "y"}\n')
    manifest = _write(tmp_path / "mix.toml", """
[[prompt_set]]
path = "a.txt"
rewards = ["color"]
weight = 2
name = "first"

[[prompt_set]]
path = "sub/b.jsonl"

[[prompt_set]]
path = "builtin:words"
rewards = ["word"]
""")
    sets = load_prompt_sets(str(manifest))
    assert [s.name for s in sets] == ["first", "b[ocr]", "b[all]", "words"]
    assert [s.rewards for s in sets] == [["color"], ["ocr"], None, ["word"]]
    assert [s.weight for s in sets] == [2.0, 0.5, 0.5, 1.0]
    assert sets[0].prompts == ["one", "two"]


@pytest.mark.parametrize("body, message", [
    ('[[prompt_set]]\npath = "a.txt"\nreward = ["x"]\n', "unknown key 'reward'"),
    ('[[prompt_set]]\nrewards = ["x"]\n', 'has no "path"'),
    ('[[prompt_set]]\npath = "gone.txt"\n', "gone.txt does not exist"),
    ('[[prompt_set]]\npath = "a.txt"\nweight = 0\n', '"weight" must be a number > 0'),
    ('[[prompt_set]]\npath = "a.txt"\nrewards = "color"\n', '"rewards" must be a list'),
    ('sets = 1\n', "unknown key 'sets'"),
    ('[[prompt_set]\n', "not valid TOML"),
])
def test_bad_manifest_is_a_clear_error(tmp_path, body, message):
    _write(tmp_path / "a.txt", "one\n")
    with pytest.raises(MarbleError, match=message):
        load_manifest(_write(tmp_path / "m.toml", body))


def test_tag_suffix_and_builtin_names(tmp_path, monkeypatch):
    path = _write(tmp_path / "mine.txt", "a red circle\n")
    (tagged,) = load_prompt_sets(f"{path}:color+sharpness")
    assert tagged.rewards == ["color", "sharpness"]
    by_prefix = load_prompt_sets("builtin:colors")
    by_name = load_prompt_sets("colors")
    assert by_prefix[0].prompts == by_name[0].prompts and by_name[0].name == "colors"
    (ocr,) = load_prompt_sets("builtin:ocr:ocr")
    assert ocr.rewards == ["ocr"]
    # a plain name falls back to the built-in only when no such file exists
    monkeypatch.chdir(tmp_path)
    (tmp_path / "colors").mkdir()
    assert load_prompt_sets("colors")[0].prompts == by_name[0].prompts
    _write(tmp_path / "general.txt", "my own prompt\n")
    assert load_prompt_sets("general.txt")[0].prompts == ["my own prompt"]


# --------------------------------------------------------------------------- shipped sets


def test_builtins_are_listed():
    assert {"default", "colors", "shapes", "words", "world_eval", "ocr", "general"} <= set(builtin_prompt_sets())


def test_default_manifest_has_specialist_sets_and_at_least_three_rewards():
    sets = load_prompt_sets("default")
    rewards = tagged_rewards(sets)
    assert len(rewards) >= 3
    # one reward judges every set (the global one) and each set has its own specialist reward
    shared = [r for r in rewards if all(s.applies(r) for s in sets)]
    assert shared == ["centering"]
    # shape, the slowest reward to rise, gets twice the draws (docs/world.md)
    assert [(s.name, s.weight) for s in sets] == [("colors", 1.0), ("shapes", 2.0), ("words", 1.0)]
    # the previous default mixture ships too: sharpness judges every set, words by it alone
    previous = load_prompt_sets("world_sharpness")
    assert [(s.name, s.rewards, s.weight) for s in previous] == [
        ("colors", ["color", "sharpness"], 1.0), ("shapes", ["shape", "sharpness"], 1.0), ("words", ["sharpness"], 1.0)]
    specialists = [[r for r in s.rewards if r not in shared] for s in sets]
    assert sorted(r for rewards in specialists for r in rewards) == ["color", "shape", "word"]


def test_world_sets_use_the_world_vocabulary_and_hold_out_the_eval_prompts():
    sets = {name: load_prompt_sets(name)[0].prompts for name in ("colors", "shapes", "words", "world_eval")}
    for prompts in sets.values():
        for prompt in prompts:
            attributes = world.parse_prompt(prompt)
            assert attributes["background"] is not None, prompt
            assert attributes["word"] is not None or (attributes["color"] and attributes["shape"]), prompt
    train = set(sets["colors"]) | set(sets["shapes"]) | set(sets["words"])
    assert not train & set(sets["world_eval"])
    assert len(train) == len(sets["colors"]) + len(sets["shapes"]) + len(sets["words"])
    # every colour, shape and word is trained and evaluated
    def named(prompts, attribute):
        return {world.parse_prompt(p)[attribute] for p in prompts} - {None}

    for prompts in (sets["colors"], sets["shapes"], sets["world_eval"]):
        assert named(prompts, "color") == set(world.COLORS)
        assert named(prompts, "shape") == set(world.SHAPES)
    for prompts in (sets["words"], sets["world_eval"]):
        assert named(prompts, "word") == set(world.WORDS)


def test_ocr_and_general_sets():
    ocr = load_prompt_sets("ocr")[0].prompts
    general = load_prompt_sets("general")[0].prompts
    assert len(ocr) >= 45 and len(general) >= 45
    assert all(quoted_text(p) for p in ocr)
    assert not any('"' in p for p in general)
    assert len(set(ocr)) == len(ocr) and len(set(general)) == len(general)


# --------------------------------------------------------------------------------- sampler


def _sets(*sizes, weights=None):
    weights = weights or [1.0] * len(sizes)
    return [PromptSet(f"s{i}", [f"s{i}-p{j}" for j in range(n)], weight=w)
            for i, (n, w) in enumerate(zip(sizes, weights))]


def test_sampler_is_seeded():
    sets = _sets(5, 7, 3)
    assert PromptSampler(sets, 3).sample(40) == PromptSampler(sets, 3).sample(40)
    assert PromptSampler(sets, 3).sample(40) != PromptSampler(sets, 4).sample(40)


@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.integers(1, 9), min_size=1, max_size=4), seed=st.integers(0, 2**31),
       rounds=st.integers(1, 5))
def test_equal_weights_take_turns_and_each_pass_uses_every_prompt_once(sizes, seed, rounds):
    sets = _sets(*sizes)
    drawn = PromptSampler(sets, seed).sample(rounds * len(sets) * max(sizes))
    indices = [i for _, i in drawn]
    assert indices == list(range(len(sets))) * (len(indices) // len(sets))
    for i, prompt_set in enumerate(sets):
        mine = [p for p, s in drawn if s == i]
        assert all(p in prompt_set.prompts for p in mine)
        for start in range(0, len(mine) - len(prompt_set.prompts) + 1, len(prompt_set.prompts)):
            assert sorted(mine[start:start + len(prompt_set.prompts)]) == sorted(prompt_set.prompts)


def test_weights_set_the_share_of_draws_in_every_window():
    sampler = PromptSampler(_sets(4, 4, 4, weights=[2.0, 1.0, 1.0]), seed=0)
    for _ in range(10):
        counts = Counter(i for _, i in sampler.sample(4))
        assert counts == Counter({0: 2, 1: 1, 2: 1})


@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.integers(1, 6), min_size=1, max_size=3),
       weights=st.lists(st.floats(0.1, 3.0), min_size=3, max_size=3),
       before=st.integers(0, 30), after=st.integers(1, 30), seed=st.integers(0, 10_000))
def test_resume_from_state_dict_is_bit_exact(sizes, weights, before, after, seed):
    sets = _sets(*sizes, weights=weights[:len(sizes)])
    reference = PromptSampler(sets, seed)
    reference.sample(before)
    state = reference.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)  # checkpoints store it with torch.save and load with weights_only
    buffer.seek(0)
    resumed = PromptSampler(sets, seed=999)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.sample(after) == reference.sample(after)


def test_resume_with_other_sets_is_refused():
    state = PromptSampler(_sets(3, 4), 0).state_dict()
    with pytest.raises(MarbleError, match="prompt sets changed"):
        PromptSampler(_sets(3, 5), 0).load_state_dict(state)


def test_prompt_set_validation():
    with pytest.raises(MarbleError, match="is empty"):
        PromptSet("x", [])
    with pytest.raises(MarbleError, match="weight"):
        PromptSet("x", ["a"], weight=0.0)
    with pytest.raises(MarbleError, match="no prompt sets"):
        PromptSampler([], 0)


# ----------------------------------------------------------------------------------- mask


@settings(max_examples=40, deadline=None)
@given(tags=st.lists(st.one_of(st.none(), st.lists(st.sampled_from("abcd"), unique=True)),
                     min_size=1, max_size=4),
       data=st.data())
def test_applicability_mask_matches_the_tags(tags, data):
    sets = [PromptSet(f"s{i}", ["p"], t) for i, t in enumerate(tags)]
    indices = data.draw(st.lists(st.integers(0, len(sets) - 1), max_size=12))
    names = ["a", "b", "c", "d"]
    mask = applicability_mask(torch.tensor(indices, dtype=torch.long), names, sets)
    assert mask.shape == (4, len(indices)) and mask.dtype == torch.bool
    for k, name in enumerate(names):
        for b, i in enumerate(indices):
            assert mask[k, b].item() == (tags[i] is None or name in tags[i])


def test_applicability_mask_of_the_default_mixture():
    sets = load_prompt_sets("default")
    mask = applicability_mask([0, 1, 2, 2], ["color", "shape", "word", "centering"], sets)
    assert mask.tolist() == [[True, False, False, False], [False, True, False, False],
                             [False, False, True, True], [True, True, True, True]]
    with pytest.raises(MarbleError, match="out of range"):
        applicability_mask([3], ["color"], sets)


def test_default_prompts_adapt_to_the_configured_rewards():
    from marble_kit.prompts import resolve_prompt_sets

    world = resolve_prompt_sets(["default"], ["color", "shape", "word", "sharpness"])
    assert [(s.name, s.rewards) for s in world] == [
        ("colors", ["color", "sharpness"]), ("shapes", ["shape", "sharpness"]), ("words", ["word", "sharpness"])]
    # a subset keeps its own tags; an untagged reward (brightness) judges every kept set
    subset = resolve_prompt_sets(["default"], ["color", "brightness"])
    assert [(s.name, s.rewards) for s in subset] == [
        ("colors", ["color", "brightness"]), ("shapes", ["brightness"]), ("words", ["brightness"])]
    # real-model rewards get the general prompts, plus the OCR prompts for `ocr`
    real = resolve_prompt_sets(["default"], ["hps", "pickscore", "ocr"])
    assert [s.name for s in real] == ["general", "ocr"] and all(s.rewards is None for s in real)
    assert [s.name for s in resolve_prompt_sets(["default"], ["hps"])] == ["general"]
    # anything but the plain `default` is taken as given
    assert [s.name for s in resolve_prompt_sets(["colors:color"], ["color", "shape"])] == ["colors"]


def test_a_served_reward_judges_the_sets_tagged_with_the_reward_it_serves():
    """`remote:NAME` judges the sets tagged NAME, as NAME does in process (and the other way
    round), for explicit tags, the default prompts and the world mixture alike."""
    from marble_kit.prompts import resolve_prompt_sets

    sets = [PromptSet("ocr", ["a sign that says \"open\""], ["ocr"]), PromptSet("colors", ["red"], ["color"]),
            PromptSet("served", ["blue"], ["remote:color"]), PromptSet("all", ["green"])]
    names = ["remote:ocr", "color", "remote:color", "ocr"]
    assert applicability_mask(torch.arange(4), names, sets).tolist() == [
        [True, False, False, True], [False, True, True, True], [False, True, True, True], [True, False, False, True]]
    real = resolve_prompt_sets(["default"], ["hps", "remote:ocr"])
    assert [s.name for s in real] == ["general", "ocr"]  # as for `ocr`
    world = resolve_prompt_sets(["default"], ["remote:color", "shape", "centering"])
    assert [(s.name, s.rewards) for s in world] == [  # remote:color is color, not a global reward
        ("colors", ["remote:color", "centering"]), ("shapes", ["shape", "centering"]), ("words", ["centering"])]
    tagged = resolve_prompt_sets(["ocr:ocr", "general"], ["remote:ocr", "hps"])
    assert applicability_mask(torch.tensor([0, 1]), ["remote:ocr", "hps"], tagged).tolist() == [
        [True, True], [False, True]]


def test_each_pass_over_a_set_draws_a_fresh_order():
    """Every prompt once per pass, and the next pass in a new seeded order (not a replay)."""
    sampler = PromptSampler(_sets(8), seed=5)
    first, second, third = ([p for p, _ in sampler.sample(8)] for _ in range(3))
    assert sorted(first) == sorted(second) == sorted(third)
    assert first != second and second != third
    assert [p for p, _ in PromptSampler(_sets(8), seed=5).sample(24)] == first + second + third


# ------------------------------------------------------------- every message, word for word
def _message(call) -> str:
    with pytest.raises(MarbleError) as info:
        call()
    assert "\n" not in str(info.value)
    return str(info.value)


def test_file_errors_word_for_word(tmp_path):
    fix = 'write one JSON object per line, e.g. {"prompt": "a red circle", "rewards": ["color"]}'
    bad = _write(tmp_path / "bad.jsonl", '{"prompt": "fine"}\n\n[1]\n')
    assert _message(lambda: load_prompt_file(bad)) == f"prompt file {bad} line 3 is a JSON list, not an object; {fix}"
    (tmp_path / "latin1.txt").write_bytes("café\n".encode("latin-1"))
    message = _message(lambda: load_prompt_file(tmp_path / "latin1.txt"))
    assert message.startswith(f"prompt file {tmp_path / 'latin1.txt'} is not UTF-8 text (")
    assert message.endswith("); save it as UTF-8")
    (tmp_path / "folder.txt").mkdir()
    assert _message(lambda: load_prompt_file(tmp_path / "folder.txt")).startswith(
        f"prompt file {tmp_path / 'folder.txt'} cannot be read: [Errno 21] Is a directory")
    assert _message(lambda: load_prompt_file(_write(tmp_path / "p.csv", "a\n"))) == (
        f"prompt file {tmp_path / 'p.csv'} has suffix '.csv'; use .txt (one prompt per line), "
        '.jsonl ({"prompt": ...} per line) or a .toml manifest')
    empty = _write(tmp_path / "empty.txt", "# only a comment\n")
    assert _message(lambda: load_prompt_file(empty)) == (
        f"prompt file {empty} has no prompts (blank lines and # comments are skipped); add one prompt per line")
    assert _message(lambda: PromptSet("x", [], source="f.txt")) == (
        "prompt set 'x' (f.txt) is empty; add at least one prompt")
    assert _message(lambda: PromptSet("x", ["a"], weight=-1.0)) == (
        "prompt set 'x' (x) has weight -1.0; use a weight > 0")
    assert _message(lambda: PromptSampler([], 0)) == "no prompt sets to sample from; pass --prompts FILE"
    assert _message(lambda: load_prompt_sets([])) == (
        "no prompt sets given; pass --prompts FILE or a built-in name (e.g. default)")


def test_a_jsonl_file_may_have_blank_lines_anywhere(tmp_path):
    path = _write(tmp_path / "gaps.jsonl", '\n{"prompt": "one"}\n\n  \n{"prompt": " two "}\n\n')
    (only,) = load_prompt_file(path)
    assert only.prompts == ["one", "two"] and only.source == str(path) and only.name == "gaps"


def test_manifest_errors_word_for_word(tmp_path):
    _write(tmp_path / "a.txt", "one\n")
    example = 'a [[prompt_set]] table with path = "colors.txt" and optional rewards = ["color"]'

    def manifest_error(body):
        path = _write(tmp_path / "m.toml", body)
        return _message(lambda: load_manifest(path)).replace(f"prompt manifest {path}", "M")

    assert manifest_error("prompt_set = []\n") == f"M lists no prompt sets; add {example}"
    assert manifest_error("") == f"M lists no prompt sets; add {example}"
    assert manifest_error('other = 1\n') == f"M: unknown key 'other'; list each set as {example}"
    second = '[[prompt_set]]\npath = "a.txt"\n\n[[prompt_set]]\n'
    assert manifest_error(second + 'path = "a.txt"\nsize = 3\n') == (
        "M, prompt_set #2: unknown key 'size'; valid keys: name, path, rewards, weight")
    assert manifest_error(second + 'path = "builtin:nope"\n') == (
        f"M, prompt_set #2: no built-in prompt set 'builtin:nope'; built-ins: {', '.join(builtin_prompt_sets())}")
    _write(tmp_path / "inner.toml", "")
    assert manifest_error(second + 'path = "inner.toml"\n') == (
        "M, prompt_set #2: 'inner.toml' is a manifest; entries must be .txt or .jsonl files")
    assert manifest_error(second + 'path = "gone.txt"\n') == (
        f"M, prompt_set #2: prompt file {tmp_path / 'gone.txt'} does not exist; fix the path "
        "(relative to the manifest's directory)")
    for weight in ('"heavy"', "true", "-1"):
        assert manifest_error(second + f'path = "a.txt"\nweight = {weight}\n').startswith(
            'M, prompt_set #2: "weight" must be a number > 0, got '), weight


def test_what_counts_as_a_path_and_what_as_a_builtin_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    builtins = ", ".join(builtin_prompt_sets())
    for spec in ("general.txt", "../prompts/general", "nowhere"):  # a suffix or a slash: a path
        assert _message(lambda spec=spec: load_prompt_sets(spec)) == (
            f"prompt set {spec!r} is neither a file nor a built-in set; pass a path to a "
            f".txt/.jsonl/.toml file or one of the built-ins: {builtins}")
    (tmp_path / "folder.txt").mkdir()
    assert _message(lambda: load_prompt_sets("folder.txt")) == (
        "prompt set 'folder.txt' is a directory; pass a .txt, .jsonl or .toml file")
    assert _message(lambda: load_prompt_sets("builtin:nope")) == (
        f"no built-in prompt set 'builtin:nope'; built-ins: {builtins}")
    from marble_kit.prompts import resolve_prompt_sets

    # a single spec may be given as a plain string
    assert [s.name for s in resolve_prompt_sets("default", ["hps"])] == ["general"]


def test_sampler_defaults_and_distinct_streams():
    sets = _sets(20)
    assert PromptSampler(sets).sample(45) == PromptSampler(sets, seed=0).sample(45)
    orders = {tuple(p for p, _ in PromptSampler(sets, seed=seed).sample(20)) for seed in range(200)}
    assert len(orders) == 200  # no two seeds share a stream


def test_mask_messages_and_shapes():
    sets = _sets(1, 1, 1)
    assert _message(lambda: applicability_mask([0, 3], ["a"], sets)) == "set index out of range 0..2: [0, 3]"
    empty = applicability_mask(torch.tensor([0, 2]), [], sets)
    assert empty.shape == (0, 2) and empty.dtype == torch.bool


def test_the_prompt_order_of_a_seed_is_fixed_across_versions():
    """A run resumed by a newer marble-kit must draw the prompts the old one would have: pass e over
    set s is ``torch.randperm`` seeded with (seed·1000003 + s·7919 + e·104729) mod (2⁶³ − 1)."""
    sets = _sets(5, 4)

    def expected_pass(seed, set_index, epoch):
        generator = torch.Generator().manual_seed((seed * 1_000_003 + set_index * 7_919 + epoch * 104_729)
                                                  % (2**63 - 1))
        return [sets[set_index].prompts[i] for i in torch.randperm(len(sets[set_index].prompts),
                                                                   generator=generator).tolist()]

    for seed in (3, 2**62 + 11):  # the second wraps around the modulus
        drawn = PromptSampler(sets, seed).sample(30)  # equal weights: the sets take turns, 15 draws each
        for set_index in range(2):
            expected = [p for epoch in range(4) for p in expected_pass(seed, set_index, epoch)]
            assert [p for p, s in drawn if s == set_index] == expected[:15]
