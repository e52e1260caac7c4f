"""BLEU-1..4, METEOR, ROUGE-L and CIDEr of captions against their references, computed by the COCO caption
evaluation code (pycocoevalcap), for evaluate.py and the benchmarks that score models. SPICE is not run: its
scorer downloads Stanford CoreNLP when it starts. METEOR and the PTB tokenizer need Java; without it METEOR is
skipped and captions are tokenized in Python instead.
"""
import shutil

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

from vocabulary import plain_words


def tokenize_for_scoring(captions):
    """{id: [caption, ...]} -> {id: [tokenized caption, ...]}: COCO's PTB tokenizer when Java is here."""
    if shutil.which('java'):
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
        return PTBTokenizer().tokenize({k: [{'caption': c} for c in v] for k, v in captions.items()})
    return {k: [plain_words(c) for c in v] for k, v in captions.items()}


def score_captions(references, results):
    """references {image_id: [captions]}, results {image_id: caption} -> ({metric: score}, [notes])."""
    gts = tokenize_for_scoring(references)
    res = tokenize_for_scoring({k: [v] for k, v in results.items()})
    scorers = [(Bleu(4), ['BLEU-1', 'BLEU-2', 'BLEU-3', 'BLEU-4']), (Rouge(), ['ROUGE-L']), (Cider(), ['CIDEr'])]
    notes = ['SPICE not computed: its scorer downloads Stanford CoreNLP at start-up']
    if shutil.which('java'):
        from pycocoevalcap.meteor.meteor import Meteor
        scorers.insert(1, (Meteor(), ['METEOR']))
    else:
        notes.append('METEOR skipped: it needs Java, which is not installed')
    scores = {}
    for scorer, names in scorers:
        value, _ = scorer.compute_score(gts, res)
        scores.update(zip(names, value if isinstance(value, list) else [value]))
    return scores, notes
