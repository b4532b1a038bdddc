import pyarrow as pa
import pytest

from operators.phrases import ExtractPhrases, PhraseConfig, clean_text, keep_phrase, merge_phrases


@pytest.fixture(scope="module")
def extractor():
    return ExtractPhrases()


def test_the_chunker_runs_tagger_only(extractor):
    assert "parser" not in extractor.nlp.pipe_names and "ner" not in extractor.nlp.pipe_names  # excluded at load
    assert {"tok2vec", "tagger", "attribute_ruler"} <= set(extractor.nlp.pipe_names)


def test_chunks_follow_dt_jj_nn_and_drop_generic_and_stopword_chunks(extractor):
    [(phrases, sources)] = extractor.extract(
        ["A woman in a long red dress walks a small brown dog on the beach, a stock photo with a blurry background."],
        [None])
    assert phrases == ["woman", "long red dress", "small brown dog", "beach"]
    assert set(sources) == {"caption"}


def test_phrases_come_from_both_texts_deduplicated_caption_first(extractor):
    [(phrases, sources)] = extractor.extract(["a cat on a red sofa"], ["The cat. A RED SOFA and a green lamp"])
    assert phrases == ["cat", "red sofa", "green lamp"]
    assert sources == ["caption", "caption", "alt_text"]


def test_at_most_max_phrases_are_kept():
    many = " and ".join(f"a {w} box" for w in "red blue green pink gray black white brown gold teal".split())
    ex = ExtractPhrases(PhraseConfig(max_phrases=3))
    [(phrases, _)] = ex.extract([many], [None])
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
    assert merge_phrases([("caption", ["a", "b"]), ("alt_text", ["b", "c", "d"])], 3) == (
        ["a", "b", "c"], ["caption", "caption", "alt_text"])


def test_stage_adds_parallel_columns_and_skips_rejected_rows(extractor):
    table = pa.table({"image_id": ["a", "b"], "caption": ["a yellow bus", None], "alt_text": [None, "a dog"],
                      "reject_stage": [None, "decode"], "reject_reason": [None, "not_found"],
                      "reject_message": [None, ""]})
    out = extractor(table)
    assert out.column("phrases").to_pylist() == [["yellow bus"], None]
    assert out.column("phrase_sources").to_pylist() == [["caption"], None]
    assert out.column("reject_reason").to_pylist() == [None, "not_found"]


def test_empty_and_hostile_texts_give_no_phrases_not_errors(extractor):
    found = extractor.extract(["", "🙂🙂 مرحبا", "<script>alert(1)</script>"], [None, "", "\x00\x01"])
    assert len(found) == 3
    assert found[0] == ([], []) and found[1] == ([], [])
    assert all(ch.isalnum() or ch in " '&-" for p, _ in found for phrase in p for ch in phrase)
    assert all(len(p) == len(s) for p, s in found)
