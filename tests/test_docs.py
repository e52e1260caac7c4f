"""The README and docs/*.md: every command in their code blocks passes only flags its script defines, and every
relative link or picture points at a file that exists. `check_doc` does both for one document's text."""
import argparse
import functools
import importlib
import os
import re
import shlex
from unittest import mock
from urllib.parse import unquote

import pytest

from conftest import REPO

DOCS = [REPO / 'README.md', *sorted((REPO / 'docs').glob('*.md'))]
FENCE = re.compile(r'^ {0,3}(```|~~~)')
SEPARATORS = {'&&', '||', ';', '|', '&', '(', ')'}
PYTHON = re.compile(r'^(?:.*/)?python(?:3(?:\.\d+)?)?$')


class _Parsed(Exception):
    """Raised by the patched parse_args, carrying the parser a script built."""


@functools.lru_cache(maxsize=None)
def script_options(module):
    """The option strings ('--flag') of a script's argparse parser, built by its main() without running it."""
    def capture(parser, *args, **kwargs):
        raise _Parsed(parser)

    with mock.patch.object(argparse.ArgumentParser, 'parse_args', capture):
        try:
            importlib.import_module(module).main()
        except _Parsed as parsed:
            parser = parsed.args[0]
        else:
            raise AssertionError(f'{module}.main() returned without parsing its command line')
    return frozenset(option for action in parser._actions for option in action.option_strings)


def code_blocks(text):
    """The fenced code blocks of a markdown text, each as (first line number, lines)."""
    blocks, current, start = [], None, 0
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            if current is None:
                current, start = [], number + 1
            else:
                blocks.append((start, current))
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def shell_lines(lines, start):
    """Logical lines of a code block, with lines ending in a backslash joined to the next: (line number, text)."""
    joined, pending, first = [], '', start
    for number, line in enumerate(lines, start):
        if not pending:
            first = number
        if line.rstrip().endswith('\\'):
            pending += line.rstrip()[:-1] + ' '
        else:
            joined.append((first, pending + line))
            pending = ''
    if pending:
        joined.append((first, pending))
    return joined


def module_of(script):
    """'train.py', './train.py' or 'bench/lstm.py' as a module name: 'train', 'bench.lstm'."""
    return os.path.normpath(script)[:-len('.py')].replace(os.sep, '.')


def script_commands(line):
    """The project's scripts a shell line runs, each as (module, [arguments after the script]).

    `python X.py`, `python -m bench.Y`, `python -m synthetic` and `torchrun ... X.py`, after environment
    settings or a wrapper such as `timeout`; other modules (`python -m pytest`) and `python -c` are left out.
    A module that the project does not have is returned as is, so that the caller can report it."""
    line = re.sub(r'\$\([^()]*\)', 'SUBSTITUTED', line)  # $(ls ... | head -8) is one argument
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)  # `x;` and `a&&b` split at the operator
    lexer.whitespace_split = True
    try:
        tokens = list(lexer)
    except ValueError:  # an unbalanced quote: not a shell line (program output)
        return []
    segments, current = [], []
    for token in tokens:
        if token in SEPARATORS:
            segments.append(current)
            current = []
        else:
            current.append(token)
    segments.append(current)
    commands = []
    for words in segments:
        for i, word in enumerate(words):
            if PYTHON.match(word) and i + 1 < len(words):
                nxt = words[i + 1]
                if nxt.endswith('.py'):
                    commands.append((module_of(nxt), words[i + 2:]))
                elif nxt == '-m' and i + 2 < len(words):
                    module = words[i + 2]
                    if module.split('.')[0] in ('bench', 'synthetic'):
                        module = 'synthetic.__main__' if module == 'synthetic' else module
                        commands.append((module, words[i + 3:]))
                break
            if word == 'torchrun':
                script = next((j for j in range(i + 1, len(words)) if words[j].endswith('.py')), None)
                if script is not None:
                    commands.append((module_of(words[script]), words[script + 1:]))
                break
    return commands


def module_exists(module):
    return (REPO / (module.replace('.', '/') + '.py')).is_file()


def link_targets(text):
    """Relative targets of the markdown links and pictures in a text, outside code: (line number, target)."""
    targets = []
    in_code = False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            in_code = not in_code
            continue
        if in_code:
            continue
        line = re.sub(r'`[^`]*`', '', line)  # inline code is not a link
        found = re.findall(r'!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+"[^"]*")?\s*\)', line)
        found += re.findall(r'^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+"[^"]*")?\s*$', line)
        for target in found:
            if re.match(r'^[a-zA-Z][a-zA-Z0-9+.-]*:', target) or target.startswith('#'):
                continue  # http:, https:, mailto: ..., and anchors within the page
            targets.append((number, target))
    return targets


