"""Turn a model's ``nn.Linear`` / ``nn.LSTM`` / ``nn.Conv1d`` / ``nn.Conv2d`` layers into sparse
ones in place, and back."""

from __future__ import annotations

import contextlib
import fnmatch
import re
from collections.abc import Callable, Iterable, Iterator

from torch import nn

from msbp.config import SparseBackpropConfig
from msbp.nn.attention import SparseMultiheadAttention
from msbp.nn.conv import SparseConv1d, SparseConv2d
from msbp.nn.linear import SparseLinear
from msbp.nn.lstm import SparseLSTM
from msbp.ops.sparse_conv import PER_EXAMPLE_ERROR

Pattern = str | re.Pattern[str]
Filter = Pattern | Iterable[Pattern] | Callable[[str, nn.Module], bool] | None
ConfigFn = Callable[[str, nn.Module], SparseBackpropConfig | None]



def _matcher(patterns: Filter, what: str) -> Callable[[str, nn.Module], bool] | None:
    """A predicate on (qualified name, module): a ``str`` is a glob (``fnmatch``, case-sensitive)
    on the whole name, a compiled ``re.Pattern`` must ``fullmatch`` it; never both."""
    if patterns is None:
        return None
    if callable(patterns) and not isinstance(patterns, re.Pattern):
        return patterns
    if isinstance(patterns, str | re.Pattern):
        patterns = [patterns]
    globs: list[str] = []
    regexes: list[re.Pattern[str]] = []
    for pattern in patterns:
        if isinstance(pattern, str):
            globs.append(pattern)
        elif isinstance(pattern, re.Pattern):
            regexes.append(pattern)
        else:
            raise ValueError(
                f"{what} patterns must be glob strings or compiled re.Pattern objects, "
                f"got {pattern!r}"
            )

    def match(name: str, module: nn.Module) -> bool:
        return any(fnmatch.fnmatchcase(name, glob) for glob in globs) or any(
            regex.fullmatch(name) for regex in regexes
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
    config_fn: ConfigFn | None = None,
) -> nn.Module:
    """Replace every matching ``nn.Linear`` of ``model`` by a ``SparseLinear``, in place.

    ``include`` / ``exclude`` are matched against the module's qualified name
    (``"layers.0.fc1"``; the root is ``""``): a plain string is a glob on the whole name
    (``fnmatch``: ``"head.*"`` matches ``"head.1"``, not ``"headless"``; ``"output"`` only
    ``"output"``), a compiled regular expression (``re.compile(r"blocks\\.\\d+\\.fc1")``)
    must match the whole name (``fullmatch``), a list mixes both, and a callable
    ``(name, module) -> bool`` decides itself. Parameters are shared, not copied, so an optimizer
    built before the call keeps training them. Returns the model (a new module when the root
    itself is a Linear). Raises ``ValueError`` when no layer matched.

    ``nn.LSTM`` modules are converted too (to ``SparseLSTM``, sparsifying their input and
    recurrent transforms), and ``nn.Conv1d`` / ``nn.Conv2d`` (to ``SparseConv1d`` /
    ``SparseConv2d``, k of the output channels), filtered by name in the same way.
    ``nn.MultiheadAttention`` becomes a ``SparseMultiheadAttention`` (its q, k, v and output
    projections sparse; its ``out_proj`` is converted with it, never on its own).

    ``config_fn(name, module)``, instead of ``config``, gives each matching layer its own config,
    or ``None`` to leave it dense (e.g. another k for convolutions, no memory for attention
    projections); it is called once per module, with its first qualified name.

    Example:
        >>> model = nn.Sequential(nn.Linear(784, 500), nn.ReLU(), nn.Linear(500, 10))
        >>> model = sparsify(model, SparseBackpropConfig(ratio=0.04), exclude="2")
        >>> type(model[0]).__name__, type(model[2]).__name__
        ('SparseLinear', 'Linear')
    """
    if config is not None and config_fn is not None:
        raise ValueError(
            "sparsify takes config or config_fn, not both: let config_fn return the default "
            f"config for the layers it does not single out (got config={config!r})"
        )
    if config_fn is None:
        default = config if config is not None else SparseBackpropConfig()
        config_fn = lambda name, module: default  # noqa: E731
    keep = _matcher(include, "include")
    drop = _matcher(exclude, "exclude")

    def wanted(name: str, module: nn.Module) -> bool:
        return (keep is None or keep(name, module)) and not (
            drop is not None and drop(name, module)
        )

    configs: dict[int, SparseBackpropConfig | None] = {}
    chosen = []
    for name, module in model.named_modules(remove_duplicate=False):
        # exact types: not subclasses with other semantics
        if type(module) not in _SPARSE_OF or not wanted(name, module):
            continue
        if id(module) not in configs:
            cfg = configs[id(module)] = config_fn(name, module)
            if cfg is not None and not isinstance(cfg, SparseBackpropConfig):
                raise ValueError(
                    f"config_fn must return a SparseBackpropConfig or None, got {cfg!r} for "
                    f"{name or '<root>'!r}"
                )
        if configs[id(module)] is not None:
            chosen.append((name, module))
    if not chosen:
        def names(kind: type | tuple[type, ...]) -> list[str]:
            return [n or "<root>" for n, m in model.named_modules() if isinstance(m, kind)]

        convs = names((nn.Conv1d, nn.Conv2d))
        rnns = names(nn.LSTM)
        raise ValueError(
            f"sparsify matched no nn.Linear (include={include!r}, exclude={exclude!r}"
            + (", every match left dense by config_fn" if configs else "")
            + f"); the model's linear layers are: {names(nn.Linear)}"
            + (f"; its LSTM layers are: {rnns}" if rnns else "")
            + (f"; its convolutions are: {convs}" if convs else "")
        )
    for name, module in chosen:
        if isinstance(module, nn.LSTM) and module.proj_size:
            raise ValueError(
                f"sparsify cannot convert LSTM {name or '<root>'!r} with proj_size="
                f"{module.proj_size}; exclude it"
            )
        cfg = configs[id(module)]
        if isinstance(module, nn.Conv1d | nn.Conv2d) and cfg.selection == "per_example":
            raise ValueError(
                f"sparsify cannot convert {type(module).__name__} {name or '<root>'!r} with "
                f"selection='per_example': {PER_EXAMPLE_ERROR}"
            )
    return _replace(
        model, chosen,
        lambda module: _SPARSE_OF[type(module)].from_dense(module, configs[id(module)]),
        name_them=True,
    )


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


