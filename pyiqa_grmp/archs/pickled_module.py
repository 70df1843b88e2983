"""Reading the tensors of a whole pickled ``nn.Module`` (``torch.save(model)``) without its code and without
executing anything.

``torch.load(..., weights_only=True)`` refuses such files, and a plain ``torch.load`` would import the
pickled classes (the official ``CustomCLIP`` code) and call whatever the pickle names. Here the pickle is
read by a pure-Python unpickler that

- rebuilds tensors and parameters (through its own wrappers of torch's rebuild functions) and plain
  containers (``OrderedDict``, ``set``, ``frozenset``, ``torch.Size``, ``torch.device``, dtypes);
- maps every other class to an inert stand-in, whose creation calls nothing and whose ``__setstate__`` only
  stores the state;
- refuses, with an error naming it, any call (``REDUCE``, ``INST``/``OBJ`` with arguments, extension codes)
  of anything outside that allow-list, e.g. a ``__reduce__`` to ``os.system``, and any container opcode
  (``APPEND(S)``, ``SETITEM(S)``, ``ADDITEMS``) whose target is not a plain container or a stand-in;
- turns every other failure inside the pickle (a malformed stream, a ``TypeError`` from a construct) into
  :class:`UnsafePickleError`.

Before any unpickler sees a file, :func:`check_torch_archive` checks that it is torch's zip layout with stored
(uncompressed) entries, and :func:`scan_pickle` reads its opcodes without building anything, refusing
the globals of :data:`_REFUSED_GLOBALS` (``bytearray`` and tensor rebuilds that ``weights_only`` allows but that
allocate during the load) and tuples nested deeper than :data:`MAX_NESTING` (hashing them overflows the C stack).

The module tree is then walked through the stand-ins' ``_parameters`` / ``_buffers`` / ``_modules`` and the
tensors are returned under their dotted ``state_dict`` names. Only torch's zip format is read (every
``torch.save`` since torch 1.6); TorchScript archives are refused, as they would be handed to ``torch.jit``.
"""
from __future__ import annotations

import _compat_pickle
import pickle
import pickletools
import reprlib
import types
import zipfile
from collections import OrderedDict
from typing import IO, Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple

import torch


#: Deepest tuple nesting a pickle may build (torch's own pickles nest 3 deep).
MAX_NESTING = 64
#: Bounds of the module-tree walk: nesting depth, and modules visited (a shared module counts each time).
MAX_MODULE_DEPTH = 64
MAX_MODULES = 100_000
#: Globals that ``weights_only`` allows but no checkpoint of ours needs, and that cost out of proportion to the
#: file during the load itself: ``bytearray(2**34)``, and rebuilds that convert a tensor (a 2 KB stride-0 tensor
#: becomes GiBs) or make one that is not dense on the CPU.
_REFUSED_GLOBALS = frozenset({('builtins', 'bytearray'), ('__builtin__', 'bytearray'), *(
    ('torch._utils', name) for name in ('_rebuild_device_tensor_from_cpu_tensor', '_rebuild_device_tensor_from_numpy',
                                         '_rebuild_xla_tensor', '_rebuild_sparse_tensor', '_rebuild_nested_tensor',
                                         '_rebuild_wrapper_subclass', '_rebuild_qtensor'))})
_ZIP_MAGIC = b'PK\x03\x04'


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle asks for something the restricted reader will not do, or is not a pickle it can read."""


class _BoundedRepr(reprlib.Repr):
    """``repr`` for error messages: a few levels and items deep, tensors by shape and dtype only."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxother, self.maxstring = 3, 60, 60

    def repr_Tensor(self, value: torch.Tensor, level: int) -> str:
        return f'tensor(shape={tuple(value.shape)}, dtype={value.dtype})'

    repr_Parameter = repr_Tensor


bounded_repr = _BoundedRepr().repr


class TorchScriptArchiveError(UnsafePickleError):
    """The file is a TorchScript archive (code for ``torch.jit``), which these readers never load."""


