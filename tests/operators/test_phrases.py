import pyarrow as pa
import pytest

from operators.phrases import ExtractPhrases, PhraseConfig, clean_text, keep_phrase, merge_phrases, phrase_of_text
from vesl.core.text import clean_text_map


@pytest.fixture(scope="module")
def extractor():
    return ExtractPhrases()


def test_the_chunker_runs_tagger_only(extractor):
    assert "parser" not in extractor.nlp.pipe_names and "ner" not in extractor.nlp.pipe_names  # excluded at load
    assert {"tok2vec", "tagger", "attribute_ruler"} <= set(extractor.nlp.pipe_names)


def test_chunks_follow_dt_jj_nn_and_drop_generic_and_stopword_chunks(extractor):
    [(phrases, sources, _)] = extractor.extract(
        ["A woman in a long red dress walks a small brown dog on the beach, a stock photo with a blurry background."],
        [None])
    assert phrases == ["woman", "long red dress", "small brown dog", "beach"]
    assert set(sources) == {"caption"}


def test_phrases_come_from_both_texts_deduplicated_caption_first(extractor):
    [(phrases, sources, spans)] = extractor.extract(["a cat on a red sofa"], ["The cat. A RED SOFA and a green lamp"])
    assert phrases == ["cat", "red sofa", "green lamp"]
    assert sources == ["caption", "caption", "alt_text"]
    assert spans == [[(2, 5)], [(11, 19)], [(26, 36)]]  # a phrase of both texts keeps its caption spans only


def test_at_most_max_phrases_are_kept():
    many = " and ".join(f"a {w} box" for w in "red blue green pink gray black white brown gold teal".split())
    ex = ExtractPhrases(PhraseConfig(max_phrases=3))
    [(phrases, _, _)] = ex.extract([many], [None])
    assert len(phrases) == 3


def test_alt_text_is_cleaned_of_html_entities_and_control_characters():
    assert clean_text("<b>Big</b> dog &amp; cat\x00\x07\u202e", 100) == "Big dog & cat"
    assert clean_text(None, 10) == "" and len(clean_text("x" * 90_000, 2000)) == 2000


def test_keep_phrase_rules():
    cfg = PhraseConfig()
    assert keep_phrase(["red", "car"], [False, False], cfg)
    assert not keep_phrase(["background"], [False], cfg)
    assert not keep_phrase(["blurry", "background"], [False, False], cfg)
    assert keep_phrase(["picture", "frame"], [False, False], cfg)
    assert not keep_phrase(["something"], [True], cfg)
    assert not keep_phrase(["x"], [False], cfg)
    assert not keep_phrase(["a"] * 7, [False] * 7, cfg)


def test_merge_keeps_order_and_limit():
    assert merge_phrases([("caption", [("a", (0, 1)), ("b", (2, 3)), ("a", (4, 5))]),
                          ("alt_text", [("b", (0, 1)), ("c", (2, 3)), ("d", (4, 5))])], 3) == (
        ["a", "b", "c"], ["caption", "caption", "alt_text"], [[(0, 1), (4, 5)], [(2, 3)], [(2, 3)]])


def spans_hold(text, phrases, spans):
    """Every span slices TEXT to its phrase (by the stage's normalisation)."""
    return all(phrase_of_text(text[a:b]) == p for p, ss in zip(phrases, spans) for a, b in ss)


def test_spans_point_at_every_occurrence_in_the_stored_text_whatever_its_case(extractor):
    caption = "A Red Car beside a red car, and the RED CAR again; a dog"
    [(phrases, sources, spans)] = extractor.extract([caption], [None])
    assert phrases == ["red car", "dog"]
    assert [[caption[a:b] for a, b in s] for s in spans] == [["Red Car", "red car", "RED CAR"], ["dog"]]
    assert spans_hold(caption, phrases, spans)


def test_alt_text_spans_point_into_the_raw_alt_text_through_markup_and_entities(extractor):
    alt = "<p>Tom &amp; Jerry\tposter:  the  <b>Vintage</b>\n\nCinema   Poster</p> of İstanbul Şehir Hatları"
    [(phrases, sources, spans)] = extractor.extract(["a cat"], [alt])
    assert set(sources[1:]) == {"alt_text"} and phrases[0] == "cat"
    assert spans_hold(alt, phrases[1:], spans[1:]) and spans_hold("a cat", phrases[:1], spans[:1])
    assert "vintage cinema poster" in phrases  # the span runs over the tag and the line breaks
    assert alt[slice(*spans[phrases.index("vintage cinema poster")][0])].startswith("Vintage</b>")


def test_clean_text_map_agrees_with_clean_text_and_maps_every_character():
    import random

    rng = random.Random(0)
    alphabet = list("ab <>&;#x1\n\t\x00İΣ") + ["&amp;", "<b>", "&#65;", "<script>", "</script>", "&notit;"]
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        limit = rng.randint(1, 40)
        cleaned, where = clean_text_map(text, limit)
        assert cleaned == clean_text(text, limit)
        where = where or [(i, i + 1) for i in range(len(cleaned))]
        assert len(where) == len(cleaned) and all(0 <= a < b <= len(text) for a, b in where)
        for i, c in enumerate(cleaned):
            assert c == " " or c in clean_text(text[where[i][0]:where[i][1]], 10)


def test_stage_adds_parallel_columns_and_skips_rejected_rows(extractor):
    table = pa.table({"image_id": ["a", "b"], "caption": ["a yellow bus", None], "alt_text": [None, "a dog"],
                      "reject_stage": [None, "decode"], "reject_reason": [None, "not_found"],
                      "reject_message": [None, ""]})
    out = extractor(table)
    assert out.column("phrases").to_pylist() == [["yellow bus"], None]
    assert out.column("phrase_sources").to_pylist() == [["caption"], None]
    assert out.column("phrase_spans").to_pylist() == [[[[2, 12]]], None]
    assert out.column("reject_reason").to_pylist() == [None, "not_found"]


def test_empty_and_hostile_texts_give_no_phrases_not_errors(extractor):
    found = extractor.extract(["", "🙂🙂 مرحبا", "<script>alert(1)</script>"], [None, "", "\x00\x01"])
    assert len(found) == 3
    assert found[0] == ([], [], []) and found[1] == ([], [], [])
    assert all(ch.isalnum() or ch in " '&-" for p, _, _ in found for phrase in p for ch in phrase)
    assert all(len(p) == len(s) == len(sp) for p, s, sp in found)
