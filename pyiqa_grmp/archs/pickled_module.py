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
  of anything outside that allow-list, e.g. a ``__reduce__`` to ``os.system``.

The module tree is then walked through the stand-ins' ``_parameters`` / ``_buffers`` / ``_modules`` and the
tensors are returned under their dotted ``state_dict`` names. Only torch's zip format is read (every
``torch.save`` since torch 1.6); TorchScript archives are refused, as they would be handed to ``torch.jit``.
"""
from __future__ import annotations

import _compat_pickle
import pickle
import types
import zipfile
from collections import OrderedDict
from typing import Any, Callable, Dict, Mapping, Tuple

import torch


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle asks for something the restricted reader will not do (a call outside the allow-list)."""


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

    # Container opcodes (APPENDS / SETITEMS) on an unknown class only record what they add.
    def append(self, item: Any) -> None:
        self.pickled_items.append(item)

    def extend(self, items: Any) -> None:
        self.pickled_items.extend(items)

    def __setitem__(self, key: Any, value: Any) -> None:
        self.pickled_items.append((key, value))

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
        raise UnsafePickleError(f'a tensor subclass rebuilt by {func!r} as {new_type!r} is not allowed')
    return func(*args)


def _require_tensor(value: Any) -> torch.Tensor:
    if not torch.is_tensor(value):
        raise UnsafePickleError(f'expected a tensor, got {value!r}')
    return value


#: (module, name) -> what the reader returns and may call in REDUCE.
_CALLABLES: Dict[Tuple[str, str], Callable] = {
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter_with_state,
    ('torch._tensor', '_rebuild_from_type_v2'): _rebuild_from_type,
    ('collections', 'OrderedDict'): OrderedDict,
    ('builtins', 'set'): set,
    ('builtins', 'frozenset'): frozenset,
    ('torch', 'Size'): torch.Size,
    ('torch', 'device'): torch.device,
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


def _describe(value: Any) -> str:
    if isinstance(value, type) and issubclass(value, StandIn):
        return value.pickled_name
    if isinstance(value, StandIn):
        return f'an instance of {value.pickled_name}'
    return getattr(value, '__qualname__', None) or type(value).__name__


def _describe_args(args: Any) -> str:
    text = repr(args)
    return f' with arguments {text[:120]}{"..." if len(text) > 120 else ""}'


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
    return isinstance(state, Mapping) and '_parameters' in state and '_modules' in state


def module_tensors(module: StandIn) -> Dict[str, torch.Tensor]:
    """The persistent parameters and buffers of a pickled module tree, under their ``state_dict`` names."""
    tensors: Dict[str, torch.Tensor] = {}
    on_path: set = set()

    def visit(node: StandIn, prefix: str) -> None:
        if id(node) in on_path:
            raise UnsafePickleError(f'the module tree loops back on itself at {prefix[:-1]!r}')
        on_path.add(id(node))
        state = node.pickled_state
        non_persistent = state.get('_non_persistent_buffers_set') or ()
        entries = [*(state.get('_parameters') or {}).items(),
                   *((k, v) for k, v in (state.get('_buffers') or {}).items() if k not in non_persistent)]
        for name, tensor in entries:
            if tensor is not None:
                if not torch.is_tensor(tensor):
                    raise UnsafePickleError(f'{prefix}{name} of {node.pickled_name} is {tensor!r}, not a tensor')
                tensors[prefix + name] = tensor.detach()
        for name, child in (state.get('_modules') or {}).items():
            if child is None:
                continue
            if not is_pickled_module(child):
                raise UnsafePickleError(f'{prefix}{name} of {node.pickled_name} is {child!r}, not a module')
            visit(child, f'{prefix}{name}.')
        on_path.discard(id(node))

    visit(module, '')
    return tensors


def read_pickled_module(path: str, nesting_keys: Tuple[str, ...] = ()) -> Tuple[Dict[str, torch.Tensor], str]:
    """Tensors (dotted names) and class name of the module pickled whole in ``path``, executing nothing.

    The module may be the file's root object or sit under one of ``nesting_keys`` of a root dict. Raises
    :class:`UnsafePickleError` for a pickle that asks for a call outside the allow-list, ValueError when the
    file is not torch's zip format, is a TorchScript archive, or holds no pickled module.
    """
    if not zipfile.is_zipfile(path):
        raise ValueError('not a torch zip archive (only the format of torch.save since torch 1.6 is read)')
    with zipfile.ZipFile(path) as archive:
        if any(name.rpartition('/')[2] == 'constants.pkl' for name in archive.namelist()):
            raise ValueError('a TorchScript archive, which is never loaded (it would be handed to torch.jit)')
    root = torch.load(path, map_location='cpu', pickle_module=RESTRICTED_PICKLE, weights_only=False)
    candidates = [root] + [root.get(key) for key in nesting_keys] if isinstance(root, Mapping) else [root]
    module = next((c for c in candidates if is_pickled_module(c)), None)
    if module is None:
        found = _describe(root) if not isinstance(root, Mapping) else f'a dict with keys {sorted(map(str, root))}'
        raise ValueError(f'no pickled module found (the file holds {found})')
    return module_tensors(module), module.pickled_name
