"""Evaluation metrics: VQA accuracy, captioning (CIDEr-D, BLEU), FID, CLIPScore, R-precision
and mask IoU.

Pure functions over strings and arrays; model inference happens elsewhere.

- VQA: answer normalization and the leave-one-out accuracy of the official VQA evaluation
  script (``vqaEval.py`` of the VQA API, github.com/GT-Vision-Lab/VQA, Antol et al. 2015;
  Goyal et al. 2017 for VQA v2). The punctuation, number-word, article and contraction rules
  are reproduced from that script, quirks included.
- Captioning: CIDEr-D (Vedantam, Zitnick & Parikh 2015, "CIDEr: Consensus-based Image
  Description Evaluation") and BLEU (Papineni et al. 2002, "BLEU: a Method for Automatic
  Evaluation of Machine Translation"), both computed by ``pycocoevalcap`` (the MS-COCO caption
  evaluation code). Its PTBTokenizer needs Java, so text is normalized by :func:`caption_tokens`
  instead; scores are therefore close to, but not bit-identical with, the COCO server's.
- FID: the Fréchet distance between Gaussians fitted to two feature sets (Heusel et al. 2017,
  "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium"),
  following the reference ``pytorch-fid`` computation.
- CLIPScore: Hessel et al. 2021, "CLIPScore: A Reference-free Evaluation Metric for Image
  Captioning", ``w * max(cos(text, image), 0)`` with ``w = 2.5``.
- R-precision: Xu et al. 2018 ("AttnGAN"), does a generated image retrieve its own prompt
  among 1 + 99 random other captions (here: among ``min(100, distinct captions)``).
- Masks: intersection-over-union of boolean masks, and binarization of rendered masks; both
  live in :mod:`cm3leon.data.masks` (the tokenizer layer scores masks too) and are re-exported
  here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from scipy import linalg

# Re-exported (``as`` marks it for ruff): cm3leon.evaluation.tasks imports them from here.
from cm3leon.data.masks import binarize_mask as binarize_mask
from cm3leon.data.masks import mask_iou as mask_iou

# --------------------------------------------------------------------------------------------
# VQA (official vqaEval.py)
# --------------------------------------------------------------------------------------------

# The contraction map of the official script, verbatim. Keys with capitals ("Im", "Ive", ...)
# can never match (the script lowercases first); they are kept to stay identical to it.
_VQA_CONTRACTIONS: dict[str, str] = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hed've": "he'd've",
    "he'dve": "he'd've",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "Id've": "I'd've",
    "I'dve": "I'd've",
    "Im": "I'm",
    "Ive": "I've",
    "isnt": "isn't",
    "itd": "it'd",
    "itd've": "it'd've",
    "it'dve": "it'd've",
    "itll": "it'll",
    "let's": "let's",
    "maam": "ma'am",
    "mightnt": "mightn't",
    "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "oclock": "o'clock",
    "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at",
    "shant": "shan't",
    "shed've": "she'd've",
    "she'dve": "she'd've",
    "she's": "she's",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll",
    "somebodys": "somebody's",
    "someoned": "someone'd",
    "someoned've": "someone'd've",
    "someone'dve": "someone'd've",
    "someonell": "someone'll",
    "someones": "someone's",
    "somethingd": "something'd",
    "somethingd've": "something'd've",
    "something'dve": "something'd've",
    "somethingll": "something'll",
    "thats": "that's",
    "thered": "there'd",
    "thered've": "there'd've",
    "there'dve": "there'd've",
    "therere": "there're",
    "theres": "there's",
    "theyd": "they'd",
    "theyd've": "they'd've",
    "they'dve": "they'd've",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't",
    "wed've": "we'd've",
    "we'dve": "we'd've",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "whod've": "who'd've",
    "who'dve": "who'd've",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've",
    "yall": "y'all",
    "yall'll": "y'all'll",
    "y'allll": "y'all'll",
    "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've",
    "youd": "you'd",
    "youd've": "you'd've",
    "you'dve": "you'd've",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}
_VQA_NUMBER_WORDS: dict[str, str] = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_VQA_ARTICLES = frozenset({"a", "an", "the"})
# Verbatim from the script. "(?!<=\d)" is a (mistyped) negative *lookahead*, so in effect every
# "." not followed by a digit is removed: "3.5" keeps its point, "yes." loses it.
_VQA_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_VQA_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
# The punctuation list of the final (VQA v2) script; note "'" and ":" are not in it.
_VQA_PUNCT = (
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
)


def _vqa_process_punctuation(text: str) -> str:
    """Apply ``VQAEval.processPunctuation``: drop or space out punctuation, strip periods."""
    out = text
    has_digit_comma = _VQA_COMMA_STRIP.search(text) is not None
    for p in _VQA_PUNCT:
        # The conditions look at the *input* text, as in the official script.
        if (p + " " in text or " " + p in text) or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # The script passes re.UNICODE as sub()'s positional *count* (32 replacements at most);
    # that cap never matters for answers, so all matches are replaced here.
    return _VQA_PERIOD_STRIP.sub("", out)


def _vqa_process_digit_article(text: str) -> str:
    """Apply ``VQAEval.processDigitArticle``: number words to digits, no articles, contractions."""
    words = [_VQA_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _VQA_ARTICLES]
    return " ".join(_VQA_CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(answer: str) -> str:
    """Normalize an answer exactly as the official VQA evaluation script does.

    Lowercase; newlines and tabs become spaces; strip; punctuation per ``processPunctuation``
    (each mark of the official list is deleted when it touches a space anywhere in the answer
    or when the answer has a digit-comma-digit, and replaced by a space otherwise; then every
    period not followed by a digit is deleted); then ``processDigitArticle`` (number words
    ``none``/``zero``..``ten`` become digits, articles ``a``/``an``/``the`` are dropped, the
    official contraction map is applied per word) and whitespace is collapsed.

    Examples: ``"Two" -> "2"``, ``"the red car." -> "red car"``, ``"the red one." -> "red 1"``,
    ``"Yes!" -> "yes"``, ``"dont" -> "don't"``.
    """
    text = answer.lower().replace("\n", " ").replace("\t", " ").strip()
    return _vqa_process_digit_article(_vqa_process_punctuation(text))


def vqa_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """Official VQA accuracy of one predicted answer against the human answers, in [0, 1].

    All answers are normalized with :func:`normalize_vqa_answer`. For each of the ``n``
    leave-one-out subsets of the human answers the accuracy is
    ``min(1, #matches of the prediction in the subset / 3)``, and the result is the mean over
    the subsets. With VQA's 10 answers this gives 0.3, 0.6, 0.9 and 1.0 for 1, 2, 3 and 4+
    matching annotators. Any ``n >= 2`` is averaged the same way; with a single answer there
    is no leave-one-out subset and ``min(1, matches / 3)`` over the full list is used (so at
    most 1/3).

    A dataset with a single exact answer (no annotator pool) should pass that answer repeated
    10 times, i.e. all annotators agree: that gives 1.0 for a match and 0.0 otherwise.
    """
    if isinstance(human_answers, str):
        raise TypeError("human_answers must be a sequence of strings, not a single string")
    if len(human_answers) == 0:
        raise ValueError("vqa_accuracy needs at least one human answer")
    pred = normalize_vqa_answer(prediction)
    matches = [normalize_vqa_answer(a) == pred for a in human_answers]
    total = sum(matches)
    if len(matches) == 1:
        return min(1.0, total / 3.0)
    # Leaving out answer i keeps total - matches[i] matching answers among the others.
    per_subset = [min(1.0, (total - int(m)) / 3.0) for m in matches]
    return float(sum(per_subset) / len(per_subset))


# --------------------------------------------------------------------------------------------
# Captioning (pycocoevalcap CIDEr-D and BLEU)
# --------------------------------------------------------------------------------------------


def caption_tokens(text: str) -> str:
    """Tokenize a caption without Java: lowercase, drop punctuation, collapse whitespace.

    Stand-in for pycocoevalcap's PTBTokenizer. Every character that is not a letter, a digit
    or whitespace is deleted (``"don't" -> "dont"``, ``"well-known" -> "wellknown"``); the
    result is the tokens joined by single spaces.
    """
    kept = "".join(ch for ch in text.lower() if ch.isalnum() or ch.isspace())
    return " ".join(kept.split())


def caption_scores(
    predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]
) -> dict[str, float]:
    """Corpus-level CIDEr-D, BLEU-4 and BLEU-1 of predicted captions against references.

    ``predictions`` maps an image id to one caption; ``references`` maps each id to its
    reference captions. Only the ids in ``predictions`` are scored (extra reference ids are
    ignored, and do not enter CIDEr's document frequencies). All text goes through
    :func:`caption_tokens` first.

    CIDEr is ``pycocoevalcap.cider.Cider``, which is the CIDEr-D variant of Vedantam et al.
    (what the COCO server reports as "CIDEr"): TF-IDF n-gram vectors for n = 1..4, hypothesis
    weights clipped to the reference's (``min(hyp, ref) * ref``), a Gaussian length penalty
    with sigma = 6, averaged over n and over references, and scaled by 10. Its IDF comes from
    the references of the scored set, so it is only meaningful over a corpus (a single image
    scores 0). BLEU is ``pycocoevalcap.bleu.Bleu(4)``: corpus-level clipped n-gram precisions
    with the "closest reference length" brevity penalty.

    Returns ``{"cider_d": ..., "bleu_4": ..., "bleu_1": ...}``. Raises ``ValueError`` when
    there are no predictions or a prediction id has no (or empty) references.
    """
    if not predictions:
        raise ValueError("caption_scores needs at least one prediction")
    gts: dict[str, list[str]] = {}
    res: dict[str, list[str]] = {}
    for image_id, caption in predictions.items():
        refs = references.get(image_id)
        if refs is None:
            raise ValueError(f"prediction id {image_id!r} has no references")
        if isinstance(refs, str):
            raise TypeError(f"references for id {image_id!r} must be a sequence of strings")
        if len(refs) == 0:
            raise ValueError(f"prediction id {image_id!r} has an empty reference list")
        gts[image_id] = [caption_tokens(r) for r in refs]
        res[image_id] = [caption_tokens(caption)]
    cider, _ = Cider(n=4, sigma=6.0).compute_score(gts, res)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return {"cider_d": float(cider), "bleu_4": float(bleu[3]), "bleu_1": float(bleu[0])}


# --------------------------------------------------------------------------------------------
# Image generation (FID, CLIPScore)
# --------------------------------------------------------------------------------------------


def _gaussian_stats(features: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of an (N, D) feature array, in float64."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (N, D) array, got shape {x.shape}")
    if x.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 rows to fit a covariance, got {x.shape[0]}")
    return x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False))


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray, eps: float = 1e-6) -> float:
    """Fréchet distance (FID formula) between Gaussians fitted to two (N, D) feature sets.

    ``|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` in float64, as in Heusel et al. and
    pytorch-fid: if ``sqrtm`` of the covariance product is not finite, ``eps * I`` is added to
    both covariances and it is retried; a negligible imaginary part (numerical noise) is
    dropped, a large one raises ``ValueError``. Raises ``ValueError`` for fewer than 2 rows or
    differing feature dimensions.
    """
    mu_a, sigma_a = _gaussian_stats(features_a, "features_a")
    mu_b, sigma_b = _gaussian_stats(features_b, "features_b")
    if mu_a.shape != mu_b.shape:
        raise ValueError(f"feature dimensions differ: {mu_a.shape[0]} vs {mu_b.shape[0]}")
    diff = mu_a - mu_b
    covmean = linalg.sqrtm(sigma_a @ sigma_b)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma_a.shape[0]) * eps
        covmean = linalg.sqrtm((sigma_a + offset) @ (sigma_b + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            max_imag = float(np.max(np.abs(covmean.imag)))
            raise ValueError(f"sqrtm of the covariance product has imaginary part {max_imag}")
        covmean = covmean.real
    value = diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2.0 * np.trace(covmean)
    return float(value)


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of ``a`` with the same row of ``b``, shape (N,): both
    (N, D) arrays are L2-normalized in float64, then multiplied row by row."""
    a, b = (np.asarray(x, dtype=np.float64) for x in (a, b))
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"need two (N, D) arrays of one shape, got {a.shape} and {b.shape}")
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(1)


def clip_scores(
    text_embeddings: np.ndarray, image_embeddings: np.ndarray, weight: float = 2.5
) -> np.ndarray:
    """Per-pair CLIPScore (Hessel et al. 2021), ``weight * max(cos(t_i, v_i), 0)``, shape (N,).

    Inputs are (N, D) arrays whose row ``i`` pair up; rows are L2-normalized here. Raises
    ``ValueError`` for mismatched shapes, no rows, or an all-zero row.
    """
    t = np.asarray(text_embeddings, dtype=np.float64)
    v = np.asarray(image_embeddings, dtype=np.float64)
    if t.ndim != 2 or t.shape != v.shape:
        raise ValueError(f"need two (N, D) arrays of one shape, got {t.shape} and {v.shape}")
    if t.shape[0] == 0:
        raise ValueError("clip_score needs at least one pair")
    t_norm = np.linalg.norm(t, axis=1)
    v_norm = np.linalg.norm(v, axis=1)
    if (t_norm == 0).any() or (v_norm == 0).any():
        raise ValueError("embeddings contain an all-zero row; cosine similarity is undefined")
    cos = np.sum(t * v, axis=1) / (t_norm * v_norm)
    return weight * np.maximum(cos, 0.0)


def clip_score(
    text_embeddings: np.ndarray, image_embeddings: np.ndarray, weight: float = 2.5
) -> float:
    """CLIPScore: the mean of :func:`clip_scores` over the pairs."""
    return float(np.mean(clip_scores(text_embeddings, image_embeddings, weight)))


def r_precision_hits(
    text_embeddings: np.ndarray,
    image_embeddings: np.ndarray,
    keys: Sequence[str],
    candidates: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, int]:
    """R-precision with R = 1 (Xu et al. 2018, AttnGAN §5): for each image ``i``, is its own
    text ``i`` the most similar among ``candidates`` texts: itself plus ``candidates - 1``
    drawn without replacement from the *other* texts (those whose ``keys[j] != keys[i]``, so
    a duplicate caption is never a distractor)?

    Inputs are (N, D) arrays paired by row (cosine similarity; rows are normalized here).
    ``candidates`` is capped by the smallest pool of distinct texts. A tie with a distractor
    counts as a miss. Returns the per-image hits (bool, N) and the number of candidates used;
    chance level is ``1 / candidates``.
    """
    t = np.asarray(text_embeddings, dtype=np.float64)
    v = np.asarray(image_embeddings, dtype=np.float64)
    if t.ndim != 2 or t.shape != v.shape or len(keys) != t.shape[0]:
        raise ValueError(
            f"need two (N, D) arrays of one shape and N keys, got {t.shape}, {v.shape}, "
            f"{len(keys)} keys"
        )
    if candidates < 2:
        raise ValueError(f"R-precision needs at least 2 candidates, got {candidates}")
    t = t / np.linalg.norm(t, axis=1, keepdims=True)
    v = v / np.linalg.norm(v, axis=1, keepdims=True)
    keys = list(keys)
    pools = [[j for j, k in enumerate(keys) if k != key] for key in keys]
    used = min(candidates, 1 + min((len(p) for p in pools), default=0))
    if used < 2:
        raise ValueError("R-precision needs at least two distinct texts")
    hits = np.zeros(len(keys), dtype=bool)
    for i, pool in enumerate(pools):
        others = rng.choice(pool, used - 1, replace=False)
        own = float(v[i] @ t[i])
        hits[i] = bool(own > float(np.max(t[others] @ v[i])))
    return hits, used


# --------------------------------------------------------------------------------------------
# Intervals
# --------------------------------------------------------------------------------------------
def wilson_interval(successes: float, trials: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval of a proportion (Wilson 1927; Brown, Cai & DasGupta 2001):
    ``(low, high)`` at 95% by default. Unlike ``p +- z sqrt(p(1-p)/n)`` it stays inside
    ``[0, 1]`` and keeps its width at ``p = 0`` or ``1``. ``successes`` may be fractional (a
    mean of per-example scores in ``[0, 1]`` times ``trials``); ``trials = 0`` gives ``(0, 1)``.
    """
    if trials < 0 or not 0 <= successes <= trials:
        raise ValueError(
            f"wilson_interval needs 0 <= successes <= trials, got {successes}/{trials}"
        )
    if trials == 0:
        return 0.0, 1.0
    p = successes / trials
    denominator = 1 + z * z / trials
    center = (p + z * z / (2 * trials)) / denominator
    half = z * np.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return float(max(center - half, 0.0)), float(min(center + half, 1.0))


def paired_difference_interval(
    first: Sequence[bool], second: Sequence[bool], z: float = 1.959964
) -> tuple[float, float, float]:
    """``(difference, low, high)``: ``mean(first) - mean(second)`` of two 0/1 outcomes on the
    *same* examples (e.g. one prompt set decoded two ways) and its 95% interval, by Newcombe's
    hybrid score method for paired proportions (Newcombe 1998, Stat. Med. 17:2635, method 10):
    the two Wilson intervals combined with the outcomes' phi correlation. Pairing removes the
    prompt-to-prompt variance both settings share, so a difference can be clear of zero while
    the two settings' own intervals overlap; with phi = 0 it is the unpaired hybrid interval.
    """
    x = np.asarray(first, dtype=bool)
    y = np.asarray(second, dtype=bool)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"paired outcomes need two equal 1-d shapes, got {x.shape}, {y.shape}")
    n = len(x)
    if n == 0:
        return 0.0, -1.0, 1.0
    a, b = int(np.sum(x & y)), int(np.sum(x & ~y))
    c, d = int(np.sum(~x & y)), int(np.sum(~x & ~y))
    p1, p2 = (a + b) / n, (a + c) / n
    l1, u1 = wilson_interval(a + b, n, z)
    l2, u2 = wilson_interval(a + c, n, z)
    denominator = float(a + b) * (c + d) * (a + c) * (b + d)
    phi = (a * d - b * c) / np.sqrt(denominator) if denominator > 0 else 0.0
    below = (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2
    above = (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2
    difference = p1 - p2
    low = max(difference - float(np.sqrt(max(below, 0.0))), -1.0)
    high = min(difference + float(np.sqrt(max(above, 0.0))), 1.0)
    return float(difference), low, high


def mean_interval(
    values: Sequence[float],
    z: float = 1.959964,
    bounds: tuple[float, float] | None = (0.0, 1.0),
) -> tuple[float, float]:
    """Normal-approximation 95% interval of a mean, ``mean +- z s / sqrt(n)``, clipped to
    ``bounds`` (default ``[0, 1]``, e.g. mask IoUs; ``None``: any scale, e.g. CLIPScore).
    Without values: ``bounds`` (``(0, 1)``); one value: half-width 1 on ``[0, 1]``, else 0."""
    if len(values) == 0:
        return bounds if bounds is not None else (float("nan"), float("nan"))
    array = np.asarray(values, dtype=np.float64)
    mean = float(array.mean())
    if bounds is None:
        half = z * float(array.std(ddof=1)) / np.sqrt(len(array)) if len(array) > 1 else 0.0
        return mean - half, mean + half
    half = z * float(array.std(ddof=1)) / np.sqrt(len(array)) if len(array) > 1 else 1.0
    return max(mean - half, bounds[0]), min(mean + half, bounds[1])
