"""Beam search, the metric plumbing and evaluate.py."""
import itertools
import json
import shutil
import subprocess
from dataclasses import replace

import pytest
import torch

import training
from conftest import check_printed_scores, run, tiny_args
from decoding import load_captioner
from model import DecoderRNN, DecodeSettings
from scoring import score_captions

START, END, UNK = 1, 2, 3


def tiny_decoder(seed, vocab_size=6):
    torch.manual_seed(seed)
    decoder = DecoderRNN(embed_size=4, hidden_size=5, vocab_size=vocab_size, num_layers=1, max_seq_length=4).eval()
    with torch.no_grad():
        decoder.linear.weight.mul_(8)  # peaked, varied distributions, so the search has real choices
    return decoder


def sequence_log_prob(decoder, feature, words):
    """Total log-probability of a word sequence, by teacher forcing through the decoder's steps."""
    log_probs, states = decoder.step(feature.unsqueeze(0), None)
    total = 0.0
    for word in words:
        total += log_probs[0, word].item()
        log_probs, states = decoder.step(decoder.embed(torch.tensor([word])), states)
    return total


def all_captions(vocab_size, max_len, min_len=0, start=None):
    """Every word sequence that ends at <end> or reaches max_len, without <unk>, with at least min_len words
    before <end>; with a start id, that word may come first only, and does not count as a word."""
    allowed = [w for w in range(vocab_size) if w != UNK]
    for length in range(1, max_len + 1):
        for words in itertools.product(allowed, repeat=length):
            said = [w for w in words[:-1] if w != start] if words[0] == start else words[:-1]
            if END in words[:-1] or start in words[1:] or (words[-1] == END and len(said) < min_len):
                continue
            if words[-1] == END or length == max_len:
                yield list(words)


def truncate(row):
    words = row.tolist()
    return words[:words.index(END) + 1] if END in words else words


@pytest.mark.parametrize('seed', range(5))
@pytest.mark.parametrize('length_penalty', [0.0, 1.0])
@pytest.mark.parametrize('min_len', [0, 1, 2])
@pytest.mark.parametrize('start', [None, START])
def test_exhaustive_beam_finds_the_most_probable_caption(seed, length_penalty, min_len, start):
    decoder = tiny_decoder(seed)
    features = torch.randn(2, 4)
    with torch.no_grad():
        # 85 captions of up to 3 words exist, so 125 beams keep every one of them: the search is exhaustive.
        settings = DecodeSettings(beam_size=125, end_id=END, unk_id=UNK, max_len=3, length_penalty=length_penalty,
                                  min_len=min_len, start_id=start)
        found = decoder.beam_search(features, settings)
        assert len(found) == 2  # the loop below checks something
        for feature, row in zip(features, found):
            scored = [(sequence_log_prob(decoder, feature, words) / len(words) ** length_penalty, words)
                      for words in all_captions(6, 3, min_len, start)]
            best_score, best_words = max(scored)
            assert truncate(row) == best_words
            assert sorted(s for s, _ in scored)[-2] < best_score - 1e-6  # a unique optimum, not a tie


def test_beam_beats_greedy_when_greedy_is_short_sighted():
    """Some decoder and image where greedy is not the most probable caption, and a beam of 3 finds better."""
    for seed in range(50):
        decoder = tiny_decoder(seed)
        feature = torch.randn(1, 4)
        with torch.no_grad():
            greedy = truncate(decoder.sample(feature, DecodeSettings(end_id=END, unk_id=UNK))[0])
            beam = truncate(decoder.beam_search(feature, DecodeSettings(beam_size=3, end_id=END, unk_id=UNK))[0])
            if greedy != beam:
                assert sequence_log_prob(decoder, feature[0], beam) > sequence_log_prob(decoder, feature[0], greedy)
                return
    pytest.fail('no case where beam search and greedy decoding differ')


@pytest.mark.parametrize('start', [None, START])
def test_beam_size_one_is_greedy(start):
    decoder = tiny_decoder(7, vocab_size=12)
    decoder.max_seq_length = 10
    features = torch.randn(32, 4)
    with torch.no_grad():
        greedy = decoder.sample(features, DecodeSettings(end_id=END, unk_id=UNK, start_id=start))
        beam = decoder.beam_search(features, DecodeSettings(beam_size=1, end_id=END, unk_id=UNK, start_id=start))
    assert [truncate(row) for row in greedy] == [truncate(row) for row in beam]


def test_start_may_come_first_only_and_is_not_a_word():
    """train.py's captions begin with <start>, so a trained decoder says it first: decoding keeps it there,
    never says it again, and min_len counts the words after it."""
    decoder = tiny_decoder(4, vocab_size=8)
    with torch.no_grad():
        decoder.linear.bias[START] = 50.0  # <start> would win every step
        decoder.linear.bias[END] = 40.0  # then <end>, as soon as it is allowed
        features = torch.randn(6, 4)
        rows = [*decoder.sample(features, DecodeSettings(end_id=END, unk_id=UNK, start_id=START)),
                *decoder.beam_search(features, DecodeSettings(beam_size=3, end_id=END, unk_id=UNK, start_id=START))]
    assert len(rows) == 12
    for row in rows:
        words = truncate(row)
        assert words[0] == START and START not in words[1:]
        assert len(words) == 3 and words[1] not in (START, END, UNK) and words[2] == END


