"""Turn a model's ``nn.Linear`` / ``nn.LSTM`` / ``nn.Conv1d`` / ``nn.Conv2d`` /
``nn.MultiheadAttention`` layers (and transformers' ``Conv1D``) into sparse ones in place, and
back; and report what was converted and what was left dense, and why."""

from __future__ import annotations

import contextlib
import fnmatch
import re
import sys
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

from msbp.config import SparseBackpropConfig
from msbp.nn.attention import SparseMultiheadAttention
from msbp.nn.conv import SparseConv1d, SparseConv2d
from msbp.nn.hf_conv1d import SparseHFConv1D, is_hf_conv1d
from msbp.nn.linear import SparseLinear
from msbp.nn.lstm import SparseLSTM
from msbp.nn.memory import MemoryMixin
from msbp.ops.sparse_conv import PER_EXAMPLE_ERROR
from msbp.ops.touched_rows import WEIGHT_TIED

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


def _listed(patterns: Filter) -> Filter:
    """``patterns`` with an iterable of patterns (a generator, say) made a list."""
    if patterns is None or isinstance(patterns, str | re.Pattern) or callable(patterns):
        return patterns
    return list(patterns)


def _warn_unmatched(model: nn.Module, patterns: Filter, what: str, names: list[str]) -> None:
    """Warn about each glob or regex of ``include`` / ``exclude`` that matched none of ``names``
    (the layers'): a typo, or a container's name (``exclude="head"`` for the ``head.0`` and
    ``head.1`` inside it) would otherwise leave the layers it meant converted, or dense, silently.
    """
    if patterns is None or (callable(patterns) and not isinstance(patterns, re.Pattern)):
        return
    for pattern in [patterns] if isinstance(patterns, str | re.Pattern) else patterns:
        matches = _matcher(pattern, what)
        if any(matches(name, None) for name in names):
            continue
        container = next((n for n, _ in model.named_modules() if matches(n, None)), None)
        hint = ""
        if container is not None:
            hint = f" (it names {container!r}, which holds layers but is not one"
            hint += f": {container + '.*'!r} matches those)" if container else ")"
        shown = ", ".join(repr(n) for n in names[:8]) + (", ..." if len(names) > 8 else "")
        warnings.warn(
            f"sparsify: {what} pattern {_pattern_text(pattern)} matched no layer{hint}; "
            f"patterns match a layer's whole qualified name, and the layers are: {shown or 'none'}",
            UserWarning, stacklevel=4,
        )


def _pattern_text(pattern: str | re.Pattern) -> str:
    return repr(pattern) if isinstance(pattern, str) else f"re.compile({pattern.pattern!r})"


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


#: why ``sparsify`` left a layer dense (``SparsifyReport.dense``); the first three are the
#: caller's choice, the rest are layers msbp cannot convert (these also raise a warning)
EXCLUDED = "excluded"
NOT_INCLUDED = "not included"
CONFIG_FN_NONE = "config_fn returned None"
PROJ_SIZE = "proj_size is not supported: SparseLSTM has no projection"
NO_COUNTERPART = "no sparse counterpart in msbp"
LAZY = "lazy module not initialised: run one forward before sparsify"
FORWARD_REPLACED = (
    "its forward is replaced on the instance (e.g. by accelerate's hooks), which a new module "
    "would not have"
)
LORA_ADAPTER = (
    "a peft LoRA adapter: rank-r products gain nothing from sparse backprop and lose gradient "
    "rows (sparsify converts it only where include names it)"
)
_CHOSEN_DENSE = (EXCLUDED, NOT_INCLUDED, CONFIG_FN_NONE, LORA_ADAPTER)

#: layers with weights like a linear layer's for which msbp has no sparse module
_NO_COUNTERPART_TYPES: tuple[type[nn.Module], ...] = (
    nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.GRU, nn.RNN,
    nn.LSTMCell, nn.GRUCell, nn.RNNCell, nn.Bilinear,
)
#: the dense types sparsify converts (exact types), for naming the base of a skipped subclass
_FAMILIES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.LSTM, nn.MultiheadAttention)

