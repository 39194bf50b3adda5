"""Whether the sparse layers of a sparsified model run: ``check_sparsified``.

``sparsify`` replaces modules; it cannot see the code that uses them. A model whose forward
passes a layer's weight to a functional call (``F.linear(x, self.qkv.weight, bias)``) and never
calls the layer trains that weight densely whatever the layer is: its sparse backward never runs.
``sparsify`` knows the libraries that do so (timm, torchvision, peft) and leaves those layers
dense; for any other code, ``check_sparsified`` runs the model once and says what happened.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode, resolve_name
from torch.utils._pytree import tree_leaves

from msbp.convert import _SPARSE_TYPES


@dataclass
class SparsifyCheck:
    """What one forward of a sparsified model did with its sparse layers (by qualified name).

    ``ran``: layers whose own forward ran (or whose parameters the sparse module around them
    used in its forward, as ``SparseMultiheadAttention`` may use its ``out_proj``'s).
    ``bypassed``: layers whose forward never ran while other code used their parameters (name ->
    the functions it passed them to): their sparse backward never runs, their weights train
    densely. ``shared``: layers that ran and whose parameters other code also used (a tied
    embedding, a penalty on the weight: the layer's gradient gets a dense part there).
    ``unused``: layers this forward did not touch at all (a branch not taken, a head only used in
    training). ``ok``: nothing bypassed.
    """

    ran: list[str] = field(default_factory=list)
    bypassed: dict[str, list[str]] = field(default_factory=dict)
    shared: dict[str, list[str]] = field(default_factory=dict)
    unused: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.bypassed

    def __str__(self) -> str:
        lines = [
            f"check_sparsified: {len(self.ran)} ran, {len(self.bypassed)} bypassed, "
            f"{len(self.shared)} also used elsewhere, {len(self.unused)} unused"
        ]
        for name, funcs in self.bypassed.items():
            lines.append(f"  bypassed  {name or '<root>'}: never called; its parameters went to "
                         f"{', '.join(funcs)} (its weights train densely)")
        for name, funcs in self.shared.items():
            lines.append(f"  shared    {name or '<root>'}: its parameters also went to "
                         f"{', '.join(funcs)} outside it")
        for name in self.unused:
            lines.append(f"  unused    {name or '<root>'}")
        return "\n".join(lines)


class _Watch(TorchFunctionMode):
    """Records which watched parameters reach a torch function while none of the sparse
    modules allowed to use them is running."""

    def __init__(
        self, owner: dict[int, str], allowed: dict[str, set[str]], active: dict[str, int]
    ) -> None:
        super().__init__()
        self.owner, self.allowed, self.active = owner, allowed, active
        self.outside: dict[str, list[str]] = {}
        self.by_owner: set[str] = set()  # used inside a sparse module around them

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for leaf in tree_leaves((args, kwargs)):
            name = self.owner.get(id(leaf)) if isinstance(leaf, torch.Tensor) else None
            if name is None or self.active.get(name):
                continue
            if any(self.active.get(a) for a in self.allowed[name]):
                self.by_owner.add(name)
            else:
                funcs = self.outside.setdefault(name, [])
                what = resolve_name(func) or getattr(func, "__name__", repr(func))
                if what not in funcs:
                    funcs.append(what)
        return func(*args, **kwargs)


def check_sparsified(model: nn.Module, *args: Any, **kwargs: Any) -> SparsifyCheck:
    """Run ``model(*args, **kwargs)`` once and report, for every sparse layer, whether its own
    forward ran and whether other code used its parameters (see ``SparsifyCheck``).

    The forward runs under ``torch.no_grad()`` in eval mode (the modules' training flags are
    restored after), so no memory, gradient or running statistic changes; a layer used only in
    training mode is reported unused. Pass the eager model, not a ``torch.compile`` wrapper
    (compiled code does not call the modules one by one).

    Example:
        >>> model = msbp.sparsify(MyModel(), msbp.SparseBackpropConfig(ratio=0.05))
        >>> report = msbp.check_sparsified(model, example_batch)
        >>> assert report.ok, report
    """
    sparse = [(n, m) for n, m in model.named_modules() if isinstance(m, _SPARSE_TYPES)]
    owner: dict[int, str] = {}
    allowed: dict[str, set[str]] = {}
    for name, module in sparse:
        for param in module.parameters(recurse=False):
            owner[id(param)] = name
        # the layer itself, or a sparse module around it (SparseMultiheadAttention passes its
        # out_proj's weight on in its own forward)
        allowed[name] = {n for n, _ in sparse if n == name or n == "" or name.startswith(n + ".")}
    active: dict[str, int] = {}
    ran: set[str] = set()
    handles = []
    for name, module in sparse:
        def enter(mod, inputs, name=name):
            active[name] = active.get(name, 0) + 1
            ran.add(name)

        def leave(mod, inputs, output, name=name):
            active[name] -= 1

        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave))
    training = {id(m): m.training for m in model.modules()}
    watch = _Watch(owner, allowed, active)
    try:
        model.eval()
        with torch.no_grad(), watch:
            model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
        for module in model.modules():
            module.training = training[id(module)]
    report = SparsifyCheck()
    for name, _ in sparse:
        used = watch.outside.get(name)
        if name in ran or name in watch.by_owner:
            report.ran.append(name)
            if used:
                report.shared[name] = used
        elif used:
            report.bypassed[name] = used
        else:
            report.unused.append(name)
    return report