def test_min_len_rules_out_the_empty_caption():
    """Small random decoders often rank the empty caption (just <end>) first; with min_len=1 neither greedy
    nor beam decoding ever returns it, and min_len=2 gives at least two words."""
    empty_without, lengths = 0, {1: [], 2: []}
    for seed in range(20):
        decoder = tiny_decoder(seed)
        features = torch.randn(8, 4)
        with torch.no_grad():
            beam = DecodeSettings(beam_size=3, end_id=END, unk_id=UNK)
            unconstrained = decoder.beam_search(features, replace(beam, min_len=0))
            empty_without += sum(truncate(row) == [END] for row in unconstrained)
            for min_len in (1, 2):
                for row in [*decoder.beam_search(features, replace(beam, min_len=min_len)),
                            *decoder.sample(features, DecodeSettings(end_id=END, unk_id=UNK, min_len=min_len))]:
                    lengths[min_len].append(len(truncate(row)) - (END in row.tolist()))
    assert empty_without > 0  # the case the rule is for does happen
    assert min(lengths[1]) >= 1 and min(lengths[2]) >= 2
    assert 1 in lengths[1]  # min_len=1 does not force longer captions than it must


def test_beam_never_says_unk_and_stops_at_end():
    decoder = tiny_decoder(3)
    with torch.no_grad():
        decoder.linear.bias[UNK] = 50.0  # <unk> would win every step
        out = decoder.beam_search(torch.randn(4, 4), DecodeSettings(beam_size=3, end_id=END, unk_id=UNK))
        assert (out != UNK).all()
        decoder.linear.bias[END] = 100.0  # now <end> wins at once, after the one word min_len asks for
        out = decoder.beam_search(torch.randn(4, 4), DecodeSettings(beam_size=3, end_id=END, unk_id=UNK, min_len=0))
    assert [truncate(row) for row in out] == [[END]] * 4
    assert (out == END).all()  # after <end> a beam only repeats <end>


REFERENCES = {1: ['a small red circle to the left of a large blue square', 'a small red circle and a square'],
              2: ['there is a large green triangle in the picture', 'an image of a large green triangle'],
              3: ['a picture with a small yellow square and a large purple circle', 'two shapes on a table']}
PERFECT = {k: v[0] for k, v in REFERENCES.items()}
WRONG = {1: 'a large green triangle in the picture', 2: 'a small red circle and a square',
         3: 'there is a large green triangle in the picture'}
JAVA_MISSING = 'Java is missing: METEOR not checked'


def java_starts(monkeypatch):
    """The commands of the java processes started from now on, with their processes: pycocoevalcap's tokenizer
    and METEOR start theirs through subprocess.Popen."""
    started, real_popen = [], subprocess.Popen

    def popen(command, *args, **kwargs):
        process = real_popen(command, *args, **kwargs)
        if command[0] == 'java':
            started.append((command, process))
        return process
    monkeypatch.setattr(subprocess, 'Popen', popen)
    return started


def test_metrics_reward_the_right_captions():
    good, notes = score_captions(REFERENCES, PERFECT)
    bad, _ = score_captions(REFERENCES, WRONG)
    assert good['BLEU-4'] == pytest.approx(1.0, abs=1e-6)
    assert good['BLEU-1'] == pytest.approx(1.0, abs=1e-6)
    assert good['CIDEr'] > 1.0
    assert good['ROUGE-L'] > 0.95
    assert {'BLEU-1', 'BLEU-2', 'BLEU-3', 'BLEU-4', 'ROUGE-L', 'CIDEr'} <= good.keys()
    for metric in good:
        assert bad[metric] < good[metric], metric
    assert any('SPICE' in note for note in notes)


def test_meteor_rewards_the_right_captions():
    if not shutil.which('java'):
        pytest.skip(JAVA_MISSING)
    good, notes = score_captions(REFERENCES, PERFECT)
    bad, _ = score_captions(REFERENCES, WRONG)
    assert good['METEOR'] > 0.9 and bad['METEOR'] < 0.5
    assert not any('METEOR' in note for note in notes)