# Model libraries, by qualified class name (nothing imported):
#: subclasses whose forward is their base's, converted like it (densify gives the base back);
#: timm's Linear differs only under TorchScript
_SAME_FORWARD_AS: dict[str, type[nn.Module]] = {"timm.layers.linear.Linear": nn.Linear}
#: modules that hand these children's weights to a functional call instead of calling them: the
#: children would be reported converted and never run sparse
_FUNCTIONAL_CHILDREN: dict[str, tuple[str, ...]] = {
    "torchvision.models.swin_transformer.ShiftedWindowAttention": ("qkv", "proj"),
    "torchvision.models.swin_transformer.ShiftedWindowAttentionV2": ("qkv", "proj"),
}
#: timm attention modules (BEiT, EVA, SwinV2) compute ``F.linear(x, qkv.weight, qkv_bias)``
#: unless this switch of theirs is set, which calls ``qkv(x)`` and adds the bias after
_TIMM_QKV_SWITCH = "qkv_bias_separate"
#: on an attention module whose switch sparsify set (densify unsets it)
_QKV_SWITCHED = "_msbp_set_qkv_bias_separate"


def _qualname(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def _same_forward_base(module: nn.Module) -> type[nn.Module] | None:
    return _SAME_FORWARD_AS.get(_qualname(module))


def _functional_children(model: nn.Module) -> dict[str, str]:
    """{qualified name: why} of the layers whose weight their parent uses without calling them."""
    out = {}
    for name, module in model.named_modules():
        for child in _FUNCTIONAL_CHILDREN.get(_qualname(module), ()):
            out[f"{name}.{child}" if name else child] = (
                f"{type(module).__qualname__} passes its weight to a functional call and never "
                "calls the layer: a sparse one would never run"
            )
    return out


@dataclass(frozen=True)
class LayerReport:
    """What ``sparsify`` did with one layer.

    ``status`` is ``"converted"`` (dense -> sparse), ``"reconfigured"`` (an already sparse layer
    given the new config), ``"dense"`` (left dense; ``detail`` says why) or ``"unchanged"`` (an
    already sparse layer that was not matched, or whose ``config_fn`` returned None).
    ``name`` is the qualified name (``""`` is the root); ``kind`` the class found there.
    """

    name: str
    kind: str
    status: str
    detail: str


@dataclass
class SparsifyReport:
    """What ``sparsify`` converted, reconfigured and left dense, naming every layer of the
    kinds it knows (``nn.Linear``, ``nn.Conv1d``/``Conv2d``, ``nn.LSTM``,
    ``nn.MultiheadAttention``, transformers' ``Conv1D``, their subclasses, and linear-like
    layers it has no sparse module for: ``nn.GRU``, ``nn.RNN``, ``nn.Conv3d``, transposed
    convolutions, ``nn.Bilinear``, RNN cells). The projections inside an attention module are
    reported with it. ``str(report)`` is a readable table; ``sparsify`` leaves the report of its
    last call in ``model.sparsify_report``.
    """

    layers: list[LayerReport] = field(default_factory=list)

    def _names(self, status: str) -> list[str]:
        return [entry.name for entry in self.layers if entry.status == status]

    @property
    def converted(self) -> list[str]:
        """Names of the layers converted to sparse ones, in module order."""
        return self._names("converted")

    @property
    def reconfigured(self) -> list[str]:
        """Names of the already sparse layers given the new config."""
        return self._names("reconfigured")

    @property
    def dense(self) -> dict[str, str]:
        """Name -> why, for every layer left dense."""
        return {e.name: e.detail for e in self.layers if e.status == "dense"}

    @property
    def unchanged(self) -> dict[str, str]:
        """Name -> why, for the sparse layers left as they were."""
        return {e.name: e.detail for e in self.layers if e.status == "unchanged"}

    @property
    def unsupported(self) -> dict[str, str]:
        """The part of ``dense`` that msbp cannot convert (not the caller's choice)."""
        return {n: why for n, why in self.dense.items() if why not in _CHOSEN_DENSE}

    def __str__(self) -> str:
        counts = {s: len(self._names(s)) for s in ("converted", "reconfigured", "dense")}
        lines = [
            f"sparsify: {counts['converted']} converted, {counts['reconfigured']} reconfigured, "
            f"{counts['dense']} left dense"
            + (f", {len(self.unchanged)} sparse unchanged" if self.unchanged else "")
        ]
        label = {"converted": "converted", "reconfigured": "reconfigured",
                 "dense": "left dense", "unchanged": "unchanged"}
        width = max((len(e.name or "<root>") for e in self.layers), default=0)
        for e in self.layers:
            lines.append(
                f"  {label[e.status]:<12} {e.name or '<root>':<{width}}  {e.kind}: {e.detail}"
            )
        return "\n".join(lines)


def _describe(module: nn.Module) -> str:
    units = module._memory_units()
    return f"{type(module).__name__} (k={module.k} of {units})"


def _unsupported(module: nn.Module) -> str | None:
    """Why msbp cannot convert this linear-like layer, or None if it is not one."""
    if isinstance(module, LazyModuleMixin):
        return LAZY
    if type(module) is nn.LSTM and module.proj_size:
        return PROJ_SIZE
    if "forward" in vars(module) and _convertible(module):
        return FORWARD_REPLACED
    computed = [n for n in _weight_names(module) if not isinstance(
        module._parameters.get(n), nn.Parameter
    )]
    if computed:
        return (
            f"{', '.join(computed)} not a Parameter of its own but computed (e.g. by "
            "torch.nn.utils.prune or the deprecated weight_norm / spectral_norm; the "
            "torch.nn.utils.parametrizations versions are reported as subclasses)"
        )
    for base in _FAMILIES:
        if isinstance(module, base) and type(module) is not base and not (
            _same_forward_base(module)
        ):
            cls = type(module)
            return (
                f"subclass {cls.__module__}.{cls.__qualname__} of nn.{base.__name__}: not "
                "converted, its forward or attributes may differ"
            )
    if isinstance(module, _NO_COUNTERPART_TYPES) or (
        type(module).__name__ == "Conv1D" and not is_hf_conv1d(module)
        and any(c.__name__ == "Conv1D" and c.__module__ == "transformers.pytorch_utils"
                for c in type(module).__mro__)
    ):
        return NO_COUNTERPART
    return None


def _lora_adapter(model: nn.Module, name: str) -> bool:
    """Whether ``name`` is one of peft's LoRA adapters (``<layer>.lora_A.<adapter>``)."""
    parts = name.split(".")
    if len(parts) < 3 or parts[-2] not in ("lora_A", "lora_B"):
        return False
    owner = model.get_submodule(".".join(parts[:-2]))
    return type(owner).__module__.startswith("peft.")


def _weight_names(module: nn.Module) -> list[str]:
    """The weights a sparse counterpart takes over as Parameters, for the types it converts."""
    if type(module) is nn.LSTM:
        return list(module._flat_weights_names)
    if type(module) is nn.MultiheadAttention:
        if module._qkv_same_embed_dim:
            return ["in_proj_weight"]
        return ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
    return ["weight"] if _convertible(module) else []


def _convertible(module: nn.Module) -> bool:
    return type(module) in _SPARSE_OF or is_hf_conv1d(module) or bool(_same_forward_base(module))


def _sparse_class(module: nn.Module) -> type[nn.Module]:
    if is_hf_conv1d(module):
        return SparseHFConv1D
    return _SPARSE_OF[_same_forward_base(module) or type(module)]


def sparsify(
    model: nn.Module,
    config: SparseBackpropConfig | None = None,
    *,
    include: Filter = None,
    exclude: Filter = None,
    config_fn: ConfigFn | None = None,
    verbose: bool = False,
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
    projections sparse; its ``out_proj`` is converted with it, never on its own), and
    transformers' ``Conv1D`` (GPT-2's linear layer, weight (in, out)) a ``SparseHFConv1D``.

    ``config_fn(name, module)``, instead of ``config``, gives each matching layer its own config,
    or ``None`` to leave it dense (e.g. another k for convolutions, no memory for attention
    projections); it is called once per module, with its first qualified name.

    Already sparse layers that match are reconfigured in place with their new config (their
    memory kept, converted or cleared as ``MemoryMixin.reconfigure`` says), so calling
    ``sparsify`` again changes k or the memory of a sparsified model.

    What was converted, reconfigured and left dense, and why, is in the ``SparsifyReport`` left
    in ``model.sparsify_report`` (printed with ``verbose=True``); layers left dense that msbp
    cannot convert (subclasses, ``proj_size`` LSTMs, GRUs, ...) raise a ``UserWarning`` naming
    them. On a transformers model the per-layer configs are recorded in ``model.config.msbp``
    (saved by ``save_pretrained``; see ``msbp.from_pretrained``).

    Example:
        >>> model = nn.Sequential(nn.Linear(784, 500), nn.ReLU(), nn.Linear(500, 10))
        >>> model = sparsify(model, SparseBackpropConfig(ratio=0.04), exclude="2")
        >>> type(model[0]).__name__, type(model[2]).__name__
        ('SparseLinear', 'Linear')
        >>> model.sparsify_report.dense
        {'2': 'excluded'}
    """
    return _sparsify(model, config, include, exclude, config_fn, verbose, restoring=False)


def _sparsify(
    model: nn.Module,
    config: SparseBackpropConfig | None,
    include: Filter,
    exclude: Filter,
    config_fn: ConfigFn | None,
    verbose: bool,
    restoring: bool,
) -> nn.Module:
    if config is not None and config_fn is not None:
        raise ValueError(
            "sparsify takes config or config_fn, not both: let config_fn return the default "
            f"config for the layers it does not single out (got config={config!r})"
        )
    if config is not None and not isinstance(config, SparseBackpropConfig):
        raise ValueError(f"config must be a SparseBackpropConfig, got {config!r}")
    if config_fn is None:
        default = config if config is not None else SparseBackpropConfig()
        config_fn = lambda name, module: default  # noqa: E731
    include, exclude = _listed(include), _listed(exclude)  # read twice: matched, then checked
    keep = _matcher(include, "include")
    drop = _matcher(exclude, "exclude")
    layer_names: list[str] = []  # every name include / exclude was tried on

    def filtered(name: str, module: nn.Module) -> str | None:
        layer_names.append(name)
        if keep is not None and not keep(name, module):
            return NOT_INCLUDED
        if drop is not None and drop(name, module):
            return EXCLUDED
        return None

    entries: dict[int, LayerReport] = {}  # by id(module): a shared module is reported once
    configs: dict[int, SparseBackpropConfig] = {}
    chosen: list[tuple[str, nn.Module]] = []  # every name of a module to convert
    sparse: dict[int, tuple[str, nn.Module]] = {}  # already sparse modules to reconfigure
    attention: list[str] = []
    functional = _functional_children(model)
    for name, module in model.named_modules(remove_duplicate=False):
        # the projections of an attention module are converted (or not) with it
        if any(a == "" or name.startswith(a + ".") for a in attention):
            continue
        if isinstance(module, nn.MultiheadAttention):
            attention.append(name)
        seen = id(module) in entries
        if seen:
            if id(module) in configs and not isinstance(module, MemoryMixin):
                chosen.append((name, module))
            continue
        kind = type(module).__name__
        is_sparse = isinstance(module, MemoryMixin)
        why = None if is_sparse else _unsupported(module) or functional.get(name)
        if not (is_sparse or _convertible(module) or why):
            continue  # not a layer sparsify knows
        filter_why = filtered(name, module)
        if filter_why is None and keep is None and not is_sparse and _lora_adapter(model, name):
            filter_why = LORA_ADAPTER
        if filter_why is not None:
            status = "unchanged" if is_sparse else "dense"
            entries[id(module)] = LayerReport(name, kind, status, filter_why)
            continue
        if why is not None:
            entries[id(module)] = LayerReport(name, kind, "dense", why)
            continue
        cfg = config_fn(name, module)
        if cfg is not None and not isinstance(cfg, SparseBackpropConfig):
            raise ValueError(
                f"config_fn must return a SparseBackpropConfig or None, got {cfg!r} for "
                f"{name or '<root>'!r}"
            )
        if cfg is None:
            status = "unchanged" if is_sparse else "dense"
            entries[id(module)] = LayerReport(name, kind, status, CONFIG_FN_NONE)
            continue
        if isinstance(module, nn.Conv1d | nn.Conv2d) and cfg.selection == "per_example":
            raise ValueError(
                f"sparsify cannot convert {kind} {name or '<root>'!r} with "
                f"selection='per_example': {PER_EXAMPLE_ERROR}"
            )
        configs[id(module)] = cfg
        entries[id(module)] = LayerReport(name, kind, "pending", "")
        if is_sparse:
            sparse[id(module)] = (name, module)
        else:
            chosen.append((name, module))
    report = SparsifyReport(list(entries.values()))
    if not configs:
        matched = [e for e in report.layers if e.detail not in (EXCLUDED, NOT_INCLUDED)]
        raise ValueError(
            f"sparsify matched no layer to convert (include={include!r}, exclude={exclude!r}"
            + (", every match left dense by config_fn" if matched else "")
            + f"); the model's linear layers are: {_names_of(model, nn.Linear)}"
            + (f"; its LSTM layers are: {rnns}"
               if (rnns := _names_of(model, (nn.LSTM, SparseLSTM))) else "")
            + (f"; its convolutions are: {convs}"
               if (convs := _names_of(model, (nn.Conv1d, nn.Conv2d))) else "")
            + "\n" + str(report)
        )
    for patterns, what in ((include, "include"), (exclude, "exclude")):
        _warn_unmatched(model, patterns, what, layer_names)
    owner = _hf_owner(model)
    hf_config = owner[1].config if owner is not None else None
    if owner is not None and not restoring:
        inside = [_relative(name, owner[0]) for name, _ in chosen]
        _warn_if_saved_sparse(owner[1], hf_config, [n for n in inside if n is not None])

    def reconfigure() -> None:  # once every conversion has succeeded
        for key, (name, module) in sparse.items():
            note = module.reconfigure(configs[key])
            if isinstance(module, SparseMultiheadAttention) and isinstance(
                module.out_proj, MemoryMixin
            ):
                module.out_proj.reconfigure(configs[key])
            if not module.name:
                module.name = name
            entries[key] = LayerReport(name, entries[key].kind, "reconfigured",
                                       f"{_describe(module)}, {note}")

    root = _replace(
        model, chosen,
        lambda module: _sparse_class(module).from_dense(module, configs[id(module)]),
        name_them=True, before_swap=reconfigure,
    )
    for name, module in chosen:
        if entries[id(module)].status == "pending":
            new = root.get_submodule(name) if name else root
            entries[id(module)] = LayerReport(
                name, entries[id(module)].kind, "converted", _describe(new)
            )
    switched = _switch_timm_qkv(root)
    for key, entry in entries.items():
        if entry.name in switched and entry.status in ("converted", "reconfigured"):
            entries[key] = LayerReport(
                entry.name, entry.kind, entry.status,
                f"{entry.detail}, {_TIMM_QKV_SWITCH} set on its attention module so that it "
                "runs (the bias added after it)",
            )
    for name, others in _mark_tied_weights(root).items():
        for key, entry in entries.items():
            if entry.name == name and entry.status in ("converted", "reconfigured"):
                entries[key] = LayerReport(
                    name, entry.kind, entry.status,
                    f"{entry.detail}, weight tied to {', '.join(others)}: LazyRowAdam steps "
                    "all of it",
                )
    report = SparsifyReport(list(entries.values()))
    root.sparsify_report = report
    if hf_config is not None:
        _record(root, hf_config)
    unsupported = report.unsupported
    if unsupported:
        warnings.warn(
            f"sparsify left {len(unsupported)} layer(s) dense that msbp cannot convert: "
            + "; ".join(f"{n or '<root>'} ({why})" for n, why in unsupported.items())
            + " (model.sparsify_report lists every layer)",
            stacklevel=3,
        )
    if verbose:
        print(report)
    return root


def _switch_timm_qkv(model: nn.Module) -> list[str]:
    """Set timm's ``qkv_bias_separate`` where an attention module's ``qkv`` layer is sparse
    (with it unset the module computes ``F.linear(x, qkv.weight, bias)`` and the sparse layer
    never runs); returns the names of those layers."""
    names = []
    for name, module in model.named_modules():
        if getattr(module, _TIMM_QKV_SWITCH, None) is False and isinstance(
            getattr(module, "qkv", None), MemoryMixin
        ):
            setattr(module, _TIMM_QKV_SWITCH, True)
            setattr(module, _QKV_SWITCHED, True)
            names.append(f"{name}.qkv" if name else "qkv")
    return names


def _unswitch_timm_qkv(model: nn.Module) -> None:
    """Unset the ``qkv_bias_separate`` that ``_switch_timm_qkv`` set where ``qkv`` is dense again:
    the module's own (fused) ``F.linear`` runs as before sparsify."""
    for module in model.modules():
        if getattr(module, _QKV_SWITCHED, False) and not isinstance(
            getattr(module, "qkv", None), MemoryMixin
        ):
            setattr(module, _TIMM_QKV_SWITCH, False)
            delattr(module, _QKV_SWITCHED)


