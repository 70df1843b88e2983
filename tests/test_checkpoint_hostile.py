"""Hostile checkpoint files cost little (time, memory, no code run), and mismatches fail loudly with names."""
import io
import os
import pickle
import resource
import time
import tracemalloc
import zipfile
from collections import OrderedDict

import pytest
import torch

from conftest import make_tiny_model
from pyiqa_grmp.archs.checkpoint import CheckpointMismatchError, read_grmp_checkpoint
from pyiqa_grmp.archs.pickled_module import MAX_MODULE_DEPTH, MAX_NESTING, UnsafePickleError, read_pickled_module
from pyiqa_grmp.checkpointing import ResumeError, load_state

#: What any refusal may cost here.
SECONDS = 1.0
MEBIBYTES = 64


class Storage:
    """A storage record of the archive being written: pickled as torch's persistent id."""

    def __init__(self, dtype: torch.dtype, key: str, data: bytes) -> None:
        self.dtype, self.key, self.data = dtype, key, data


class Reduce:
    """An object that pickles as ``func(*args)``, optionally followed by list or dict items (APPENDS/SETITEMS)."""

    def __init__(self, func, args, listitems=None, dictitems=None) -> None:
        self.value = (func, args, None, listitems and iter(listitems), dictitems and iter(dictitems.items()))

    def __reduce__(self):
        return self.value


def tensor_record(storage: Storage, size, stride, offset: int = 0) -> Reduce:
    return Reduce(torch._utils._rebuild_tensor_v2, (storage, offset, tuple(size), tuple(stride), False, OrderedDict()))


class Ghost:
    """A class that only this test defines: ``weights_only`` refuses it, so the restricted unpickler reads the file."""


def pickle_bytes(obj) -> bytes:
    storages = {}

    class Pickler(pickle.Pickler):
        def persistent_id(self, value):
            if not isinstance(value, Storage):
                return None
            storages[value.key] = value.data
            storage_class = {torch.float32: torch.FloatStorage, torch.float16: torch.HalfStorage}[value.dtype]
            element = torch.empty(0, dtype=value.dtype).element_size()
            return 'storage', storage_class, value.key, 'cpu', len(value.data) // element

    buffer = io.BytesIO()
    Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue(), storages


def write_archive(path, data_pkl: bytes, storages=None, compression=zipfile.ZIP_STORED):
    """An archive laid out as torch.save lays it out, around a given ``data.pkl``."""
    with zipfile.ZipFile(path, 'w', compression) as archive:
        archive.writestr('archive/data.pkl', data_pkl)
        archive.writestr('archive/byteorder', 'little')
        for key, data in (storages or {}).items():
            archive.writestr(f'archive/data/{key}', data)
        archive.writestr('archive/version', '3\n')
    return str(path)


def write_object(path, obj):
    return write_archive(path, *pickle_bytes(obj))


def cheaply(call):
    """Run ``call`` (expected to raise) and assert it took under SECONDS and allocated under MEBIBYTES."""
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(CheckpointMismatchError) as error:
            call()
    finally:
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert elapsed < SECONDS
    assert peak < MEBIBYTES * 2 ** 20
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < MEBIBYTES * 1024  # KiB on Linux
    return str(error.value)


# ---------------------------------------------------------------------------------------- tensor bombs
def test_zero_stride_fp16_tensor_is_refused_before_it_is_converted(tmp_path):
    path = tmp_path / 'bomb.pt'
    # 2 bytes of storage, 2**36 claimed elements: converting it to fp32 would need 256 GiB.
    torch.save({'image_encoder.conv1.weight': torch.zeros(1, dtype=torch.float16).expand(2 ** 18, 2 ** 18)}, path)
    assert os.path.getsize(path) < 2048
    message = cheaply(lambda: read_grmp_checkpoint(str(path)))
    assert str(path) in message and 'image_encoder.conv1.weight' in message and 'more than once' in message


