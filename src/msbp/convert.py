"""Turn a model's ``nn.Linear`` / ``nn.LSTM`` layers into sparse ones in place, and back."""

from __future__ import annotations

import contextlib
import fnmatch
import re
from collections.abc import Callable, Iterable, Iterator

from torch import nn

from msbp.config import SparseBackpropConfig
from msbp.nn.linear import SparseLinear
from msbp.nn.lstm import SparseLSTM

Filter = str | Iterable[str] | Callable[[str, nn.Module], bool] | None


def _matcher(patterns: Filter, what: str) -> Callable[[str, nn.Module], bool] | None:
    if patterns is None:
        return None
    if callable(patterns):
        return patterns
    if isinstance(patterns, str):
        patterns = [patterns]
    compiled = []
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise ValueError(f"{what} patterns must be strings, got {pattern!r}")
        try:
            regex = re.compile(pattern)
        except re.error:
            regex = None
        compiled.append((pattern, regex))

    def match(name: str, module: nn.Module) -> bool:
        return any(
            fnmatch.fnmatchcase(name, glob) or (regex is not None and regex.fullmatch(name))
            for glob, regex in compiled
        )

    return match


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def sparsify(
    model: nn.Module,
    config: SparseBackpropConfig | None = None,
    *,
    include: Filter = None,
    exclude: Filter = None,
) -> nn.Module:
    """Replace every matching ``nn.Linear`` of ``model`` by a ``SparseLinear``, in place.

    ``include`` / ``exclude`` take glob patterns or regular expressions matched against the
    module's qualified name (``"layers.0.fc1"``; the root is ``""``), or a callable
    ``(name, module) -> bool``. Parameters are shared, not copied, so an optimizer built before
    the call keeps training them. Returns the model (a new module when the root itself is a
    Linear). Raises ``ValueError`` when no layer matched.

    ``nn.LSTM`` modules are converted too (to ``SparseLSTM``, sparsifying their input and
    recurrent transforms), filtered by name in the same way.

    Example:
        >>> model = nn.Sequential(nn.Linear(784, 500), nn.ReLU(), nn.Linear(500, 10))
        >>> model = sparsify(model, SparseBackpropConfig(ratio=0.04), exclude="2")
        >>> type(model[0]).__name__, type(model[2]).__name__
        ('SparseLinear', 'Linear')
    """
    config = config if config is not None else SparseBackpropConfig()
    keep = _matcher(include, "include")
    drop = _matcher(exclude, "exclude")
    chosen = [
        (name, module)
        for name, module in model.named_modules(remove_duplicate=False)
        if type(module) in _SPARSE_OF  # exact types: not subclasses with other semantics
        and (keep is None or keep(name, module))
        and not (drop is not None and drop(name, module))
    ]
    if not chosen:
        linears = [n or "<root>" for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        rnns = [n or "<root>" for n, m in model.named_modules() if isinstance(m, nn.LSTM)]
        raise ValueError(
            f"sparsify matched no nn.Linear (include={include!r}, exclude={exclude!r}); "
            f"the model's linear layers are: {linears}"
            + (f"; its LSTM layers are: {rnns}" if rnns else "")
        )
    for name, module in chosen:
        if isinstance(module, nn.LSTM) and module.proj_size:
            raise ValueError(
                f"sparsify cannot convert LSTM {name or '<root>'!r} with proj_size="
                f"{module.proj_size}; exclude it"
            )
    root = _replace(
        model, chosen, lambda module: _SPARSE_OF[type(module)].from_dense(module, config),
        name_them=True,
    )
    return keep_memory_local(root)


def _replace(
    model: nn.Module,
    chosen: list[tuple[str, nn.Module]],
    convert: Callable[[nn.Module], nn.Module],
    name_them: bool = False,
) -> nn.Module:
    """Swap every chosen module for ``convert(module)`` in place; returns the (new) root.

    A module shared under several names is converted once and stays shared.
    """
    converted: dict[int, nn.Module] = {}
    root = model
    for name, module in chosen:
        new = converted.get(id(module))
        if new is None:
            new = converted[id(module)] = convert(module)
            if name_them:
                new.name = name
        if name == "":
            root = new
        else:
            _swap(model, name, new)
    return root


def keep_memory_local(model: nn.Module) -> nn.Module:
    """Tell ``DistributedDataParallel`` to leave every sparse layer's memory alone.

    Each process remembers what its own backward did not propagate; DDP's default
    ``broadcast_buffers=True`` would overwrite that with rank 0's memory at every forward.
    ``sparsify`` calls this; call it again after adding sparse layers by hand. Returns ``model``.
    """
    from torch.nn.parallel import DistributedDataParallel

    names = [
        f"{prefix}.{buf}" if prefix else buf
        for prefix, module in model.named_modules()
        if isinstance(module, SparseLinear | SparseLSTM)
        for buf, _ in module.named_buffers(recurse=False)
        if buf.startswith("memory")
    ]
    already = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []))
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        model, already + [n for n in names if n not in already]
    )
    return model


def densify(model: nn.Module) -> nn.Module:
    """Replace every ``SparseLinear`` / ``SparseLSTM`` by a plain ``nn.Linear`` / ``nn.LSTM``
    sharing its parameters. The memory is dropped. Returns the model (a new module when the root
    itself was sparse).
    """
    chosen = [
        (name, module)
        for name, module in model.named_modules(remove_duplicate=False)
        if isinstance(module, SparseLinear | SparseLSTM)
    ]
    return _replace(model, chosen, lambda module: module.to_dense())


@contextlib.contextmanager
def dense_backward(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, every ``SparseLinear`` / ``SparseLSTM`` of ``model`` computes with plain
    PyTorch ops, as its dense counterpart would: a forward here builds a graph whose backward is
    exact dense backprop, whenever that backward runs.

    Nothing of sparse training is touched by such a pass: not the memory, not the layers'
    information-loss probes, not the touched-rows log of ``msbp.optim.LazyRowAdam``, not the
    random-selection generator; with ``torch.autograd.grad`` not ``.grad`` either. The forward
    values are the same as the sparse layers' (both are exact). Used by ``msbp.info`` to get the
    true dense gradient of a training step. Not thread-safe: it flags the modules themselves.

    Example:
        >>> model = sparsify(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)),
        ...                  SparseBackpropConfig(k=1), exclude="2")
        >>> x = torch.randn(3, 4)
        >>> with dense_backward(model):
        ...     (dw,) = torch.autograd.grad(model(x).sum(), [model[0].weight])
        >>> int((dw.abs().sum(1) > 0).sum()) > 1  # more than k rows: dense
        True
    """
    layers = [m for m in model.modules() if isinstance(m, SparseLinear | SparseLSTM)]
    before = [layer.__dict__.get("dense_mode") for layer in layers]
    for layer in layers:
        layer.dense_mode = True
    try:
        yield model
    finally:
        for layer, was in zip(layers, before, strict=True):
            if was is None:
                del layer.dense_mode  # back to the class default
            else:
                layer.dense_mode = was


#: the sparse module that ``sparsify`` puts in place of each dense type
_SPARSE_OF: dict[type[nn.Module], type[SparseLinear] | type[SparseLSTM]] = {
    nn.Linear: SparseLinear,
    nn.LSTM: SparseLSTM,
}
