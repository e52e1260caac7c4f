"""Where the work runs: the device, and the processes torchrun starts."""
import os

import torch
import torch.distributed as dist


def devices_here():
    return [f'cuda:{i}' for i in range(torch.cuda.device_count())] + \
        (['mps'] if torch.backends.mps.is_available() else []) + ['cpu']


def pick_device(name=None):
    """The device named, if this machine has it (else a ValueError that lists those it has), or the best one."""
    if not name:
        return torch.device('cuda' if torch.cuda.is_available() else 'mps' if torch.backends.mps.is_available()
                            else 'cpu')
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f'--device {name}: not a device name; the devices here are: '
                         f'{", ".join(devices_here())}') from None
    missing = {'cuda': device.type == 'cuda' and (device.index or 0) >= torch.cuda.device_count(),
               'mps': device.type == 'mps' and not torch.backends.mps.is_available()}
    if any(missing.values()):
        kind = 'CUDA device' if device.type == 'cuda' else 'MPS (Apple GPU) device'
        if device.index:
            kind = f'{kind} {device.index}'
        raise ValueError(f'--device {name}: there is no {kind} here; the devices here are: {", ".join(devices_here())}')
    return device


def setup_distributed(device_name=None):
    """(rank, world size, device): torchrun's environment variables choose DDP, NCCL on GPU, gloo on CPU."""
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    if world_size == 1:
        return 0, 1, pick_device(device_name)
    local_rank = int(os.environ['LOCAL_RANK'])
    if torch.cuda.is_available() and device_name != 'cpu':
        torch.cuda.set_device(local_rank)
        device, backend = torch.device('cuda', local_rank), 'nccl'
    else:
        device, backend = torch.device('cpu'), 'gloo'
    dist.init_process_group(backend)
    return dist.get_rank(), world_size, device


def any_process(flag, device, world_size):
    """Whether flag is true in any process, so that all of them take the same branch at the same step."""
    if world_size == 1:
        return flag
    tensor = torch.tensor(float(flag), device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())
