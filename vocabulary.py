"""The word vocabulary: how captions are split into words, which captions are worth training on, the
vocabulary of a captions file (build_vocab), and its file, saved as JSON ({"words": [...]} in index order).
load_vocab also reads the original tutorial's vocab.pkl, without running any code that a pickle could smuggle in.
No torch here, so build_vocab.py starts fast.
"""
import io
import json
import pickle
import string
from collections import Counter

from nltk.tokenize import NLTKWordTokenizer
from tqdm import tqdm

from caption_files import load_captions
from files import save_file

SPECIAL_TOKENS = ('<pad>', '<start>', '<end>', '<unk>')
PUNCTUATION = set(string.punctuation) | {'``', "''", '-lrb-', '-rrb-'}

# The word tokenizer inside nltk.word_tokenize; unlike word_tokenize it needs no downloaded punkt data.
# Without word_tokenize's sentence splitting, only the final period is split off: 'a dog. a cat.' -> 'dog.', 'cat', '.'
_tokenizer = NLTKWordTokenizer()


class VocabError(Exception):
    """A vocabulary or caption file that cannot be used; the one-line message names the file."""


def tokenize(text):
    """Lower-cased word tokens, the same for building the vocabulary and for training."""
    return _tokenizer.tokenize(text.lower().strip())


def plain_words(caption):
    """Lower-cased words without punctuation, joined by spaces: what the caption metrics compare (when
    Java, and with it COCO's PTB tokenizer, is missing) and what the SCST reward compares."""
    return ' '.join(word for word in tokenize(caption) if word not in PUNCTUATION)


