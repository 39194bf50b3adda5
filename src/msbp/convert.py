"""Turn a model's ``nn.Linear`` layers into ``SparseLinear`` in place, and back."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable

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
    recurrent transforms), filtered by name in the same way; see ``_sparsify_lstms``.

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
        if type(module) is nn.Linear  # not subclasses with other semantics, nor SparseLinear
        and (keep is None or keep(name, module))
        and not (drop is not None and drop(name, module))
    ]
    lstms = _chosen_lstms(model, keep, drop)
    if not chosen and not lstms:
        linears = [n or "<root>" for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        rnns = [n or "<root>" for n, m in model.named_modules() if isinstance(m, nn.LSTM)]
        raise ValueError(
            f"sparsify matched no nn.Linear (include={include!r}, exclude={exclude!r}); "
            f"the model's linear layers are: {linears}"
            + (f"; its LSTM layers are: {rnns}" if rnns else "")
        )
    if lstms:
        root = _sparsify_lstms(model, lstms, config)
        if root is not None:
            return keep_memory_local(root)
    converted: dict[int, SparseLinear] = {}  # a layer shared under two names stays shared
    for name, module in chosen:
        new = converted.get(id(module))
        if new is None:
            new = converted[id(module)] = SparseLinear.from_dense(module, config)
            new.name = name
        if name == "":
            return keep_memory_local(new)
        _swap(model, name, new)
    return keep_memory_local(model)


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
    """Replace every ``SparseLinear`` by a plain ``nn.Linear`` sharing its parameters.

    The memory is dropped. Returns the model (a new module when the root is a SparseLinear).
    ``SparseLSTM`` modules become plain ``nn.LSTM`` the same way.
    """
    if isinstance(model, SparseLinear | SparseLSTM):
        return model.to_dense()
    _densify_lstms(model)
    converted: dict[int, nn.Linear] = {}
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if isinstance(module, SparseLinear):
            new = converted.get(id(module))
            if new is None:
                new = converted[id(module)] = module.to_dense()
            _swap(model, name, new)
    return model


# -- LSTM support (sparsify converts nn.LSTM into SparseLSTM) --------------------------------


def _chosen_lstms(model: nn.Module, keep, drop) -> list[tuple[str, nn.LSTM]]:
    """The ``nn.LSTM`` modules (exact type) that pass the include / exclude filters."""
    chosen = [
        (name, module)
        for name, module in model.named_modules(remove_duplicate=False)
        if type(module) is nn.LSTM
        and (keep is None or keep(name, module))
        and not (drop is not None and drop(name, module))
    ]
    for name, module in chosen:
        if module.proj_size:
            raise ValueError(
                f"sparsify cannot convert LSTM {name or '<root>'!r} with proj_size="
                f"{module.proj_size}; exclude it"
            )
    return chosen


def _sparsify_lstms(
    model: nn.Module, chosen: list[tuple[str, nn.LSTM]], config: SparseBackpropConfig
) -> nn.Module | None:
    """Swap the chosen LSTMs for ``SparseLSTM``s in place; returns the new root if it was one."""
    converted: dict[int, SparseLSTM] = {}
    for name, module in chosen:
        new = converted.get(id(module))
        if new is None:
            new = converted[id(module)] = SparseLSTM.from_dense(module, config)
            new.name = name
        if name == "":
            return new
        _swap(model, name, new)
    return None


def _densify_lstms(model: nn.Module) -> None:
    converted: dict[int, nn.LSTM] = {}
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if isinstance(module, SparseLSTM):
            new = converted.get(id(module))
            if new is None:
                new = converted[id(module)] = module.to_dense()
            _swap(model, name, new)
