"""The allocator setting of CPU runs (pyiqa_grmp.cpu_memory): freed large blocks are reused, not page-faulted in
again; a user's own allocator settings are left alone. Each case runs in a fresh interpreter."""
import platform
import subprocess
import sys

import pytest

from grmp_test_utils import subprocess_env

pytestmark = pytest.mark.skipif(platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc',
                                reason='the setting is glibc malloc only')

MEDIAN_FAULTS = '''
import resource, torch

def median_faults():
    """Page faults of allocating, writing and freeing a 64 MB tensor (the median of 11, after 3 to warm up: one
    allocation that finds the freed block split by another counts as one)."""
    for _ in range(3):
        torch.ones(16 * 1024 * 1024)
    faults = []
    for _ in range(11):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.ones(16 * 1024 * 1024)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return sorted(faults)[5]
'''

PAGE_FAULTS_OF_A_64_MB_TENSOR = MEDIAN_FAULTS + '''
import sys
from pyiqa_grmp.cpu_memory import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == 'keep' else None
print(kept, median_faults())
'''


def _faults(mode: str, **env: str):
    output = subprocess.run([sys.executable, '-c', PAGE_FAULTS_OF_A_64_MB_TENSOR, mode], capture_output=True,
                            text=True, timeout=120, env=subprocess_env(**env), check=True).stdout.split()
    return output[0], int(output[1])


def test_kept_memory_serves_a_freed_64_mb_tensor_again_without_page_faults():
    kept, faults = _faults('keep')
    default, default_faults = _faults('default')
    assert kept == 'True' and default == 'None'
    assert default_faults > 10_000  # 16384 pages of 4 KB: each tensor mapped afresh
    assert faults < 100


def test_a_users_own_malloc_settings_are_left_alone():
    kept, _ = _faults('keep', MALLOC_MMAP_THRESHOLD_='131072')
    assert kept == 'False'


PAGE_FAULTS_IN_A_DECODING_WORKER = MEDIAN_FAULTS + '''
from pyiqa_grmp import cpu_memory
from pyiqa_grmp.scoring.pipeline import decoding_loader

class Faults(torch.utils.data.Dataset):
    def __len__(self):
        return 1

    def __getitem__(self, position):
        return median_faults()

(faults,) = list(decoding_loader(Faults(), workers=1))
print(cpu_memory._kept, faults)
'''


def test_decoding_workers_keep_freed_memory_when_their_parent_does_not():
    output = subprocess.run([sys.executable, '-c', PAGE_FAULTS_IN_A_DECODING_WORKER], capture_output=True,
                            text=True, timeout=120, env=subprocess_env(), check=True).stdout.split()
    assert output[0] == 'False'  # the parent (a GPU run's main process) left malloc as it was
    assert int(output[1]) < 100  # the worker serves a freed 64 MB block again: no 16384 page faults
