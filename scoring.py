"""BLEU-1..4, METEOR, ROUGE-L and CIDEr of captions against their references, computed by the COCO caption
evaluation code (pycocoevalcap), for evaluate.py and the benchmarks that score models. SPICE is not run: its
scorer downloads Stanford CoreNLP when it starts. METEOR and the PTB tokenizer need Java; without it METEOR is
skipped and captions are tokenized in Python instead.
"""
import contextlib
import shutil

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

from vocabulary import plain_words


def tokenize_for_scoring(references, results):
    """references {id: [captions]}, results {id: caption} -> both as {id: [tokenized captions]}. With Java, COCO's
    PTB tokenizer does both in one run, their keys tagged apart: each run starts a JVM, which takes longer than
    the tokenizing."""
    captions = {**{('ref', k): v for k, v in references.items()}, **{('res', k): [v] for k, v in results.items()}}
    if shutil.which('java'):
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
        tokenized = PTBTokenizer().tokenize({k: [{'caption': c} for c in v] for k, v in captions.items()})
    else:
        tokenized = {k: [plain_words(c) for c in v] for k, v in captions.items()}
    return ({k: v for (side, k), v in tokenized.items() if side == 'ref'},
            {k: v for (side, k), v in tokenized.items() if side == 'res'})


@contextlib.contextmanager
def meteor_scorer():
    """pycocoevalcap's Meteor, whose JVM starts with it and is ended on leaving, not whenever the garbage
    collector gets to it: a caller that scores many times would otherwise hold several JVMs of 2 GB each."""
    from pycocoevalcap.meteor.meteor import Meteor
    meteor = Meteor()
    try:
        yield meteor
    finally:
        meteor.meteor_p.kill()
        meteor.meteor_p.communicate()  # waits for it and closes its pipes


def score_captions(references, results):
    """references {image_id: [captions]}, results {image_id: caption} -> ({metric: score}, [notes])."""
    gts, res = tokenize_for_scoring(references, results)
    scorers = [(Bleu(4), ['BLEU-1', 'BLEU-2', 'BLEU-3', 'BLEU-4']), (Rouge(), ['ROUGE-L']), (Cider(), ['CIDEr'])]
    notes = ['SPICE not computed: its scorer downloads Stanford CoreNLP at start-up']
    with contextlib.ExitStack() as stack:
        if shutil.which('java'):
            scorers.insert(1, (stack.enter_context(meteor_scorer()), ['METEOR']))
        else:
            notes.append('METEOR skipped: it needs Java, which is not installed')
        scores = {}
        for scorer, names in scorers:
            value, _ = scorer.compute_score(gts, res)
            scores.update(zip(names, value if isinstance(value, list) else [value]))
    return scores, notes