def _mark_tied_weights(model: nn.Module) -> dict[str, list[str]]:
    """Set ``weight_tied`` on every ``SparseLinear`` of ``model`` whose weight is also a
    parameter of a module that is not one (that module adds gradient rows no log names);
    returns {sparse layer's name: the other modules' names (type)} for those tied."""
    holders: dict[int, list[tuple[str, nn.Module]]] = {}
    for name, module in model.named_modules():
        for param in module._parameters.values():
            if param is not None:
                holders.setdefault(id(param), []).append((name, module))
    tied: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, SparseLinear):
            continue
        others = [
            f"{other_name or '<root>'} ({type(other).__name__})"
            for other_name, other in holders.get(id(module.weight), [])
            if not isinstance(other, SparseLinear)
        ]
        if others:
            module.weight_tied = True
            module._mark_tied()
            tied[name] = others
        elif "weight_tied" in module.__dict__:
            del module.weight_tied  # back to the class default: untied
            module.weight.__dict__.pop(WEIGHT_TIED, None)
    return tied


def _names_of(model: nn.Module, kind: type | tuple[type, ...]) -> list[str]:
    return [n or "<root>" for n, m in model.named_modules() if isinstance(m, kind)]


# -- transformers models: the msbp config in model.config ---------------------------------------

