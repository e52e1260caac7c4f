"""vocabulary.py and build_vocab.py: tokenizer, Vocabulary, building, JSON files, the tutorial's pickle, the script."""
import json
import os
import pickle
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from conftest import run
from vocabulary import SPECIAL_TOKENS, VocabError, Vocabulary, build_vocab, load_vocab, save_vocab, tokenize

TUTORIAL_VOCAB = Path(__file__).resolve().parents[2] / 'shared/data/tutorial/vocab.pkl'


def write_captions(path, captions):
    """A minimal COCO-format captions file: one image per caption."""
    images = [{'id': i, 'file_name': f'{i}.jpg', 'height': 8, 'width': 8} for i in range(len(captions))]
    annotations = [{'id': 100 + i, 'image_id': i, 'caption': caption} for i, caption in enumerate(captions)]
    path.write_text(json.dumps({'images': images, 'annotations': annotations}))
    return path


def python2_pickle(words, layout=None):
    """The bytes Python 2's pickle.dump(vocab, f) wrote for the tutorial: protocol 0 via copy_reg._reconstructor."""
    def string(s):
        return f"S'{s}'\n"
    out = "ccopy_reg\n_reconstructor\np0\n(c__main__\nVocabulary\np1\nc__builtin__\nobject\np2\nNtp3\nRp4\n(dp5\n"
    out += string('idx2word') + '(d'
    for i, word in enumerate(words):
        out += f'I{i}\n' + string(word) + 's'
    out += 's' + string('word2idx') + '(d'
    for i, word in enumerate(words):
        out += string(word) + f'I{i}\n' + 's'
    out += 's' + string('idx') + f'I{len(words)}\nsb.'
    return out.encode('ascii')


# --- tokenizer ---------------------------------------------------------------------------------

@pytest.mark.parametrize('text, tokens', [
    ('A man riding a horse.', ['a', 'man', 'riding', 'a', 'horse', '.']),
    ('  Two DOGS, playing!\n', ['two', 'dogs', ',', 'playing', '!']),
    ("A man's hat isn't red?", ['a', 'man', "'s", 'hat', 'is', "n't", 'red', '?']),
    ('', []),
    (' \t\n', []),
])
def test_tokenize_lowercases_and_splits_punctuation(text, tokens):
    assert tokenize(text) == tokens