def check_doc(text, doc_dir, name='doc'):
    """Everything wrong in one markdown document, as readable lines: flags a script does not define (no
    abbreviations), scripts that do not exist, and relative links that lead nowhere (resolved from doc_dir)."""
    problems = []
    for start, lines in code_blocks(text):
        for number, line in shell_lines(lines, start):
            for module, arguments in script_commands(line):
                if not module_exists(module):
                    problems.append(f'{name}:{number}: no script {module!r} in: {line.strip()}')
                    continue
                options = script_options(module)
                for argument in arguments:
                    flag = argument.split('=', 1)[0]
                    if flag.startswith('--') and flag != '--' and flag not in options:
                        problems.append(f'{name}:{number}: {module} has no flag {flag}: {line.strip()}')
    for number, target in link_targets(text):
        path = unquote(target.split('#', 1)[0].split('?', 1)[0])
        if not path:
            continue
        resolved = REPO / path.lstrip('/') if path.startswith('/') else doc_dir / path
        if not os.path.exists(resolved):
            problems.append(f'{name}:{number}: broken link {target}')
    return problems


@pytest.mark.parametrize('doc', DOCS, ids=lambda path: str(path.relative_to(REPO)))
def test_every_command_and_link_in_the_docs_works(doc):
    assert check_doc(doc.read_text(), doc.parent, doc.name) == []


def test_every_command_of_the_gpu_check_passes_only_real_flags():
    """bench/gpu_check.sh runs only on a GPU machine: its commands are checked here as the docs' are, with its
    arrays of flags (NAME=(...), passed as "${NAME[@]}") written out where they are passed."""
    script = (REPO / 'bench' / 'gpu_check.sh').read_text()
    arrays = dict(re.findall(r'^(\w+)=\((.*)\)$', script, flags=re.MULTILINE))
    for name, flags in arrays.items():
        script = script.replace(f'"${{{name}[@]}}"', flags)
    assert '[@]' not in script.replace('"${command[@]', '')  # every array of flags written out
    assert check_doc(f'```bash\n{script}\n```\n', REPO, 'gpu_check.sh') == []
    run = {module for _, line in shell_lines(script.splitlines(), 1) for module, _ in script_commands(line)}
    assert run >= {'train', 'extract_features', 'sample', 'evaluate', 'build_vocab', 'synthetic.__main__',
                   'bench.lstm'}, run


def test_the_checker_reports_a_misspelt_flag_an_unknown_script_and_a_broken_link():
    text = '\n'.join([
        'See [the missing page](docs/nowhere.md#part), ![a picture](png/example.png),',
        '[an anchor](#results), [a site](https://example.org/x.md) and `[code](not/a/link.md)`.',
        '',
        '```bash',
        'python train.py --batch_sise 8 --num_epochs 1   # a typo',
        'python sample.py --image a.png \\',
        '    --beam 3',
        'TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python -m bench.lstm --repeats 3 --threads=2 && python trian.py',
        'torchrun --nproc_per_node=2 train.py --amp --scst_samples 2',
        'python -m synthetic --hard --root x; python -m pytest --flag-of-pytest; python -c "print(1)"',
        '```',
    ])
    problems = check_doc(text, REPO, 'example.md')
    assert len(problems) == 4, problems
    assert problems[0].startswith('example.md:5: train has no flag --batch_sise:')
    assert problems[1].startswith('example.md:6: sample has no flag --beam:')  # an abbreviation of --beam_size
    assert problems[2].startswith("example.md:8: no script 'trian'")
    assert problems[3] == 'example.md:1: broken link docs/nowhere.md#part'


def test_the_checker_finds_the_commands_of_every_kind_of_line():
    assert script_commands('timeout -s TERM 600 python train.py --resume x') == [('train', ['--resume', 'x'])]
    assert script_commands('python -m synthetic --hard') == [('synthetic.__main__', ['--hard'])]
    assert script_commands('torchrun --nnodes 2 ./train.py --amp') == [('train', ['--amp'])]
    assert script_commands('python bench/lstm.py --threads 1') == [('bench.lstm', ['--threads', '1'])]
    assert script_commands('python3 -m venv .venv && python -m pip install x') == []
    assert script_commands('35 words in the vocabulary (12 s so far)') == []


def test_the_docs_cover_every_script_and_the_readme_fits_on_a_screen_or_so():
    readme = (REPO / 'README.md').read_text()
    assert len(readme.encode()) <= 16_000
    assert 'pip install -r requirements.txt' in readme and 'ruff check . && python -m pytest' in readme
    for page in sorted((REPO / 'docs').glob('*.md')):
        assert f'(docs/{page.name})' in readme, f'the README does not link {page.name}'
    run = set()
    for doc in DOCS:
        for start, lines in code_blocks(doc.read_text()):
            for _, line in shell_lines(lines, start):
                run.update(module for module, _ in script_commands(line))
    assert run >= {'train', 'sample', 'evaluate', 'build_vocab', 'resize', 'demo', 'extract_features', 'export',
                   'gate_units', 'app', 'plot_history', 'synthetic.__main__',
                   'bench.lstm', 'bench.train', 'bench.sample', 'bench.onnx', 'bench.resize'}, run
