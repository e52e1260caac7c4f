"""A CUDA GPU that is not there: with CAPTIONING_FAKE_CUDA=1, torch.cuda.is_available() is True and
torch.cuda.device_count() is 1 (0 where CUDA_VISIBLE_DEVICES is empty, as on a real machine).

Why: the test suite must pass on a machine with a GPU, where every script picks CUDA unless told
otherwise, and a test that forgets to pin its device would feed CPU tensors to a CUDA model there. On
a machine without a GPU this fake makes the scripts pick CUDA the same way; anything that then really
uses CUDA (a tensor moved there, set_device, a capability query) raises, because there is no driver, so
such a test fails loudly here instead of only on a GPU machine.

Only the two answers above are faked, and only to the project's own code (the files of this
repository, tests included): PyTorch's internals, which on a real GPU machine would use the GPU without
trouble (torch.compile saves the CUDA random state when CUDA is available), get the real answers, and so
does torch.cuda.really_available(). Whatever asks more of CUDA gets the real, failing, call.
tests/conftest.py installs it in the test process and puts this folder first on PYTHONPATH, so that
every Python the tests start (scripts, torchrun, mp.spawn's processes) runs this file as its
sitecustomize. torch is patched as soon as it is imported, not imported here: scripts that never
import torch start as fast as ever.
"""
import importlib.abc
import importlib.machinery
import os
import sys

SWITCH = 'CAPTIONING_FAKE_CUDA'
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def visible():
    """CUDA_VISIBLE_DEVICES='' hides every GPU from a real CUDA too: tests of the no-GPU case use it."""
    return os.environ.get('CUDA_VISIBLE_DEVICES') != ''


def asked_by_project():
    """Whether the caller of the faked function is a file of this repository (not of an installed package)."""
    filename = sys._getframe(2).f_code.co_filename
    return filename.startswith(REPO + os.sep) and 'site-packages' not in filename


def patch(torch):
    if hasattr(torch.cuda, 'really_available'):
        return
    real_is_available, real_device_count = torch.cuda.is_available, torch.cuda.device_count

    def is_available():
        return visible() if asked_by_project() else real_is_available()

    def device_count():
        return int(visible()) if asked_by_project() else real_device_count()
    torch.cuda.is_available, torch.cuda.device_count = is_available, device_count
    torch.cuda.really_available = real_is_available


class PatchTorchOnImport(importlib.abc.MetaPathFinder):
    """Lets torch be imported as usual, then patches it, before the importer sees it."""

    def find_spec(self, name, path=None, target=None):
        if name != 'torch':
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run_module = spec.loader.exec_module

        def exec_then_patch(module):
            run_module(module)
            patch(module)
        spec.loader.exec_module = exec_then_patch
        return spec


def install():
    if 'torch' in sys.modules:
        patch(sys.modules['torch'])
    elif not any(isinstance(finder, PatchTorchOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, PatchTorchOnImport())


if os.environ.get(SWITCH) == '1':
    install()