#: the attribute of a transformers config that records the sparse layers (saved in config.json)
HF_RECORD = "msbp"


def _hf_owner(model: nn.Module) -> tuple[str, nn.Module] | None:
    """(qualified name, module) of the outermost transformers ``PreTrainedModel`` in ``model``:
    ``model`` itself, or the one a wrapper holds (peft's ``PeftModel`` holds it as
    ``base_model.model``), so that its config records the sparse layers it holds whichever module
    ``sparsify`` or ``densify`` was given; None without one (imports nothing: a model can only
    hold one if transformers' modeling_utils is imported already)."""
    modeling = sys.modules.get("transformers.modeling_utils")
    base = getattr(modeling, "PreTrainedModel", None)
    if base is None:
        return None
    for name, module in model.named_modules():
        if isinstance(module, base):
            return name, module
    return None


def _hf_config(model: nn.Module):
    """The config of the transformers model ``model`` is or holds (``_hf_owner``), else None."""
    owner = _hf_owner(model)
    return owner[1].config if owner is not None else None


def _relative(name: str, prefix: str) -> str | None:
    """``name`` relative to the module named ``prefix``, None if it is not inside it."""
    if not prefix:
        return name
    return name[len(prefix) + 1:] if name.startswith(prefix + ".") else None


def sparse_layer_record(model: nn.Module) -> dict | None:
    """The JSON record of ``model``'s sparse layers: ``{"version": 1, "configs": [config
    dicts], "layers": {qualified name: index into configs}}``, or None without sparse layers."""
    configs: list[dict] = []
    layers: dict[str, int] = {}
    attention: list[str] = []
    for name, module in model.named_modules():
        if any(a == "" or name.startswith(a + ".") for a in attention):
            continue  # out_proj follows its attention module
        if isinstance(module, nn.MultiheadAttention):
            attention.append(name)
        if isinstance(module, MemoryMixin):
            cfg = module.config.to_dict()
            if cfg not in configs:
                configs.append(cfg)
            layers[name] = configs.index(cfg)
    return {"version": 1, "configs": configs, "layers": layers} if layers else None