def test_hostile_backbone_file_is_refused_not_handed_on_to_open_clip(tmp_path):
    import open_clip  # noqa: F401  (imported once here, outside the bound)
    from grmp_test_utils import TINY_BACKBONE
    from pyiqa_grmp.archs.grmp_arch import build_clip

    path = tmp_path / 'backbone.pt'
    torch.save({'clip.visual.conv1.weight': torch.zeros(1, dtype=torch.float16).expand(2 ** 18, 2 ** 18)}, path)
    message = cheaply(lambda: build_clip(TINY_BACKBONE, str(path)))
    assert str(path) in message and 'more than once' in message


def test_overlapping_strides_are_refused(tmp_path):
    path = tmp_path / 'overlap.pt'
    storage = torch.zeros(2 ** 12)
    torch.save({'clip.logit_scale': storage.as_strided((2 ** 11, 2 ** 11), (1, 1))}, path)
    message = cheaply(lambda: read_grmp_checkpoint(str(path)))
    assert str(path) in message and 'clip.logit_scale' in message and 'more than once' in message


def test_tensor_reaching_past_its_storage_is_refused(tmp_path):
    path = write_object(tmp_path / 'past.pt', {'clip.logit_scale': tensor_record(
        Storage(torch.float32, '0', bytes(16)), size=(4,), stride=(1,), offset=2)})
    assert str(path) in cheaply(lambda: read_grmp_checkpoint(path))


def test_many_keys_viewing_one_storage_are_refused(tmp_path):
    path = tmp_path / 'shared.pt'
    shared = torch.zeros(2 ** 16)
    torch.save({f'clip.key{index}': shared for index in range(256)}, path)  # 256 KiB stored, 64 MiB claimed
    assert 'several keys view the same storage' in cheaply(lambda: read_grmp_checkpoint(str(path)))


def test_pickled_module_with_a_zero_stride_parameter_is_refused(tmp_path):
    path = tmp_path / 'module.pt'
    module = torch.nn.Linear(1, 1)
    module.weight = torch.nn.Parameter(torch.zeros(1, dtype=torch.float16).expand(2 ** 18, 2 ** 18))
    torch.save(module, path)
    message = cheaply(lambda: read_grmp_checkpoint(str(path)))
    assert str(path) in message and 'tensor weight ' in message


def test_training_state_with_a_zero_stride_tensor_is_refused(tmp_path):
    path = tmp_path / '10.state'
    torch.save({'iter': 10, 'epoch': 1, 'optimizers': [{'state': {0: {
        'exp_avg': torch.zeros(1).expand(2 ** 18, 2 ** 18)}}}]}, path)
    start = time.perf_counter()
    with pytest.raises(ResumeError) as error:
        load_state(str(path))
    assert time.perf_counter() - start < SECONDS
    assert str(path) in str(error.value) and 'optimizers.0.state.0.exp_avg' in str(error.value)


def test_training_state_nested_too_deep_is_refused(tmp_path):
    nested = {'iter': 1, 'epoch': 1}
    for _ in range(100):
        nested = {'inner': nested}
    path = tmp_path / '1.state'
    torch.save({'iter': 1, 'epoch': 1, 'deep': nested}, path)
    with pytest.raises(ResumeError, match='nest deeper than'):
        load_state(str(path))


# ---------------------------------------------------------------------------------------- archive form
def test_legacy_pickle_with_an_empty_zip_appended_is_refused(tmp_path):
    legacy = io.BytesIO()
    torch.save({'clip.logit_scale': torch.ones(())}, legacy, _use_new_zipfile_serialization=False)
    empty_zip = io.BytesIO()
    zipfile.ZipFile(empty_zip, 'w').close()
    path = tmp_path / 'legacy.pt'
    path.write_bytes(legacy.getvalue() + empty_zip.getvalue())
    assert zipfile.is_zipfile(path)
    assert 'not a torch zip archive' in cheaply(lambda: read_grmp_checkpoint(str(path)))


def test_compressed_entries_are_refused(tmp_path):
    data_pkl, storages = pickle_bytes({'clip.logit_scale': tensor_record(
        Storage(torch.float32, '0', bytes(2 ** 20)), size=(2 ** 18,), stride=(1,))})
    path = write_archive(tmp_path / 'deflated.pt', data_pkl, storages, zipfile.ZIP_DEFLATED)
    assert os.path.getsize(path) < 16384
    assert 'compressed' in cheaply(lambda: read_grmp_checkpoint(path))


