"""What the benchmarks share: a timer that waits for the GPU to finish, and a line naming the CPU's libraries,
which decide the CPU figures.
"""
import os
import re
import time

import torch

import lstm_loops


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def cpu_libraries():
    """The CPU capability and the libraries behind the matrix multiplies, which decide the CPU figures.

    The ISA settings of the environment (ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS) are shown too,
    since they let one CPU imitate another.
    """
    config = torch.__config__.show()
    blas = re.search(r'BLAS_INFO=(\w+)', config)
    onednn = re.search(r'MKL-DNN (v[\d.]+)', config)
    diy_matmul = 'onednn' if lstm_loops._onednn_ops_work() and torch.backends.mkldnn.enabled else 'addmm'
    text = (f'cpu_capability={torch.backends.cpu.get_cpu_capability()} blas={blas.group(1) if blas else "unknown"} '
            f'mkl={torch.backends.mkl.is_available()} onednn={onednn.group(1) if onednn else "none"} '
            f'DIY_LSTM matmul={diy_matmul}')
    for name in ('ONEDNN_MAX_CPU_ISA', 'MKL_ENABLE_INSTRUCTIONS', 'ATEN_CPU_CAPABILITY'):
        if name in os.environ:
            text += f' {name}={os.environ[name]}'
    return text
