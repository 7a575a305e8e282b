"""The E2E NLG Challenge's five corpus metrics, as its official scorer computes them.

The official scorer (tuetschek/e2e-metrics, `measure_scores.py`) scores one output per distinct
MR against all of that MR's references: BLEU and NIST from mteval-v13a (Perl; lowercased, 13a
tokenization, "closest" reference length, NIST's smoothing), METEOR 1.5 (`-l en -norm`),
ROUGE-L and CIDEr(-D) from the MS-COCO caption evaluation code on text tokenized by Stanford's
PTBTokenizer (lowercased, punctuation dropped). Here BLEU comes from sacrebleu with mteval's
settings, METEOR/ROUGE-L/CIDEr from pycocoevalcap 1.2 (the same code and jars the official
scorer bundles; they need Java), NIST is computed here (see `nist`). All on the official scale
(BLEU 0.6616, not 66.16); tests/test_e2e_metrics.py checks every number against the official
scorer's output on fixture files. The reference is the scorer's default Perl mteval: its `-p`
Python port gives other BLEU/NIST numbers (0.5822/5.53 vs 0.5777/6.35 on the fixture).
"""

from __future__ import annotations

import collections
import math
import shutil
from collections.abc import Sequence

from vera_jax.extras import require

METRIC_NAMES = ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr")
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


class JavaNotFoundError(RuntimeError):
    """METEOR, ROUGE-L and CIDEr need a Java runtime (pycocoevalcap's jars) and none is on PATH."""


def _check(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[list[str], list[list[str]]]:
    """Whitespace-normalised copies; the official scorer reads one line per output, so inner
    newlines and runs of spaces never reach its metrics either."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} MRs (references); "
                         "give exactly one prediction per distinct MR")
    refs = []
    for i, group in enumerate(references):
        group = [" ".join(r.split()) for r in group]
        if not group or not all(group):
            raise ValueError(f"references[{i}]: needs at least one non-empty reference, got {group!r}")
        refs.append(group)
    return [" ".join(p.split()) for p in predictions], refs


def _mteval_tokens(text: str) -> list[str]:
    """mteval-v13a's default tokenization: ASCII-only lowercasing (Perl's tr/A-Z/a-z/; str.lower
    would also fold É) then the 13a rules, which sacrebleu's tokenizer reproduces."""
    tokenizer = require("sacrebleu.tokenizers.tokenizer_13a", "nlg").Tokenizer13a
    return tokenizer()(text.translate(_ASCII_LOWER)).split()