def test_bytearray_in_a_pickle_is_refused_before_it_is_built(tmp_path):
    path = write_object(tmp_path / 'bytes.pt', {'clip.logit_scale': Reduce(bytearray, (2 ** 36,))})
    assert 'bytearray, which is never loaded' in cheaply(lambda: read_grmp_checkpoint(path))


def test_converting_rebuild_is_refused_before_it_converts(tmp_path):
    bomb = tensor_record(Storage(torch.float16, '0', bytes(2)), size=(2 ** 18, 2 ** 18), stride=(0, 0))
    path = write_object(tmp_path / 'convert.pt', {'clip.logit_scale': Reduce(
        torch._utils._rebuild_device_tensor_from_cpu_tensor, (bomb, torch.float32, 'cpu', False))})
    assert '_rebuild_device_tensor_from_cpu_tensor' in cheaply(lambda: read_grmp_checkpoint(path))


def test_ordered_dict_over_a_tensor_is_refused_before_weights_only_iterates_it(tmp_path):
    rows = tensor_record(Storage(torch.float32, '0', bytes(4)), size=(2 ** 30, 2), stride=(0, 0))
    path = write_object(tmp_path / 'rows.pt', {'clip.logit_scale': Reduce(OrderedDict, (rows,))})
    assert 'builds a collections.OrderedDict over an object' in cheaply(lambda: read_grmp_checkpoint(path))


def test_call_with_a_tensor_for_its_arguments_is_refused_before_it_is_unpacked(tmp_path):
    bomb = tensor_record(Storage(torch.float16, '0', bytes(2)), size=(2 ** 30,), stride=(0,))
    data_pkl, storages = pickle_bytes({'clip.logit_scale': Reduce(torch.Size, (bomb,))})
    args_tuple = data_pkl.rindex(b'\x85')  # TUPLE1 around the tensor: without it, the tensor is the arguments
    path = write_archive(tmp_path / 'unpack.pt', data_pkl[:args_tuple] + data_pkl[args_tuple + 1:], storages)
    assert 'arguments that are no tuple' in cheaply(lambda: read_grmp_checkpoint(path))


def test_deeply_nested_tuples_are_refused_before_they_are_hashed(tmp_path):
    # hashing this key would overflow the C stack of any unpickler (a crash, not an exception)
    body = b'\x80\x02}' + b')' + b'\x85' * 200_000 + b'K\x01s.'  # {((((),),)...): 1}
    path = write_archive(tmp_path / 'deep.pt', body)
    assert f'deeper than {MAX_NESTING}' in cheaply(lambda: read_grmp_checkpoint(path))


# ------------------------------------------------------------------------------ restricted unpickler
def _restricted_payload(tmp_path, payload) -> str:
    """A file that weights_only refuses (it names Ghost), so that the restricted unpickler meets ``payload``."""
    return write_object(tmp_path / 'payload.pt', [Ghost(), payload])


def test_appends_onto_a_tensor_is_refused(tmp_path):
    target = tensor_record(Storage(torch.float32, '0', bytes(4)), size=(1,), stride=(1,))
    target.value = (*target.value[:3], iter([1.0, 2.0]), None)
    path = _restricted_payload(tmp_path, target)
    assert 'applies APPENDS to Tensor' in cheaply(lambda: read_grmp_checkpoint(path))


def test_setitems_onto_a_tensor_is_refused(tmp_path):
    target = tensor_record(Storage(torch.float32, '0', bytes(4)), size=(1,), stride=(1,))
    target.value = (*target.value[:4], iter({0: 1.0, 1: 2.0}.items()))
    assert 'applies SETITEMS to Tensor' in cheaply(lambda: read_grmp_checkpoint(_restricted_payload(tmp_path, target)))