def densify(model: nn.Module) -> nn.Module:
    """Replace every sparse layer (``SparseLinear``, ``SparseLSTM``, ``SparseConv1d``,
    ``SparseConv2d``, ``SparseMultiheadAttention``) by its plain counterpart sharing its
    parameters. The memory is dropped. Returns the model (a new module when the root itself was
    sparse).
    """
    chosen = [
        (name, module)
        for name, module in model.named_modules(remove_duplicate=False)
        if isinstance(module, _SPARSE_TYPES)
    ]
    # an attention module's out_proj goes back with it (as its NonDynamicallyQuantizableLinear)
    owners = [n for n, m in chosen if isinstance(m, SparseMultiheadAttention)]

    def inside_attention(name: str) -> bool:
        return any(name != a and (a == "" or name.startswith(a + ".")) for a in owners)

    chosen = [(n, m) for n, m in chosen if not inside_attention(n)]
    return _replace(model, chosen, lambda module: module.to_dense())


@contextlib.contextmanager
def dense_backward(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, every sparse layer (linear, LSTM, convolution, attention) of ``model``
    computes with plain PyTorch ops, as its dense counterpart would: a forward here builds a
    graph whose backward is exact dense backprop, whenever that backward runs.

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
    layers = [m for m in model.modules() if isinstance(m, _SPARSE_TYPES)]
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
_SPARSE_OF: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: SparseLinear,
    nn.LSTM: SparseLSTM,
    nn.Conv1d: SparseConv1d,
    nn.Conv2d: SparseConv2d,
    nn.MultiheadAttention: SparseMultiheadAttention,
}
_SPARSE_TYPES = (SparseLinear, SparseLSTM, SparseConv1d, SparseConv2d, SparseMultiheadAttention)