def _record(model: nn.Module, hf_config) -> None:
    """Record in ``hf_config`` the sparse layers of the transformers model that owns it: ``model``
    itself or the one it holds (names relative to that model, as its ``save_pretrained`` writes
    them)."""
    owner = _hf_owner(model)
    if owner is not None and owner[1].config is hf_config:
        model = owner[1]
    record = sparse_layer_record(model)
    if record is None:
        if hasattr(hf_config, HF_RECORD):
            delattr(hf_config, HF_RECORD)
    else:
        setattr(hf_config, HF_RECORD, record)


def _warn_if_saved_sparse(model: nn.Module, hf_config, converting: list[str]) -> None:
    """Warn when the checkpoint ``model`` was loaded from had these layers sparse: plain
    ``from_pretrained`` dropped their memory and ``sparsify`` starts it from zero."""
    record = getattr(hf_config, HF_RECORD, None)
    if not isinstance(record, dict):
        return
    saved = set(record.get("layers", {}))
    again = [name for name in converting if name in saved]
    if not again:
        return
    path = getattr(hf_config, "_name_or_path", "") or "<checkpoint dir>"
    warnings.warn(
        f"{type(model).__name__} was saved with {len(saved)} msbp-sparsified layers "
        f"(config.{HF_RECORD}); from_pretrained dropped their memory and sparsify starts "
        f"{len(again)} of them with an empty one and the config given here, so training does "
        "not continue as it would have. To resume exactly, load with "
        f"msbp.from_pretrained({type(model).__name__}, {path!r}) instead of from_pretrained + "
        "sparsify; to start afresh on purpose, ignore this",
        stacklevel=4,
    )


