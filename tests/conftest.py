import contextlib

import pytest
import torch


@pytest.fixture
def compiled_for_real():
    """Past torch.compile's recompile limit the plain loop would run instead: make that an error.

    torch 2.7 renamed the option; torch 2.5 has neither, and there the check is left out.
    """
    config = torch._dynamo.config
    names = [name for name in ('fail_on_recompile_limit_hit', 'fail_on_cache_limit_hit') if hasattr(config, name)]
    with config.patch(**{names[0]: True}) if names else contextlib.nullcontext():
        yield