def test_tokenize_needs_no_nltk_data(tmp_path):
    """word_tokenize needs punkt data; our tokenizer must not, so it runs on a fresh machine (here: an empty folder)."""
    script = (
        'import sys, nltk\n'
        'nltk.data.path[:] = [sys.argv[1]]\n'
        'try:\n'
        '    nltk.word_tokenize("A test.")\n'
        '    print("punkt found")\n'
        'except LookupError:\n'
        '    print("no punkt")\n'
        'from vocabulary import tokenize\n'
        'print(tokenize("A man riding a horse."))\n')
    result = run('-c', script, str(tmp_path), timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ['no punkt', "['a', 'man', 'riding', 'a', 'horse', '.']"]


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_tokens_are_lowercase_nonempty_without_whitespace(text):
    # Not idempotent: re-tokenizing turns the '' of ':"' into ``, so this is the property that holds.
    for token in tokenize(text):
        assert token and token == token.lower()
        assert not any(c.isspace() for c in token)


# --- Vocabulary --------------------------------------------------------------------------------

def test_vocabulary_specials_unknown_and_len():
    vocab = Vocabulary()
    assert [vocab(word) for word in SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert len(vocab) == 4 and vocab.idx == 4
    vocab.add_word('horse')
    vocab.add_word('horse')
    assert vocab('horse') == 4 and vocab.idx2word[4] == 'horse'
    assert vocab('unicorn') == 3
    assert len(vocab) == 5 and vocab.idx == 5


def test_from_words_keeps_the_order_and_rejects_bad_lists():
    vocab = Vocabulary.from_words([*SPECIAL_TOKENS, 'b', 'a'])
    assert vocab.word2idx == {'<pad>': 0, '<start>': 1, '<end>': 2, '<unk>': 3, 'b': 4, 'a': 5}
    with pytest.raises(ValueError, match='first words'):
        Vocabulary.from_words(['a', *SPECIAL_TOKENS])
    with pytest.raises(ValueError, match='more than once'):
        Vocabulary.from_words([*SPECIAL_TOKENS, 'a', 'a'])
    with pytest.raises(ValueError, match='string'):
        Vocabulary.from_words([*SPECIAL_TOKENS, 7])


# --- build_vocab -------------------------------------------------------------------------------

def test_build_vocab_applies_the_threshold_in_count_order(tmp_path):
    path = write_captions(tmp_path / 'captions.json', [
        'A dog runs.', 'A dog sits.', 'A cat sits.', 'A zebra!', '', '   '])
    # counts: a 4, . 3, dog 2, sits 2, runs 1, cat 1, zebra 1, ! 1
    vocab = build_vocab(path, threshold=2)
    assert [vocab.idx2word[i] for i in range(len(vocab))] == [*SPECIAL_TOKENS, 'a', '.', 'dog', 'sits']
    assert vocab('zebra') == vocab('<unk>') == 3
    everything = build_vocab(path, threshold=1)
    assert [everything.idx2word[i] for i in range(4, len(everything))] == [
        'a', '.', 'dog', 'sits', '!', 'cat', 'runs', 'zebra']
    assert len(build_vocab(path, threshold=5)) == 4


def test_build_vocab_errors_name_the_file(tmp_path):
    with pytest.raises(VocabError, match='missing.json: no such file'):
        build_vocab(tmp_path / 'missing.json', 1)
    broken = tmp_path / 'broken.json'
    broken.write_text('{"annotations": [')
    with pytest.raises(VocabError, match='broken.json: not a COCO captions file'):
        build_vocab(broken, 1)
    instances = tmp_path / 'instances.json'
    instances.write_text(json.dumps({'images': [], 'annotations': [{'id': 1, 'image_id': 1, 'bbox': [0, 0, 1, 1]}]}))
    with pytest.raises(VocabError, match=r'instances.json: none of its 1 captions is usable \(1 that are not text'):
        build_vocab(instances, 1)


# --- JSON files --------------------------------------------------------------------------------

def test_json_round_trip(tmp_path):
    vocab = build_vocab(write_captions(tmp_path / 'c.json', ['A café, a naïve dog.']), threshold=1)
    path = tmp_path / 'new' / 'folder' / 'vocab.json'
    save_vocab(vocab, path)
    assert json.loads(path.read_text())['words'] == [vocab.idx2word[i] for i in range(len(vocab))]
    assert os.listdir(path.parent) == ['vocab.json']  # no temporary file left behind
    loaded = load_vocab(path)
    assert isinstance(loaded, Vocabulary)
    assert loaded.word2idx == vocab.word2idx and loaded.idx2word == vocab.idx2word and loaded.idx == vocab.idx


words_without_whitespace = st.text(st.characters(blacklist_categories=('Zs', 'Zl', 'Zp', 'Cc')), min_size=1).filter(
    lambda word: not any(c.isspace() for c in word))


@settings(max_examples=50, deadline=None)
@given(st.lists(words_without_whitespace, unique=True, max_size=30))
@example(['\ud800', 'naïve', '"quoted"', '\\'])
def test_json_round_trip_property(words):
    vocab = Vocabulary.from_words([*SPECIAL_TOKENS, *(w for w in words if w not in SPECIAL_TOKENS)])
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, 'vocab.json')
        save_vocab(vocab, path)
        loaded = load_vocab(path)
    assert loaded.word2idx == vocab.word2idx and loaded.idx2word == vocab.idx2word and len(loaded) == len(vocab)


# --- the tutorial's pickle ---------------------------------------------------------------------

def test_loads_a_python2_style_pickle(tmp_path):
    path = tmp_path / 'vocab.pkl'
    path.write_bytes(python2_pickle([*SPECIAL_TOKENS, 'horse', 'dog']))
    vocab = load_vocab(path)
    assert type(vocab) is Vocabulary
    assert vocab.idx2word == {0: '<pad>', 1: '<start>', 2: '<end>', 3: '<unk>', 4: 'horse', 5: 'dog'}
    assert vocab('dog') == 5 and vocab('cat') == 3 and len(vocab) == 6


def test_loads_a_protocol0_pickle_of_main_vocabulary(tmp_path, monkeypatch):
    class LegacyVocabulary:  # stands in for the tutorial's class, pickled from a script run as __main__
        pass
    LegacyVocabulary.__module__, LegacyVocabulary.__qualname__ = '__main__', 'Vocabulary'
    monkeypatch.setattr(sys.modules['__main__'], 'Vocabulary', LegacyVocabulary, raising=False)
    legacy = LegacyVocabulary()
    legacy.word2idx = {word: i for i, word in enumerate([*SPECIAL_TOKENS, 'giraffe'])}
    legacy.idx2word = {i: word for word, i in legacy.word2idx.items()}
    legacy.idx = 5
    data = pickle.dumps(legacy, protocol=0)
    assert b'copy_reg\n_reconstructor' in data and b'__main__\nVocabulary' in data
    path = tmp_path / 'vocab.json'  # a misleading extension: the content decides
    path.write_bytes(data)
    vocab = load_vocab(path)
    assert type(vocab) is Vocabulary
    assert vocab.word2idx == legacy.word2idx and vocab.idx2word == legacy.idx2word and vocab('giraffe') == 4


def test_pickle_with_another_layout_loads_if_it_has_unk(tmp_path):
    path = tmp_path / 'odd.pkl'
    path.write_bytes(python2_pickle(['horse', '<unk>', '<pad>']))
    vocab = load_vocab(path)
    assert vocab('horse') == 0 and vocab('cat') == 1 and len(vocab) == 3
    path.write_bytes(python2_pickle(['horse', '<pad>']))
    with pytest.raises(VocabError, match='odd.pkl: .*no <unk>'):
        load_vocab(path)


def test_the_tutorial_vocab_pkl():
    if not TUTORIAL_VOCAB.exists():
        pytest.skip(f'{TUTORIAL_VOCAB} not present')
    vocab = load_vocab(TUTORIAL_VOCAB)
    assert type(vocab) is Vocabulary
    assert len(vocab) == 9956 and vocab.idx == 9956
    assert [vocab.idx2word[i] for i in range(4)] == list(SPECIAL_TOKENS)
    assert all(isinstance(word, str) for word in vocab.word2idx)
    assert vocab.idx2word[vocab('giraffe')] == 'giraffe' and vocab('qwertyuiop') == 3


class Exploit:
    def __init__(self, call, arg):
        self.call, self.arg = call, arg

    def __reduce__(self):
        return self.call, (self.arg,)


@pytest.mark.parametrize('make', ['os.system', 'builtins.eval', 'inside a Vocabulary'])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, make):
    marker = tmp_path / 'pwned'
    if make == 'os.system':
        data = pickle.dumps(Exploit(os.system, f'touch {marker}'), protocol=0)
    elif make == 'builtins.eval':
        data = pickle.dumps(Exploit(eval, f'open({str(marker)!r}, "w")'), protocol=0)
    else:  # the payload hides in the state of an otherwise proper tutorial pickle
        proper = python2_pickle(list(SPECIAL_TOKENS))
        payload = pickle.dumps(Exploit(eval, f'open({str(marker)!r}, "w")'), protocol=0)[:-1]  # without its STOP
        data = proper.replace(b"S'idx'\n", b"S'extra'\n" + payload + b"sS'idx'\n")
    path = tmp_path / 'vocab.pkl'
    path.write_bytes(data)
    with pytest.raises(VocabError, match=r'vocab\.pkl: .*refused global (posix|os|nt|__builtin__|builtins)\.'
                                         r'(system|eval)'):
        load_vocab(path)
    assert not marker.exists()