def bleu(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU-4 as mteval-v13a computes it: sacrebleu with 13a tokenization on ASCII-lowercased
    text, mteval's smoothing ("exp": 1/2^k for an order with no match), closest reference length
    (ties to the shorter); MRs with fewer references are padded with None, which sacrebleu skips
    as mteval skips the empty padding segments the official scorer writes."""
    sacrebleu = require("sacrebleu", "nlg")
    predictions, references = _check(predictions, references)
    width = max(len(r) for r in references)
    streams = [[group[k].translate(_ASCII_LOWER) if k < len(group) else None for group in references]
               for k in range(width)]
    metric = sacrebleu.BLEU(tokenize="13a", lowercase=False, smooth_method="exp", force=True)
    return metric.corpus_score([p.translate(_ASCII_LOWER) for p in predictions], streams).score / 100.0


def nist(predictions: Sequence[str], references: Sequence[Sequence[str]], max_order: int = 5) -> float:
    """Corpus NIST-5 exactly as mteval-v13a computes it.

    Written here because no maintained library reproduces mteval's number: sacrebleu has no
    NIST, and NLTK's `corpus_nist` differs in tokenization, in where n-gram information is
    counted and in the length penalty's reference length. mteval: info(w1..wn) =
    log2(count(w1..wn-1) / count(w1..wn)) (unigrams: total reference words / count), counted over
    every reference of every MR; each hypothesis n-gram scores its info times its count clipped
    to the largest count in any one of the MR's references; the corpus score sums, per order,
    matched info / hypothesis n-grams, times exp(-beta log^2(ratio)) when the hypothesis corpus
    is shorter than the average reference corpus (ratio = hypothesis words / (reference words /
    mean non-empty references per MR); beta makes ratio 1.5 score 0.5).
    """
    predictions, references = _check(predictions, references)

    def ngrams(words: list[str]) -> collections.Counter:
        return collections.Counter(tuple(words[i:i + n]) for n in range(1, max_order + 1)
                                   for i in range(len(words) - n + 1))

    ref_tokens = [[_mteval_tokens(r) for r in group] for group in references]
    counts: collections.Counter = collections.Counter()
    for group in ref_tokens:
        for words in group:
            counts.update(ngrams(words))
    total_words = sum(len(words) for group in ref_tokens for words in group)

    def info(gram: tuple) -> float:
        context = counts[gram[:-1]] if len(gram) > 1 else total_words
        return -math.log(counts[gram] / context) / math.log(2)

    matched_info = [0.0] * (max_order + 1)
    hyp_ngrams = [0] * (max_order + 1)
    hyp_words = ref_words = n_refs = 0
    for prediction, group in zip(predictions, ref_tokens):
        words = _mteval_tokens(prediction)
        hyp_words += len(words)
        for n in range(1, max_order + 1):
            hyp_ngrams[n] += max(len(words) - n + 1, 0)
        best: dict = {}
        for ref in group:
            for gram, c in ngrams(ref).items():
                best[gram] = max(best.get(gram, 0), c)
        for gram, c in ngrams(words).items():
            if gram in best:
                matched_info[len(gram)] += info(gram) * min(c, best[gram])
        ref_words += sum(len(ref) for ref in group)
        n_refs += len(group)
    score = sum(matched_info[n] / max(hyp_ngrams[n], 1) for n in range(1, max_order + 1))
    ratio = hyp_words / (ref_words / (n_refs / len(references)))
    if ratio >= 1:
        return score
    if ratio <= 0:
        return 0.0
    beta = -math.log(0.5) / math.log(1.5) ** 2
    return score * math.exp(-beta * math.log(ratio) ** 2)


def require_java() -> str:
    """The `java` executable, or JavaNotFoundError saying what to install."""
    java = shutil.which("java")
    if java is None:
        raise JavaNotFoundError(
            "METEOR, ROUGE-L and CIDEr run pycocoevalcap's Java tools (Stanford PTBTokenizer, METEOR 1.5) "
            "and no `java` is on PATH; install a Java runtime, e.g. Debian/Ubuntu: "
            "`apt-get install default-jre-headless`")
    return java


def coco_metrics(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """METEOR, ROUGE_L and CIDEr through pycocoevalcap 1.2 on PTB-tokenized text, as the official
    scorer's bundled copy of the same code (and byte-identical jars) computes them. The tokenizer
    writes a temporary file beside its jar, so pycocoevalcap's install directory must be writable."""
    predictions, references = _check(predictions, references)
    require("pycocoevalcap", "nlg")
    require_java()
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    keys = [f"inst-{i}" for i in range(len(predictions))]
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": r} for r in group] for k, group in zip(keys, references)})
    res = tokenizer.tokenize({k: [{"caption": p}] for k, p in zip(keys, predictions)})
    if len(gts) != len(keys) or len(res) != len(keys):
        raise RuntimeError(f"PTBTokenizer returned {len(res)} predictions and {len(gts)} reference groups "
                           f"for {len(keys)} MRs")
    out = {}
    meteor = Meteor()
    try:
        out["METEOR"] = float(meteor.compute_score(gts, res)[0])
    except ValueError as e:  # the jar died and printed no score
        raise RuntimeError("METEOR 1.5 (java -Xmx2G -jar meteor-1.5.jar) returned no score; check that "
                           "`java -version` works and 2 GB of heap can be reserved") from e
    finally:
        del meteor
    out["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    return out


def score_e2e(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """All five E2E metrics for one prediction per distinct MR (`references[i]`: that MR's
    references), keyed BLEU, NIST, METEOR, ROUGE_L, CIDEr."""
    predictions, references = _check(predictions, references)
    require_java()
    scores = {"BLEU": bleu(predictions, references), "NIST": nist(predictions, references)}
    scores.update(coco_metrics(predictions, references))
    return {name: scores[name] for name in METRIC_NAMES}