class _StandInType(type):
    """Metaclass of the stand-ins: calling a stand-in class (what ``REDUCE`` would do) is refused."""

    def __call__(cls, *args, **kwargs):
        raise UnsafePickleError(f'the pickle calls {cls.pickled_name}, which is not allowed')


class StandIn(metaclass=_StandInType):
    """An inert instance of a class that the pickle names: it records the state it is given, nothing else."""

    pickled_name = '?'

    def __new__(cls, *args, **kwargs):  # NEWOBJ: cls.__new__(cls, *args); the arguments are ignored
        instance = object.__new__(cls)
        object.__setattr__(instance, 'pickled_state', None)
        object.__setattr__(instance, 'pickled_items', [])
        return instance

    def __setstate__(self, state: Any) -> None:
        object.__setattr__(self, 'pickled_state', state)

    # Container opcodes (APPEND(S) / SETITEM(S) / ADDITEMS) on an unknown class only record what they add.
    def append(self, item: Any) -> None:
        self.pickled_items.append(item)

    def extend(self, items: Any) -> None:
        self.pickled_items.extend(items)

    def __setitem__(self, key: Any, value: Any) -> None:
        self.pickled_items.append((key, value))

    def update(self, items: Any) -> None:
        self.pickled_items.extend(items)

    def __repr__(self) -> str:
        return f'<stand-in for {self.pickled_name}>'


def _empty_hooks(hooks: Any, what: str) -> None:
    if hooks:
        raise UnsafePickleError(f'{what} carries backward hooks, which are never loaded')


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                    metadata=None) -> torch.Tensor:
    _empty_hooks(backward_hooks, 'a tensor')
    return torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, OrderedDict(),
                                           metadata)


def _rebuild_parameter(data, requires_grad, backward_hooks) -> torch.nn.Parameter:
    _empty_hooks(backward_hooks, 'a parameter')
    return torch.nn.Parameter(_require_tensor(data), requires_grad)


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state) -> torch.nn.Parameter:
    return _rebuild_parameter(data, requires_grad, backward_hooks)  # the extra Python attributes are not needed


def _rebuild_from_type(func, new_type, args, state) -> torch.Tensor:
    if func not in (_rebuild_tensor, _rebuild_parameter, _rebuild_parameter_with_state) or \
            new_type not in (torch.Tensor, torch.nn.Parameter):
        raise UnsafePickleError(f'a tensor subclass rebuilt by {bounded_repr(func)} as {bounded_repr(new_type)} is '
                                'not allowed')
    return func(*args)


def _require_tensor(value: Any) -> torch.Tensor:
    if not torch.is_tensor(value):
        raise UnsafePickleError(f'expected a tensor, got {bounded_repr(value)}')
    return value


def _plain_sequence(args: tuple, what: str) -> tuple:
    """``()`` or ``(list_or_tuple,)``: what the constructors of plain containers are pickled with.

    Anything else (a tensor, a stand-in) would be iterated by code the allow-list does not vouch for.
    """
    if args == () or (len(args) == 1 and type(args[0]) in (list, tuple)):
        return args
    raise UnsafePickleError(f'{what} is built from {bounded_repr(args)}, not from a plain list or tuple')


def _ordered_dict(*args: Any) -> OrderedDict:
    items = _plain_sequence(args, 'an OrderedDict')
    if items and not all(type(pair) in (list, tuple) and len(pair) == 2 for pair in items[0]):
        raise UnsafePickleError(f'an OrderedDict is built from {bounded_repr(items[0])}, not from key/value pairs')
    return OrderedDict(*items)


def _set(*args: Any) -> set:
    return set(*_plain_sequence(args, 'a set'))


def _frozenset(*args: Any) -> frozenset:
    return frozenset(*_plain_sequence(args, 'a frozenset'))


def _size(*args: Any) -> torch.Size:
    dims = _plain_sequence(args, 'a torch.Size')
    if dims and not all(type(d) is int for d in dims[0]):
        raise UnsafePickleError(f'a torch.Size is built from {bounded_repr(dims[0])}, not from integers')
    return torch.Size(*dims)


def _device(*args: Any) -> torch.device:
    if not all(type(a) in (str, int) for a in args):
        raise UnsafePickleError(f'a torch.device is built from {bounded_repr(args)}, not from a name and index')
    return torch.device(*args)