class Vocabulary:
    """Word <-> index maps. The attribute names are the tutorial's, so its vocab.pkl loads onto this class."""

    def __init__(self):
        self.word2idx = {}
        self.idx2word = {}
        self.idx = 0
        for word in SPECIAL_TOKENS:
            self.add_word(word)

    def add_word(self, word):
        if word not in self.word2idx:
            self.word2idx[word] = self.idx
            self.idx2word[self.idx] = word
            self.idx += 1

    def __call__(self, word):
        return self.word2idx.get(word, self.word2idx['<unk>'])

    def __len__(self):
        return len(self.word2idx)

    @classmethod
    def from_words(cls, words):
        """The vocabulary whose index i is words[i]; the list must start with the four special tokens."""
        words = list(words)
        if tuple(words[:len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise ValueError(f'the first words must be {", ".join(SPECIAL_TOKENS)}')
        if not all(isinstance(word, str) for word in words):
            raise ValueError('every word must be a string')
        vocab = cls()
        for word in words:
            vocab.add_word(word)
        if len(vocab) != len(words):
            raise ValueError('a word appears more than once')
        return vocab


def usable_captions(coco, json):
    """Ids of the annotations worth training on, with a count of each kind dropped: a caption that is not
    text (null, a number, a list), one with no letter or digit (empty, or only punctuation), one whose
    image_id is not in "images". A file with none left is an error, so nothing trains on nothing."""
    if not isinstance(coco.dataset.get('images'), list) or 'annotations' not in coco.dataset:
        missing = '"images" list' if 'annotations' in coco.dataset else '"annotations" key'
        raise VocabError(f'{json}: not a COCO captions file (it has no {missing}); '
                         'pass a captions_*.json from the COCO annotations')
    if not coco.anns:
        raise VocabError(f'{json}: has no annotations, so there is nothing to train on')
    kept, dropped = [], {'that are not text': 0, 'with no words': 0, 'whose image_id is not in "images"': 0}
    for ann_id, annotation in coco.anns.items():
        caption = annotation.get('caption')
        if not isinstance(caption, str):
            dropped['that are not text'] += 1
        elif not any(c.isalnum() for c in caption):
            dropped['with no words'] += 1
        elif annotation.get('image_id') not in coco.imgs:
            dropped['whose image_id is not in "images"'] += 1
        else:
            kept.append(ann_id)
    for reason, number in dropped.items():
        if number:
            print(f'note: {json}: dropped {number} captions {reason}')
    if not kept:
        reasons = ', '.join(f'{number} {reason}' for reason, number in dropped.items() if number)
        raise VocabError(f'{json}: none of its {len(coco.anns)} captions is usable ({reasons}); '
                         'pass a COCO captions file')
    return kept


def build_vocab(json_path, threshold, split='train'):
    """Words that occur at least `threshold` times, most frequent first, ties alphabetical, so builds repeat.
    json_path is a COCO captions file, or a Karpathy dataset_*.json file whose split is read."""
    try:
        coco = load_captions(json_path, split)
    except FileNotFoundError:
        raise VocabError(f'{json_path}: no such file') from None
    except OSError as err:
        raise VocabError(f'{json_path}: cannot read ({err.strerror})') from None
    except (ValueError, AssertionError, KeyError, TypeError) as err:
        raise VocabError(f'{json_path}: not a COCO captions file ({type(err).__name__}: {err})') from None
    counter = Counter()
    for ann_id in tqdm(usable_captions(coco, json_path), desc='tokenizing', unit='caption'):
        counter.update(tokenize(coco.anns[ann_id]['caption']))

    kept = sorted((word for word, count in counter.items() if count >= threshold), key=lambda w: (-counter[w], w))
    vocab = Vocabulary()
    for word in kept:
        vocab.add_word(word)
    return vocab


def save_vocab(vocab, path):
    """Write the words in index order as JSON, atomically, so a crash never leaves half a vocabulary."""
    text = json.dumps({'words': [vocab.idx2word[i] for i in range(len(vocab))]}, indent=0) + '\n'
    save_file(path, lambda f: f.write(text.encode('utf-8')))


class _TutorialUnpickler(pickle.Unpickler):
    """Allows only the globals that the tutorial's vocab.pkl needs, so a malicious pickle cannot call anything.
    The tutorial's build_vocab.py pickled the class as __main__.Vocabulary; a pickle made by importing it, as
    build_vocab.Vocabulary, and one of this module's class, as vocabulary.Vocabulary. All three load as this class."""

    ALLOWED = {('copy_reg', '_reconstructor'), ('copyreg', '_reconstructor'),
               ('__builtin__', 'object'), ('builtins', 'object'),
               ('__main__', 'Vocabulary'), ('build_vocab', 'Vocabulary'), ('vocabulary', 'Vocabulary')}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f'refused global {module}.{name}')
        if name == 'Vocabulary':
            return Vocabulary
        return super().find_class(module, name)


def _check_unpickled(vocab):
    """The tutorial's object must be a consistent Vocabulary; an unusual word order is kept if <unk> exists."""
    if not isinstance(vocab, Vocabulary):
        raise ValueError(f'holds a {type(vocab).__name__}, not a Vocabulary')
    word2idx, idx2word = getattr(vocab, 'word2idx', None), getattr(vocab, 'idx2word', None)
    if not isinstance(word2idx, dict) or not isinstance(idx2word, dict):
        raise ValueError('word2idx and idx2word must be dicts')
    if not all(type(i) is int for i in idx2word) or set(idx2word) != set(range(len(idx2word))):
        raise ValueError('idx2word must be indexed 0..n-1')
    if not all(isinstance(word, str) for word in idx2word.values()):
        raise ValueError('every word must be a string')
    if word2idx != {word: i for i, word in idx2word.items()}:
        raise ValueError('word2idx and idx2word disagree')
    if '<unk>' not in word2idx:
        raise ValueError('no <unk> token')
    vocab.idx = len(idx2word)
    return vocab


def load_vocab(path):
    """Read a save_vocab JSON file or the tutorial's vocab.pkl (told apart by content, not by name)."""
    try:
        with open(path, 'rb') as f:
            data = f.read()
    except FileNotFoundError:
        raise VocabError(f'{path}: no such file') from None
    except IsADirectoryError:
        raise VocabError(f'{path}: is a directory, not a vocabulary file') from None
    except OSError as err:
        raise VocabError(f'{path}: cannot read ({err.strerror})') from None
    if not data.strip():
        raise VocabError(f'{path}: empty file')

    if data.removeprefix(b'\xef\xbb\xbf').lstrip().startswith(b'{'):
        try:
            words = json.loads(data)['words']
            if not isinstance(words, list):
                raise ValueError('"words" must be a list')
            return Vocabulary.from_words(words)
        except KeyError:
            raise VocabError(f'{path}: JSON has no "words" list') from None
        except (ValueError, TypeError) as err:
            raise VocabError(f'{path}: not a valid vocabulary ({str(err).splitlines()[0]})') from None

    try:
        # latin1 turns Python 2 byte strings into str; the tutorial's words are plain ASCII.
        vocab = _TutorialUnpickler(io.BytesIO(data), encoding='latin1').load()
    except Exception as err:  # a broken pickle can fail in many ways; none of them should escape as a traceback
        raise VocabError(f'{path}: not a JSON vocabulary or a readable vocab.pkl ({type(err).__name__}: '
                         f'{(str(err).splitlines() or [""])[0]})') from None
    try:
        return _check_unpickled(vocab)
    except ValueError as err:
        raise VocabError(f'{path}: not a valid vocabulary ({err})') from None
