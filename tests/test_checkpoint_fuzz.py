"""Fuzzing the checkpoint readers: mutated archives of valid files run no code, stay cheap, and either load or
raise our error."""
import io
import os
import resource
import struct
import tempfile
import time
import zipfile

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyiqa_grmp.archs.checkpoint import CheckpointMismatchError, read_grmp_checkpoint
from pyiqa_grmp.checkpointing import ResumeError, load_state

SECONDS_PER_INPUT = 1.0
RSS_GROWTH_MIB = 256
FUZZ = settings(derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck))

#: Called only if a payload ran: the readers never import or call it.
CALLS = []


def record_call(*args):
    CALLS.append(args)


def _archive(obj) -> dict:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


class _Tiny(torch.nn.Module):  # a module class of this test only: its pickle names it, as the official one would
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(2, 2)
        self.register_buffer('scale', torch.ones(2, dtype=torch.float16))


BASES = {
    'module': _archive(_Tiny()),
    'state_dict': _archive({'params': {'clip.logit_scale': torch.ones(()), 'prompt_learner.ctx': torch.zeros(2, 3)}}),
    'training_state': _archive({'iter': 3, 'epoch': 1, 'optimizers': [{'state': {0: {'step': torch.tensor(3.0)}},
                                                                       'param_groups': [{'lr': 0.1, 'params': [0]}]}]}),
}


def _payloads(marker: str):
    module = __name__
    return [
        b'cposix\nsystem\n(X' + struct.pack('<I', len(f'touch {marker}')) + f'touch {marker}'.encode() + b'tR',
        b'cbuiltins\nexec\n(X' + struct.pack('<I', 30) + f'open({marker!r},"w")'.ljust(30).encode()[:30] + b'tR',
        f'c{module}\nrecord_call\n(K\x01tR'.encode(),
        b'R', b'b', b'e', b'u', b'\x90', b'\x81', b'(', b')', b'0', b'.', b'N', b's', b'a', b'\x85',
        b'J\x00\x00\x00\x40', b'J\xff\xff\xff\x7f', b'K\x00', b'(K\x01K\x02e', b'(K\x01K\x02u', b'}', b']',
        b'ccollections\nOrderedDict\n', b'cbuiltins\nset\n', b'ctorch\nSize\n',
    ]


mutation = st.one_of(
    st.tuples(st.just('flip'), st.integers(0, 10 ** 6), st.integers(1, 255)),
    st.tuples(st.just('insert'), st.integers(0, 10 ** 6), st.integers(0, len(_payloads('')) - 1)),
    st.tuples(st.just('delete'), st.integers(0, 10 ** 6), st.integers(1, 8)),
    st.tuples(st.just('number'), st.integers(0, 10 ** 6), st.sampled_from([0, 1, 2 ** 16, 2 ** 30, 2 ** 31 - 1])),
    st.tuples(st.just('storage'), st.integers(0, 10 ** 6), st.integers(-8, 8)),
)


def _mutate(files: dict, mutations, marker: str) -> dict:
    files = dict(files)
    pkl_name = next(name for name in files if name.endswith('/data.pkl'))
    data = bytearray(files[pkl_name])
    payloads = _payloads(marker)
    for kind, position, value in mutations:
        at = position % (len(data) + 1)
        if kind == 'flip' and data:
            data[at % len(data)] ^= value
        elif kind == 'insert':
            data[at:at] = payloads[value]
        elif kind == 'delete':
            del data[at:at + value]
        elif kind == 'number':  # a size, stride or offset (BININT1 / BININT2) becomes another number
            ints = [i for i in range(len(data) - 1) if data[i] in (ord('K'), ord('M'))]
            if ints:
                i = ints[position % len(ints)]
                width = 2 if data[i] == ord('K') else 3
                data[i:i + width] = b'J' + struct.pack('<i', value)
        elif kind == 'storage':  # a storage record cut short or grown
            records = sorted(name for name in files if '/data/' in name)
            if records:
                name = records[position % len(records)]
                files[name] = files[name][:value] if value < 0 else files[name] + bytes(value)
    files[pkl_name] = bytes(data)
    return files


def _write(path: str, files: dict) -> None:
    with zipfile.ZipFile(path, 'w') as archive:
        for name, data in files.items():
            archive.writestr(name, data)


def _fuzz(base: str, mutations, read, errors) -> None:
    with tempfile.TemporaryDirectory() as folder:
        marker = os.path.join(folder, 'marker')
        path = os.path.join(folder, '7.state')
        _write(path, _mutate(BASES[base], mutations, marker))
        start = time.process_time()  # CPU time: other processes on a shared machine do not count
        try:
            read(path)
        except errors:
            pass
        assert time.process_time() - start < SECONDS_PER_INPUT
        assert not os.path.exists(marker)
    assert not CALLS


def _peak_rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


@settings(FUZZ, max_examples=1000)
@given(base=st.sampled_from(['module', 'state_dict']), mutations=st.lists(mutation, min_size=1, max_size=4))
def _fuzz_checkpoints(base, mutations):
    _fuzz(base, mutations, read_grmp_checkpoint, CheckpointMismatchError)


@settings(FUZZ, max_examples=400)
@given(mutations=st.lists(mutation, min_size=1, max_size=4))
def _fuzz_training_states(mutations):
    _fuzz('training_state', mutations, load_state, ResumeError)


def test_mutated_checkpoints_run_nothing_stay_cheap_and_load_or_raise_our_error():
    before = _peak_rss_kib()
    _fuzz_checkpoints()
    assert _peak_rss_kib() - before < RSS_GROWTH_MIB * 1024


def test_mutated_training_states_run_nothing_stay_cheap_and_load_or_raise_our_error():
    before = _peak_rss_kib()
    _fuzz_training_states()
    assert _peak_rss_kib() - before < RSS_GROWTH_MIB * 1024