def _replace(
    model: nn.Module,
    chosen: list[tuple[str, nn.Module]],
    convert: Callable[[nn.Module], nn.Module],
    name_them: bool = False,
    before_swap: Callable[[], None] | None = None,
) -> nn.Module:
    """Swap every chosen module for ``convert(module)`` in place; returns the (new) root.

    A module shared under several names is converted once and stays shared. Every module is
    converted before the first is swapped in (and ``before_swap`` runs between), so a
    conversion that raises leaves the model as it was. Module hooks move to the new module.
    """
    converted: dict[int, nn.Module] = {}
    for name, module in chosen:
        if id(module) not in converted:
            new = converted[id(module)] = convert(module)
            if name_them:
                new.name = name
    if before_swap is not None:
        before_swap()
    for module in {id(m): m for _, m in chosen}.values():
        _carry_hooks(module, converted[id(module)])
    root = model
    for name, module in chosen:
        if name == "":
            root = converted[id(module)]
        else:
            _swap(model, name, converted[id(module)])
    return root


#: the hook registries of ``nn.Module`` (forward, backward, state dict)
_HOOK_DICTS = (
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
    "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_backward_pre_hooks",
    "_backward_hooks", "_state_dict_pre_hooks", "_state_dict_hooks",
    "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)


def _carry_hooks(old: nn.Module, new: nn.Module) -> None:
    """Give ``new`` the hooks registered on ``old`` (the same registries: the handles their
    owners hold still remove them), a ``with_module`` hook then called with ``new``."""
    for attr in _HOOK_DICTS:
        hooks = getattr(old, attr, None)
        if not hooks:
            continue
        hooks.update(getattr(new, attr, {}))
        setattr(new, attr, hooks)
        for hook in hooks.values():
            if getattr(hook, "with_module", False) and isinstance(hook.__dict__.get("module"),
                                                                  weakref.ref):
                hook.module = weakref.ref(new)
    if old._backward_hooks:
        new._is_full_backward_hook = old._is_full_backward_hook


def densify(model: nn.Module) -> nn.Module:
    """Replace every sparse layer (``SparseLinear``, ``SparseLSTM``, ``SparseConv1d``,
    ``SparseConv2d``, ``SparseMultiheadAttention``, ``SparseHFConv1D``) by its plain counterpart
    sharing its parameters. The memory is dropped (``msbp.dense_state_dict(model)`` gives the
    dense state dict without converting). Returns the model (a new module when the root itself was
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
    root = _replace(model, chosen, lambda module: module.to_dense())
    _unswitch_timm_qkv(root)
    hf_config = _hf_config(root)
    if hf_config is not None:
        _record(root, hf_config)
    return root


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
_SPARSE_TYPES = (
    SparseLinear, SparseLSTM, SparseConv1d, SparseConv2d, SparseMultiheadAttention, SparseHFConv1D,
)