def test_one_scoring_starts_java_once_to_tokenize_and_once_for_meteor(monkeypatch):
    """Each JVM start costs about a second, more than the work it does on a test set."""
    if not shutil.which('java'):
        pytest.skip(JAVA_MISSING)
    from pycocoevalcap.meteor.meteor import Meteor
    monkeypatch.setattr(Meteor, '__del__', lambda self: None)  # so a METEOR that scoring leaves open stays open
    started = java_starts(monkeypatch)
    scores, _ = score_captions(REFERENCES, PERFECT)
    tokenizers = [command for command, _ in started if 'edu.stanford.nlp.process.PTBTokenizer' in command]
    meteors = [command for command, _ in started if 'meteor-1.5.jar' in command]
    assert (len(tokenizers), len(meteors), len(started)) == (1, 1, 2), [command for command, _ in started]
    left_running = [process for _, process in started if process.poll() is None]
    for process in left_running:
        process.kill()
        process.communicate()
    assert not left_running, 'a Java process was left running after scoring'
    assert scores['BLEU-4'] == pytest.approx(1.0, abs=1e-6) and scores['METEOR'] > 0.9


def test_without_java_the_other_metrics_are_scored_and_meteor_is_said_to_be_skipped(monkeypatch):
    real_which = shutil.which
    monkeypatch.setattr(shutil, 'which', lambda name, *args, **kwargs: None if name == 'java' else
                        real_which(name, *args, **kwargs))
    started = java_starts(monkeypatch)
    good, notes = score_captions(REFERENCES, PERFECT)
    bad, _ = score_captions(REFERENCES, WRONG)
    assert started == []
    assert list(good) == ['BLEU-1', 'BLEU-2', 'BLEU-3', 'BLEU-4', 'ROUGE-L', 'CIDEr']
    assert good['BLEU-4'] == pytest.approx(1.0, abs=1e-6) and good['ROUGE-L'] == pytest.approx(1.0)
    assert good['CIDEr'] > 1.0 and bad['CIDEr'] < 0.5
    assert any(note.startswith('METEOR skipped') and 'Java' in note for note in notes), notes


@pytest.fixture(scope='module')
def trained(synthetic_sets, tmp_path_factory):
    """A small model trained on the synthetic set, good enough that its captions mean something."""
    root = tmp_path_factory.mktemp('evaluate')
    (root / 'data').symlink_to(synthetic_sets(num_train=600, num_val=60, seed=3))  # greedy CIDEr 1.3, beam 1.7
    training.train(tiny_args(root / 'data', root / 'models', train_backbone=True, no_flip=True, embed_size=64,
                             hidden_size=96, batch_size=64, num_epochs=3, forget_bias=1, grad_clip=5, bn_momentum=0.1,
                             log_step=50, seed=0))
    return root


def test_beam_scores_at_least_as_well_as_greedy_on_held_out_images(trained):
    captioner = load_captioner(str(trained / 'models' / 'checkpoint.pt'))
    with open(trained / 'data' / 'annotations' / 'captions_val.json') as f:
        dataset = json.load(f)
    paths = {str(trained / 'data' / 'val' / image['file_name']): image['id'] for image in dataset['images']}
    references = {image['id']: [] for image in dataset['images']}
    for annotation in dataset['annotations']:
        references[annotation['image_id']].append(annotation['caption'])
    cider = {}
    for beam_size in (1, 3):
        captions, errors = captioner.caption(list(paths), DecodeSettings(beam_size=beam_size))
        assert not errors
        scores, _ = score_captions(references, {paths[p]: c for p, c in captions.items()})
        cider[beam_size] = scores['CIDEr']
    assert cider[1] > 0.5  # the model learned something, so the comparison means something
    assert cider[3] >= cider[1]


def test_evaluate_runs_through_its_command_line(trained, tmp_path):
    results, caption_path = tmp_path / 'results.json', trained / 'data' / 'annotations' / 'captions_val.json'
    command = ['evaluate.py', '--checkpoint', trained / 'models' / 'checkpoint.pt',
               '--image_dir', trained / 'data' / 'val', '--caption_path', caption_path, '--results_path', results,
               '--beam_size', '2', '--batch_size', '16', '--device', 'cpu']
    result = run(*command, process=True)
    assert result.returncode == 0, result.stderr[-2000:]
    written = json.loads(results.read_text())
    assert len(written) == 60 and set(written[0]) == {'image_id', 'caption'}
    assert all(isinstance(item['caption'], str) and item['caption'] for item in written)
    assert '60 images, beam size 2' in result.stdout
    scores = check_printed_scores(result.stdout, results, caption_path)
    assert {'BLEU-1', 'BLEU-4', 'ROUGE-L', 'CIDEr'} <= scores.keys() and scores['CIDEr'] > 50  # it learned

    # Karpathy's split file picks the images of one split.
    split_file = tmp_path / 'dataset_coco.json'
    images = json.loads(caption_path.read_text())['images']
    split_file.write_text(json.dumps({'images': [{'cocoid': im['id'], 'split': 'test' if i < 10 else 'train'}
                                                 for i, im in enumerate(images)]}))
    result = run(*command, '--split_file', split_file, '--split', 'test')
    assert result.returncode == 0, result.stderr[-2000:]
    assert {item['image_id'] for item in json.loads(results.read_text())} == {im['id'] for im in images[:10]}
    assert '10 images, beam size 2' in result.stdout
    check_printed_scores(result.stdout, results, caption_path)