def test_additems_onto_a_tensor_is_refused(tmp_path):
    data_pkl, storages = pickle_bytes([Ghost(), tensor_record(Storage(torch.float32, '0', bytes(4)), (1,), (1,))])
    # ... tensor APPENDS STOP -> ... tensor MARK 1 ADDITEMS APPENDS STOP
    assert data_pkl.endswith(b'e.')
    path = write_archive(tmp_path / 'additems.pt', data_pkl[:-2] + b'(K\x01\x90e.', storages)
    assert 'applies ADDITEMS to Tensor' in cheaply(lambda: read_grmp_checkpoint(path))


def test_ordered_dict_over_a_tensor_is_refused_by_the_restricted_unpickler(tmp_path):
    rows = tensor_record(Storage(torch.float32, '0', bytes(4)), size=(2 ** 30, 2), stride=(0, 0))
    path = _restricted_payload(tmp_path, Reduce(OrderedDict, (rows,)))
    start = time.perf_counter()
    with pytest.raises(UnsafePickleError, match='not from a plain list'):  # on its own, without the scan before it
        read_pickled_module(path, archive_checked=True)
    assert time.perf_counter() - start < SECONDS


def test_set_over_unhashable_items_is_our_error(tmp_path):
    path = _restricted_payload(tmp_path, Reduce(set, ([[1], [2]],)))
    assert 'malformed: TypeError' in cheaply(lambda: read_grmp_checkpoint(path))


def test_malformed_pickle_is_our_error_naming_the_file(tmp_path):
    data_pkl, storages = pickle_bytes([Ghost(), 1])
    path = write_archive(tmp_path / 'cut.pt', data_pkl[:-6] + b'.', storages)
    message = cheaply(lambda: read_grmp_checkpoint(path))
    assert path in message and 'could not read GRMP-IQA checkpoint' in message


def test_module_tree_deeper_than_the_bound_is_refused(tmp_path):
    root = module = torch.nn.Module()
    for _ in range(MAX_MODULE_DEPTH + 5):
        module.child = torch.nn.Module()
        module = module.child
    path = tmp_path / 'deep_modules.pt'
    torch.save(root, path)
    assert f'deeper than {MAX_MODULE_DEPTH} levels' in cheaply(lambda: read_grmp_checkpoint(str(path)))


def test_error_messages_describe_huge_structures_briefly(tmp_path):
    row = list(range(1000))
    huge = [row] * 1000  # small in the file (memoized), a million items in a plain repr
    path = _restricted_payload(tmp_path, Reduce(os.system, (huge,)))
    message = cheaply(lambda: read_grmp_checkpoint(path))
    assert 'posix.system' in message and len(message) < 1000


# ---------------------------------------------------------------------------------------- mismatches
@pytest.mark.parametrize('first, second', [('clip.logit_scale', 'module.clip.logit_scale'),
                                           ('logit_scale', 'text_encoder.logit_scale')])
def test_two_keys_for_one_model_key_are_named(tmp_path, first, second):
    state = {first: torch.ones(()), second: torch.zeros(()), 'prompt_learner2.ctx': torch.zeros(4, 32)}
    path = tmp_path / 'twice.pt'
    torch.save(state, path)
    with pytest.raises(CheckpointMismatchError) as error:
        read_grmp_checkpoint(str(path))
    assert first in str(error.value) and second in str(error.value) and 'clip.logit_scale' in str(error.value)


def test_non_floating_tensors_are_named(tmp_path):
    state = make_tiny_model().state_dict()
    state['clip.logit_scale'] = torch.ones((), dtype=torch.int64)
    state['prompt_learner.ctx'] = state['prompt_learner.ctx'].bool()
    path = tmp_path / 'ints.pt'
    torch.save({'params': state}, path)
    with pytest.raises(CheckpointMismatchError) as error:
        read_grmp_checkpoint(str(path))
    assert 'clip.logit_scale (torch.int64)' in str(error.value) and 'prompt_learner.ctx (torch.bool)' in \
        str(error.value)


def test_non_string_keys_are_named_with_the_file(tmp_path):
    path = tmp_path / 'int_keys.pt'
    torch.save({0: torch.zeros(1), ('a', 1): torch.zeros(1)}, path)
    with pytest.raises(CheckpointMismatchError) as error:
        read_grmp_checkpoint(str(path))
    assert str(path) in str(error.value) and 'not strings' in str(error.value) and "('a', 1)" in str(error.value)
