"""The layout the README describes: few files at the root, benchmarks and shapes sets in their folders, no
module that imports, directly or through others, a module that imports it back, no module that imports a script,
and no function that takes so many parameters that its callers pass them by hand, one by one."""
import ast
import os

from conftest import REPO

PACKAGES = ('bench', 'realphotos', 'synthetic')


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


def test_every_root_python_file_is_in_the_readmes_files_table_and_the_folders_hold_the_rest():
    root_files = sorted(name for name in os.listdir(REPO) if name.endswith('.py'))
    readme = (REPO / 'README.md').read_text()
    listed = {name for row in readme.splitlines() if row.startswith('| `') for name in row.split('|')[1].split('`')}
    assert not [name for name in root_files if name not in listed]
    for exercise_file in ('DIY_LSTM.py', 'model.py', 'build_vocab.py', 'resize.py', 'data_loader.py', 'train.py',
                          'sample.py'):
        assert exercise_file in root_files
    assert not [name for name in root_files if name.startswith(('bench', 'synthetic'))]
    for module in ('bench.lstm', 'bench.train', 'synthetic.easy', 'synthetic.hard', 'synthetic.writer'):
        assert module in project_modules()


def test_no_module_imports_itself_through_others():
    modules = project_modules()
    graph = {module: imports_of(path, modules) - {module} for module, path in modules.items()}
    assert graph['training'] >= {'model', 'data_loader'}  # the parser sees real imports
    assert graph['synthetic.hard'] >= {'synthetic.easy', 'synthetic.draw'}
    assert import_cycle(graph) is None, ' -> '.join(import_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert import_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': set()}) == ['a', 'b', 'c', 'a']
    assert import_cycle({'a': {'b'}, 'b': set()}) is None


def is_script(path):
    """Whether a file is run as a program: it has `if __name__ == '__main__':` at its top level."""
    for node in ast.parse(open(path).read()).body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Compare) and len(node.test.ops) == 1:
            sides = [node.test.left, *node.test.comparators]
            names = {side.id for side in sides if isinstance(side, ast.Name)}
            values = {side.value for side in sides if isinstance(side, ast.Constant)}
            if isinstance(node.test.ops[0], ast.Eq) and names == {'__name__'} and values == {'__main__'}:
                return True
    return False


def test_no_module_imports_a_script():
    """A script's code runs as a program; what other modules need of it belongs in a library module, which the
    script imports too. Tests may import scripts, to run their main()."""
    modules = project_modules()
    scripts = {module for module, path in modules.items() if is_script(path)}
    assert {'build_vocab', 'train', 'demo', 'bench.lstm', 'synthetic.__main__'} <= scripts  # the finder sees them
    assert not scripts & {'vocabulary', 'model', 'data_loader', 'decoding'}
    offenders = sorted(f'{module} imports {", ".join(sorted(imports_of(path, modules) & scripts))}'
                       for module, path in modules.items() if imports_of(path, modules) & scripts)
    assert not offenders, '; '.join(offenders)


def test_the_script_finder_reads_the_main_guard_either_way_round(tmp_path):
    for code, script in [("if __name__ == '__main__':\n    main()\n", True),
                         ("if '__main__' == __name__:\n    main()\n", True),
                         ("if __name__ != '__main__':\n    pass\n", False),
                         ("def f():\n    if __name__ == '__main__':\n        pass\n", False),
                         ("name = '__main__'\n", False)]:
        path = tmp_path / 'module.py'
        path.write_text(code)
        assert is_script(path) is script, code



# DIY_LSTM's LSTM and LSTMCell take nn.LSTM's and nn.LSTMCell's arguments, so that they drop in for them.
NN_LSTM_SIGNATURES = {'DIY_LSTM.LSTM.__init__', 'DIY_LSTM.LSTMCell.__init__'}
MAX_PARAMETERS = 8
FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)


def parameter_count(function):
    """Every parameter but self and cls; *args and **kwargs count one each."""
    args = function.args
    named = [arg.arg for arg in args.posonlyargs + args.args + args.kwonlyargs if arg.arg not in ('self', 'cls')]
    return len(named) + (args.vararg is not None) + (args.kwarg is not None)


def functions(node, prefix):
    """(qualified name, node) of every function defined in node, methods and nested functions included."""
    for child in ast.iter_child_nodes(node):
        name = f'{prefix}.{child.name}' if isinstance(child, (*FUNCTIONS, ast.ClassDef)) else prefix
        if isinstance(child, FUNCTIONS):
            yield name, child
        yield from functions(child, name)


def test_no_function_takes_more_than_8_parameters():
    counts = {name: parameter_count(function) for module, path in project_modules().items()
              for name, function in functions(ast.parse(open(path).read()), module)}
    assert NN_LSTM_SIGNATURES <= set(counts)  # the exceptions still exist
    too_many = sorted(f'{name} ({n})' for name, n in counts.items()
                      if n > MAX_PARAMETERS and name not in NN_LSTM_SIGNATURES)
    assert not too_many, f'more than {MAX_PARAMETERS} parameters: {", ".join(too_many)}'


def test_the_parameter_count_sees_every_kind_of_parameter_and_every_method():
    tree = ast.parse('class A:\n    def f(self, a, /, b, *c, d, e=1, **f):\n        def g(x): pass\n')
    found = dict(functions(tree, 'm'))
    assert list(found) == ['m.A.f', 'm.A.f.g']
    assert parameter_count(found['m.A.f']) == 6 and parameter_count(found['m.A.f.g']) == 1
