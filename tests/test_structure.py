"""The layout the README describes: few files at the root, benchmarks and shapes sets in their folders, and
no module that imports, directly or through others, a module that imports it back."""
import ast
import os

from conftest import REPO

PACKAGES = ('bench', 'synthetic')


def project_modules():
    """{module name: path} for the root's .py files and the packages' modules (tests not included)."""
    modules = {name[:-3]: os.path.join(REPO, name) for name in os.listdir(REPO) if name.endswith('.py')}
    for package in PACKAGES:
        folder = os.path.join(REPO, package)
        for name in os.listdir(folder):
            if name.endswith('.py'):
                module = package if name == '__init__.py' else f'{package}.{name[:-3]}'
                modules[module] = os.path.join(folder, name)
    return modules


def imports_of(path, modules):
    """The project modules a file imports anywhere in it (at the top or inside a function)."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from package import module` imports that module; `from module import name`, the module.
            found.update(f'{node.module}.{alias.name}' if f'{node.module}.{alias.name}' in modules else node.module
                         for alias in node.names)
    return found & set(modules)


def import_cycle(graph):
    """One cycle of the graph as a list of modules, or None: depth-first search, grey = on the path."""
    state, path = {}, []

    def visit(module):
        state[module] = 'grey'
        path.append(module)
        for other in sorted(graph[module]):
            if state.get(other) == 'grey':
                return path[path.index(other):] + [other]
            if other not in state and (cycle := visit(other)):
                return cycle
        state[module] = 'black'
        path.pop()
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_the_root_holds_at_most_22_python_files_and_the_folders_hold_the_rest():
    root_files = sorted(name for name in os.listdir(REPO) if name.endswith('.py'))
    assert len(root_files) <= 22, root_files
    for exercise_file in ('DIY_LSTM.py', 'model.py', 'build_vocab.py', 'resize.py', 'data_loader.py', 'train.py',
                          'sample.py'):
        assert exercise_file in root_files
    assert not [name for name in root_files if name.startswith(('bench', 'synthetic'))]
    for module in ('bench.lstm', 'bench.train', 'synthetic.easy', 'synthetic.hard', 'synthetic.writer'):
        assert module in project_modules()


def test_no_module_imports_itself_through_others():
    modules = project_modules()
    graph = {module: imports_of(path, modules) - {module} for module, path in modules.items()}
    assert graph['train'] >= {'model', 'data_loader'}  # the parser sees real imports
    assert graph['synthetic.hard'] >= {'synthetic.easy', 'synthetic.draw'}
    assert import_cycle(graph) is None, ' -> '.join(import_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert import_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': set()}) == ['a', 'b', 'c', 'a']
    assert import_cycle({'a': {'b'}, 'b': set()}) is None