#: (module, name) -> what the reader returns and may call in REDUCE.
_CALLABLES: Dict[Tuple[str, str], Callable] = {
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter_with_state,
    ('torch._tensor', '_rebuild_from_type_v2'): _rebuild_from_type,
    ('collections', 'OrderedDict'): _ordered_dict,
    ('builtins', 'set'): _set,
    ('builtins', 'frozenset'): _frozenset,
    ('torch', 'Size'): _size,
    ('torch', 'device'): _device,
}
#: (module, name) -> inert values the reader returns but never calls.
_VALUES: Dict[Tuple[str, str], Any] = {
    **{('torch', name): value for name, value in vars(torch).items()
       if isinstance(value, (torch.dtype, torch.layout, torch.memory_format))},
    ('torch._tensor', 'Tensor'): torch.Tensor,
    ('torch', 'Tensor'): torch.Tensor,
    ('torch.nn.parameter', 'Parameter'): torch.nn.Parameter,
}
_ALLOWED_CALLS = frozenset(map(id, _CALLABLES.values()))


class RestrictedUnpickler(pickle._Unpickler):
    """Pure-Python unpickler that calls only the allow-list and turns every other class into a stand-in."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._stand_ins: Dict[Tuple[str, str], type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if self.proto < 3 and self.fix_imports:  # Python 2 names, as the standard unpickler maps them
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            elif module in _compat_pickle.IMPORT_MAPPING:
                module = _compat_pickle.IMPORT_MAPPING[module]
        key = (module, name)
        if key in _CALLABLES:
            return _CALLABLES[key]
        if key in _VALUES:
            return _VALUES[key]
        if key not in self._stand_ins:
            self._stand_ins[key] = _StandInType(name.rpartition('.')[2] or 'StandIn', (StandIn,),
                                                {'pickled_name': f'{module}.{name}', '__module__': __name__})
        return self._stand_ins[key]

    def load_reduce(self) -> None:
        args = self.stack.pop()
        func = self.stack[-1]
        if type(args) is not tuple:
            raise UnsafePickleError(f'the pickle calls {_describe(func)} with {_describe(args)} as its arguments, '
                                    'not a tuple')
        if id(func) not in _ALLOWED_CALLS:
            raise UnsafePickleError(f'the pickle calls {_describe(func)}{_describe_args(args)}, which is not '
                                    'allowed')
        self.stack[-1] = func(*args)

    dispatch[pickle.REDUCE[0]] = load_reduce

    def load_build(self) -> None:
        state = self.stack.pop()
        instance = self.stack[-1]
        if not isinstance(instance, StandIn):
            raise UnsafePickleError(f'the pickle sets the state of {_describe(instance)}, which is not allowed')
        instance.__setstate__(state)

    dispatch[pickle.BUILD[0]] = load_build

    def _new_stand_in(self, cls: Any) -> None:
        """NEWOBJ and friends: only a stand-in may be created (its arguments are ignored)."""
        if not (isinstance(cls, type) and issubclass(cls, StandIn)):
            raise UnsafePickleError(f'the pickle creates {_describe(cls)} through __new__, which is not allowed')
        self.append(cls.__new__(cls))

    def load_newobj(self) -> None:
        self.stack.pop()  # the arguments
        self._new_stand_in(self.stack.pop())

    dispatch[pickle.NEWOBJ[0]] = load_newobj

    def load_newobj_ex(self) -> None:
        del self.stack[-2:]  # the arguments and keyword arguments
        self._new_stand_in(self.stack.pop())

    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex

    def _instantiate(self, klass: Any, args: list) -> None:  # INST / OBJ (protocols 0 and 1)
        if args:
            raise UnsafePickleError(f'the pickle calls {_describe(klass)}{_describe_args(tuple(args))}, which is '
                                    'not allowed')
        self._new_stand_in(klass)

    def _refuse_extension(self) -> None:
        raise UnsafePickleError('the pickle uses copyreg extension codes, which are not allowed')

    for _opcode in (pickle.EXT1, pickle.EXT2, pickle.EXT4):
        dispatch[_opcode[0]] = _refuse_extension
    del _opcode

    # Container opcodes call the target's own methods (``tensor.add``, ``__setitem__``): only plain containers
    # and stand-ins (which merely record) may be targets.
    @staticmethod
    def _target(value: Any, kinds: Tuple[type, ...], opcode: str) -> Any:
        if type(value) in kinds or isinstance(value, StandIn):
            return value
        raise UnsafePickleError(f'the pickle applies {opcode} to {_describe(value)}, which is not a plain container')

    def load_append(self) -> None:
        item = self.stack.pop()
        self._target(self.stack[-1], (list,), 'APPEND').append(item)

    dispatch[pickle.APPEND[0]] = load_append

    def load_appends(self) -> None:
        items = self.pop_mark()
        self._target(self.stack[-1], (list,), 'APPENDS').extend(items)

    dispatch[pickle.APPENDS[0]] = load_appends

    def load_setitem(self) -> None:
        value = self.stack.pop()
        key = self.stack.pop()
        self._target(self.stack[-1], (dict, OrderedDict), 'SETITEM')[key] = value

    dispatch[pickle.SETITEM[0]] = load_setitem

    def load_setitems(self) -> None:
        items = self.pop_mark()
        target = self._target(self.stack[-1], (dict, OrderedDict), 'SETITEMS')
        if len(items) % 2:
            raise UnsafePickleError('the pickle applies SETITEMS to a key without a value')
        for i in range(0, len(items), 2):
            target[items[i]] = items[i + 1]

    dispatch[pickle.SETITEMS[0]] = load_setitems

    def load_additems(self) -> None:
        items = self.pop_mark()
        self._target(self.stack[-1], (set,), 'ADDITEMS').update(items)

    dispatch[pickle.ADDITEMS[0]] = load_additems

    def load(self) -> Any:
        """Unpickle; any failure that is not already a refusal becomes :class:`UnsafePickleError`."""
        try:
            return super().load()
        except UnsafePickleError:
            raise
        except Exception as error:  # malformed streams and failing constructs raise all kinds
            raise UnsafePickleError(f'the pickle is malformed: {type(error).__name__}: '
                                    f'{reprlib.repr(str(error))[1:-1]}') from error


def _describe(value: Any) -> str:
    if isinstance(value, type) and issubclass(value, StandIn):
        return value.pickled_name
    if isinstance(value, StandIn):
        return f'an instance of {value.pickled_name}'
    return getattr(value, '__qualname__', None) or type(value).__name__


def _describe_args(args: Any) -> str:
    return f' with arguments {bounded_repr(args)}'


def _restricted_load(file: Any, **kwargs: Any) -> Any:
    return RestrictedUnpickler(file, **kwargs).load()


#: What ``torch.load(pickle_module=...)`` is given: torch uses its ``Unpickler`` (zip format) and ``load``.
RESTRICTED_PICKLE = types.ModuleType('pyiqa_grmp_restricted_pickle')
RESTRICTED_PICKLE.Unpickler = RestrictedUnpickler
RESTRICTED_PICKLE.load = _restricted_load
RESTRICTED_PICKLE.UnpicklingError = pickle.UnpicklingError


def is_pickled_module(value: Any) -> bool:
    """True for the stand-in of a pickled ``nn.Module`` (its state has ``_parameters`` and ``_modules``)."""
    state = value.pickled_state if isinstance(value, StandIn) else None
    return type(state) in (dict, OrderedDict) and '_parameters' in state and '_modules' in state


def module_tensors(module: StandIn) -> Dict[str, torch.Tensor]:
    """The persistent parameters and buffers of a pickled module tree, under their ``state_dict`` names.

    The walk is bounded: at most :data:`MAX_MODULE_DEPTH` levels and :data:`MAX_MODULES` visits, so a shared
    or looping tree costs little before it is refused.
    """
    tensors: Dict[str, torch.Tensor] = {}
    visits = 0
    pending: List[Tuple[StandIn, str, int]] = [(module, '', 0)]
    while pending:
        node, prefix, depth = pending.pop()
        visits += 1
        if depth > MAX_MODULE_DEPTH or visits > MAX_MODULES:
            raise UnsafePickleError(f'the module tree is deeper than {MAX_MODULE_DEPTH} levels or has more than '
                                    f'{MAX_MODULES} modules (at {bounded_repr(prefix[:-1])}); it may loop back '
                                    'on itself')
        state = node.pickled_state
        non_persistent = _mapping(state, '_non_persistent_buffers_set', node, prefix, (set, frozenset))
        buffers = _mapping(state, '_buffers', node, prefix)
        entries = [*_mapping(state, '_parameters', node, prefix).items(),
                   *((k, v) for k, v in buffers.items() if k not in non_persistent)]
        for name, tensor in entries:
            if tensor is None:
                continue
            if type(name) is not str or not torch.is_tensor(tensor):
                raise UnsafePickleError(f'{prefix}{bounded_repr(name)} of {node.pickled_name} is '
                                        f'{bounded_repr(tensor)}, not a tensor under a name')
            tensors[prefix + name] = tensor.detach()
        for name, child in reversed(list(_mapping(state, '_modules', node, prefix).items())):
            if child is None:
                continue
            if type(name) is not str or not is_pickled_module(child):
                raise UnsafePickleError(f'{prefix}{bounded_repr(name)} of {node.pickled_name} is '
                                        f'{bounded_repr(child)}, not a module under a name')
            pending.append((child, f'{prefix}{name}.', depth + 1))
    return tensors


def _mapping(state: Mapping, name: str, node: StandIn, prefix: str, kinds: Tuple[type, ...] = (dict, OrderedDict)
             ) -> Any:
    """``state[name]`` of a pickled module, which must be a plain container (or absent / None)."""
    value = state.get(name)
    if value is None:
        return kinds[0]()
    if type(value) not in kinds:
        raise UnsafePickleError(f'{prefix}{name} of {node.pickled_name} is {bounded_repr(value)}, not a '
                                f'{kinds[0].__name__}')
    return value


#: opcode -> (name, items it pops below a mark or alone, whether it pops to a mark, items it pushes, whether it
#: pushes its string argument), for :func:`scan_pickle`.
_STACK_EFFECTS = {
    op.code: (op.name, op.stack_before.index(pickletools.markobject) if pickletools.markobject in op.stack_before
              else len(op.stack_before), pickletools.markobject in op.stack_before, len(op.stack_after),
              op.stack_after == [pickletools.pyunicode])
    for op in pickletools.opcodes}
#: Opcodes that build a container from the items they pop, and that add items to the container below them.
_BUILDS = frozenset({'TUPLE', 'TUPLE1', 'TUPLE2', 'TUPLE3', 'LIST', 'DICT', 'FROZENSET'})
_FILLS = frozenset({'APPEND', 'APPENDS', 'SETITEM', 'SETITEMS', 'ADDITEMS'})
#: Callables that iterate their argument (as ``weights_only`` and this module allow them), by pickled name.
_CONSTRUCTORS = frozenset({'collections.OrderedDict', 'collections.Counter', 'builtins.set', '__builtin__.set',
                           'builtins.frozenset', '__builtin__.frozenset', 'torch.Size'})
#: Opcodes that move stack items rather than making new ones; :func:`scan_pickle` handles them itself.
_STACK_OPS = frozenset({'MARK', 'DUP', 'GET', 'BINGET', 'LONG_BINGET', 'PUT', 'BINPUT', 'LONG_BINPUT', 'MEMOIZE'})


def names_torchscript(names: Iterable[str]) -> bool:
    """Whether the entry names of a zip archive are those of a TorchScript archive (it holds ``constants.pkl``)."""
    return any(name.rpartition('/')[2] == 'constants.pkl' for name in names)


def check_torch_archive(handle: IO[bytes]) -> None:
    """Refuse anything but the archive ``torch.save`` writes, judged by content before torch reads it.

    The file must start with a zip local-file header, hold every entry once under one folder with its
    ``data.pkl``, stored uncompressed (torch never compresses, so a deflated entry can only be a decompression
    bomb) within the file's size, and must not be a TorchScript archive (which would be handed to torch.jit).
    ``data.pkl`` then goes through :func:`scan_pickle`. Raises :class:`UnsafePickleError`.
    """
    handle.seek(0)
    if handle.read(4) != _ZIP_MAGIC:
        raise UnsafePickleError('not a torch zip archive (only the format of torch.save since torch 1.6 is read)')
    size = handle.seek(0, 2)
    handle.seek(0)
    try:
        with zipfile.ZipFile(handle) as archive:
            entries = archive.infolist()
            names = [entry.filename for entry in entries]
            folders = {name.partition('/')[0] for name in names}
            if len(folders) != 1 or f'{next(iter(folders))}/data.pkl' not in names:
                raise UnsafePickleError('not a torch zip archive: expected one folder holding data.pkl')
            if len(set(names)) != len(names):
                raise UnsafePickleError('the archive names an entry twice')
            if any(entry.compress_type != zipfile.ZIP_STORED or entry.flag_bits & 1 for entry in entries) or \
                    sum(entry.file_size for entry in entries) > size:
                raise UnsafePickleError('the archive holds compressed, encrypted or oversized entries, which '
                                        'torch.save never writes')
            if names_torchscript(names):
                raise TorchScriptArchiveError('a TorchScript archive, which is never loaded (it would be handed '
                                              'to torch.jit)')
            scan_pickle(archive.read(f'{next(iter(folders))}/data.pkl'))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as error:
        raise UnsafePickleError(f'not a readable zip archive: {error}') from error
    finally:
        handle.seek(0)


class _Slot:
    """What :func:`scan_pickle` knows of one value the pickle builds (aliases through the memo share it)."""

    __slots__ = ('nesting', 'text', 'holds_object', 'containers', 'is_tuple')

    def __init__(self, nesting: int = 0, text: Optional[str] = None, is_tuple: bool = False) -> None:
        self.nesting, self.text, self.holds_object, self.is_tuple = nesting, text, False, is_tuple
        self.containers: List['_Slot'] = []  # the containers this value was put into

    def contains(self, items: List['_Slot']) -> None:
        """``items`` were put into this container: it holds an object as soon as one of them does."""
        for item in items:
            if item is not _ATOM:
                item.containers.append(self)
        if any(item.holds_object for item in items):
            self.mark_holding()

    def mark_holding(self) -> None:
        pending = [self]
        while pending:
            slot = pending.pop()
            if not slot.holds_object:
                slot.holds_object = True
                pending.extend(slot.containers)


#: Shared by every constant (a number, None, a bool): it never holds anything, so it need not be told where it goes.
_ATOM = _Slot()
_EMPTY_TUPLE = _Slot(is_tuple=True)
_EMPTY_CONTAINERS = frozenset({'EMPTY_LIST', 'EMPTY_DICT', 'EMPTY_SET'})


def scan_pickle(data: bytes) -> None:
    """Read the opcodes of ``data`` without building anything, refusing what would cost before any check.

    Tracks, per value, how deeply tuples nest (hashing a tuple nested 10^5 deep overflows the C stack in any
    unpickler), the strings that ``STACK_GLOBAL`` takes its name from, and whether it is or holds an object built
    by a call (a tensor, say): :data:`_CONSTRUCTORS` called over one would iterate it, 2**30 elements of a 4-byte
    stride-0 tensor in ``weights_only``'s unpickler. Raises :class:`UnsafePickleError` for these, a global of
    :data:`_REFUSED_GLOBALS` or a malformed stream.
    """
    stack: List[_Slot] = []
    marks: List[int] = []
    memo: Dict[int, _Slot] = {}
    try:
        for opcode, arg, _ in pickletools.genops(data):
            name, below, marked, pushed, text = _STACK_EFFECTS[opcode.code]
            if name in _STACK_OPS:
                if name == 'MARK':
                    marks.append(len(stack))
                elif name == 'DUP':
                    stack.append(stack[-1])
                elif name in ('GET', 'BINGET', 'LONG_BINGET'):
                    stack.append(memo[arg])
                else:  # PUT, BINPUT, LONG_BINPUT, MEMOIZE: the top stays
                    memo[len(memo) if name == 'MEMOIZE' else arg] = stack[-1]
                continue
            if not (below or marked or name == 'GLOBAL'):  # a constant or an empty container (or PROTO, FRAME)
                if pushed:
                    stack.append(_Slot() if name in _EMPTY_CONTAINERS else _Slot(text=arg) if text else
                                 _EMPTY_TUPLE if name == 'EMPTY_TUPLE' else _ATOM)
                continue
            popped: List[_Slot] = []
            if marked:
                start = marks.pop()
                popped, stack[start:] = stack[start:], []
            if below:
                if len(stack) < below:
                    raise IndexError('stack underflow')
                popped, stack[-below:] = stack[-below:] + popped, []
            if name in _FILLS:  # the container below the items stays, now holding them
                if popped[0] in (_ATOM, _EMPTY_TUPLE) or popped[0].text is not None:
                    raise UnsafePickleError(f'the pickle applies {name} to a constant or a global')
                popped[0].contains(popped[1:])
                stack.append(popped[0])
                continue
            result = _Slot()
            if name in ('GLOBAL', 'INST', 'STACK_GLOBAL'):
                module, _, attribute = arg.partition(' ') if name != 'STACK_GLOBAL' else \
                    (popped[0].text, None, popped[1].text)
                if (module, attribute) in _REFUSED_GLOBALS:
                    raise UnsafePickleError(f'the pickle names {module}.{attribute}, which is never loaded')
                result.text = f'{module}.{attribute}'
            if name in ('REDUCE', 'NEWOBJ', 'NEWOBJ_EX') and not popped[1].is_tuple:
                raise UnsafePickleError('the pickle calls with arguments that are no tuple (unpacking them would '
                                        'iterate whatever they are)')
            if name == 'REDUCE' and popped[0].text in _CONSTRUCTORS and popped[1].holds_object:
                raise UnsafePickleError(f'the pickle builds a {popped[0].text} over an object it made (a tensor, '
                                        'say), which would be iterated')
            if name.startswith('TUPLE'):
                result.is_tuple = True
                result.nesting = 1 + max((slot.nesting for slot in popped), default=0)
                if result.nesting > MAX_NESTING:
                    raise UnsafePickleError(f'the pickle nests tuples deeper than {MAX_NESTING} levels')
            if name in _BUILDS:
                result.contains(popped)
            elif name not in ('GLOBAL', 'STACK_GLOBAL'):
                result.holds_object = True  # a call, a persistent id (storage) or a stand-in's state
            stack.extend([result] * pushed)
    except UnsafePickleError:
        raise
    except (ValueError, IndexError, KeyError) as error:  # what genops and the simulated stack raise
        raise UnsafePickleError(f'the pickle is malformed: {type(error).__name__}: {error}') from error


def read_pickled_module(path: str, nesting_keys: Tuple[str, ...] = (), archive_checked: bool = False
                        ) -> Tuple[Dict[str, torch.Tensor], str]:
    """Tensors (dotted names) and class name of the module pickled whole in ``path``, executing nothing.

    The module may be the file's root object or sit under one of ``nesting_keys`` of a root dict. Raises
    :class:`UnsafePickleError` for a file that is not torch's zip format (see :func:`check_torch_archive`), a
    pickle that asks for a call outside the allow-list or is malformed, and ValueError when it holds no pickled
    module. ``archive_checked``: the caller has just run :func:`check_torch_archive` on ``path``.
    """
    if not archive_checked:
        with open(path, 'rb') as handle:
            check_torch_archive(handle)
    root = torch.load(path, map_location='cpu', pickle_module=RESTRICTED_PICKLE, weights_only=False)
    candidates = [root] + [root.get(key) for key in nesting_keys] if type(root) in (dict, OrderedDict) else [root]
    module = next((c for c in candidates if is_pickled_module(c)), None)
    if module is None:
        raise ValueError(f'no pickled module found (the file holds {bounded_repr(root)})')
    return module_tensors(module), module.pickled_name