def test_refuses_other_globals_from_allowed_modules(tmp_path):
    path = tmp_path / 'vocab.pkl'
    path.write_bytes(b"cbuild_vocab\nsave_vocab\n.")
    with pytest.raises(VocabError, match='refused global build_vocab.save_vocab'):
        load_vocab(path)


# --- broken files ------------------------------------------------------------------------------

@pytest.mark.parametrize('name, content, problem', [
    ('truncated.pkl', None, 'not a JSON vocabulary or a readable vocab.pkl'),
    ('empty.json', b'', 'empty file'),
    ('corrupt.json', b'{"words": ["<pad>", ', 'not a valid vocabulary'),
    ('nowords.json', b'{"vocab": []}', 'no "words" list'),
    ('notalist.json', b'{"words": "abc"}', 'must be a list'),
    ('nospecials.json', b'{"words": ["a", "b"]}', 'first words must be'),
    ('twice.json', b'{"words": ["<pad>", "<start>", "<end>", "<unk>", "a", "a"]}', 'more than once'),
    ('text.txt', b'hello world\n', 'not a JSON vocabulary or a readable vocab.pkl'),
    ('number.pkl', pickle.dumps(42, protocol=0), 'holds a int, not a Vocabulary'),
])
def test_broken_files_raise_vocab_error_naming_the_file(tmp_path, name, content, problem):
    path = tmp_path / name
    path.write_bytes(python2_pickle([*SPECIAL_TOKENS, 'horse'])[:120] if content is None else content)
    with pytest.raises(VocabError) as info:
        load_vocab(path)
    message = str(info.value)
    assert message.startswith(f'{path}: ') and problem in message and '\n' not in message


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(VocabError, match='nothing.json: no such file'):
        load_vocab(tmp_path / 'nothing.json')
    with pytest.raises(VocabError, match='is a directory'):
        load_vocab(tmp_path)


# --- command line ------------------------------------------------------------------------------

def run_cli(*args):
    return run('build_vocab.py', *map(str, args), timeout=120)


def test_command_line_writes_the_vocabulary(tmp_path):
    captions = write_captions(tmp_path / 'captions.json', ['A dog runs.', 'A cat sits.'])
    vocab_path = tmp_path / 'out' / 'vocab.json'
    result = run_cli('--caption_path', captions, '--vocab_path', vocab_path, '--threshold', 1)
    assert result.returncode == 0, result.stderr
    assert 'Total vocabulary size: 10' in result.stdout and str(vocab_path) in result.stdout
    assert load_vocab(vocab_path)('dog') == 7  # . 2, a 2, then cat dog runs sits


def test_command_line_user_errors(tmp_path):
    result = run_cli('--caption_path', tmp_path / 'missing.json', '--vocab_path', tmp_path / 'vocab.json')
    assert result.returncode == 1
    assert result.stderr == f'error: {tmp_path / "missing.json"}: no such file\n'
    assert 'Traceback' not in result.stderr and not (tmp_path / 'vocab.json').exists()


def test_main_reports_malformed_json(tmp_path, monkeypatch, capsys):
    broken = tmp_path / 'broken.json'
    broken.write_text('{not json')
    monkeypatch.setattr(sys, 'argv', ['build_vocab.py', '--caption_path', str(broken),
                                      '--vocab_path', str(tmp_path / 'vocab.json')])
    from build_vocab import main
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith(f'error: {broken}: not a COCO captions file') and err.count('\n') == 1
