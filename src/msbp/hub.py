"""Saving and loading sparsified transformers models with their memory and per-layer configs.

transformers stays optional: it is imported only by the models these functions are given.

``msbp.save_pretrained(model, dir)`` writes what ``model.save_pretrained(dir)`` writes, but with
the dense model's weights (no memory keys: ``AutoModel.from_pretrained(dir)`` loads it cleanly
for inference), the memories in ``msbp_memory.safetensors`` and the sparse layers' configs in
``config.json`` (``"msbp"``). ``msbp.from_pretrained(model_cls, dir)`` loads it back sparsified
as it was saved, memory included, so that training continues exactly. It also reads a directory
written by plain ``model.save_pretrained`` from a sparsified model (memories among the weights,
configs in ``config.json`` since ``sparsify`` records them in ``model.config``).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import Any

from torch import Tensor, nn

from msbp.config import SparseBackpropConfig
from msbp.convert import HF_RECORD, _hf_owner, _record, _sparsify, sparse_layer_record
from msbp.nn.memory import _MEMORY_KEY, MemoryMixin, dense_state_dict, memory_state_dict

#: the file ``save_pretrained`` writes the memories to, next to the weights
MEMORY_FILE = "msbp_memory.safetensors"
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def save_pretrained(model: nn.Module, save_directory: str | os.PathLike, **kwargs: Any) -> None:
    """``model.save_pretrained(save_directory, **kwargs)`` for a sparsified transformers model:
    the weights without the memory keys, the memories (this process's, CPU float32) in
    ``msbp_memory.safetensors``, and the per-layer configs in ``config.json`` under ``"msbp"``.
    Load it with ``msbp.from_pretrained(model_cls, save_directory)`` to resume training, or
    with ``model_cls.from_pretrained`` as the dense model. ``state_dict=`` is taken without its
    memory keys too.

    Example::

        msbp.save_pretrained(model, "ft")            # model: sparsified BertModel, trained
        model = msbp.from_pretrained(BertModel, "ft")  # sparse again, memory restored
    """
    save_pretrained_fn = getattr(model, "save_pretrained", None)
    if save_pretrained_fn is None or not hasattr(model, "config"):
        raise ValueError(
            f"msbp.save_pretrained needs a transformers PreTrainedModel, got "
            f"{type(model).__name__}; for other models save model.state_dict() (memory "
            "included) or msbp.dense_state_dict(model)"
        )
    owner = _hf_owner(model)
    if owner is not None and owner[0]:
        # a wrapper that forwards save_pretrained and config (peft's PeftModel): its
        # save_pretrained writes the adapters only, without config.json, so from_pretrained
        # could not load what this would write
        raise ValueError(
            f"msbp.save_pretrained needs a transformers PreTrainedModel, got "
            f"{type(model).__name__}, which holds {type(owner[1]).__name__} as {owner[0]!r}; "
            "for a peft model merge the adapters first (model.merge_and_unload()) and save the "
            "merged model with msbp.save_pretrained, or save the adapters with "
            "model.save_pretrained and the memories with msbp.memory_state_dict(model)"
        )
    _record(model, model.config)
    state = kwargs.pop("state_dict", None)
    save_pretrained_fn(save_directory, state_dict=dense_state_dict(
        state if state is not None else model
    ), **kwargs)
    if kwargs.get("is_main_process", True):
        memories = memory_state_dict(model)
        path = os.path.join(save_directory, MEMORY_FILE)
        if memories:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in memories.items()}, path)
        elif os.path.exists(path):
            os.remove(path)  # a stale one from an earlier save of a sparse model


def from_pretrained(model_cls: Any, path: str | os.PathLike, *args: Any, **kwargs: Any):
    """``model_cls.from_pretrained(path, *args, **kwargs)``, then sparsified as it was saved:
    the layers and per-layer configs recorded in ``config.json`` (``"msbp"``) and the memories
    from ``msbp_memory.safetensors`` (``msbp.save_pretrained``) or from the weights (plain
    ``save_pretrained`` of a sparsified model). The next training step then computes what it
    would have computed had the model never been saved. Raises ``ValueError`` if ``path`` holds
    no msbp record, or the record's layers or memories do not fit the model (for another head
    on the same base model the base model prefix is added or removed, and the saved head's
    layers dropped, as transformers does with their weights).

    Example::

        model = msbp.from_pretrained(AutoModel, "ft")
        print(model.sparsify_report)
    """
    if kwargs.get("output_loading_info"):
        raise ValueError("msbp.from_pretrained does not take output_loading_info")
    with _memory_keys_expected():
        model = model_cls.from_pretrained(path, *args, **kwargs)
    record = getattr(model.config, HF_RECORD, None)
    if not isinstance(record, dict) or not record.get("layers"):
        raise ValueError(
            f"{os.fspath(path)!r} has no msbp record (\"{HF_RECORD}\" in config.json): it was "
            "not saved from a sparsified model; load it with from_pretrained and call "
            "msbp.sparsify"
        )
    configs = [SparseBackpropConfig.from_dict(c) for c in record["configs"]]
    names = dict(model.named_modules())
    rename = _renamer(list(record["layers"]), names, getattr(model, "base_model_prefix", ""))
    if rename is None:
        missing = sorted(set(record["layers"]) - set(names))
        raise ValueError(
            f"the msbp record of {os.fspath(path)!r} names layers that "
            f"{type(model).__name__} does not have: {missing[:5]}"
            + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        )
    if isinstance(rename, _KeepPresent):
        dropped = [name for name in record["layers"] if rename(name) is None]
        warnings.warn(
            f"msbp.from_pretrained: {type(model).__name__} has not the layers {dropped[:5]}"
            + (f" and {len(dropped) - 5} more" if len(dropped) > 5 else "")
            + f" that {os.fspath(path)!r} recorded as sparse (another head?): they are left "
            "out with their memories, the rest is sparsified as saved",
            UserWarning, stacklevel=2,
        )
    layers = {
        new: configs[i] for name, i in record["layers"].items()
        if (new := rename(name)) is not None
    }
    model = _sparsify(
        model, None, lambda name, module: name in layers, None,
        lambda name, module: layers[name], False, restoring=True,
    )
    _load_memories(model, path, rename, kwargs)
    return model


@contextlib.contextmanager
def _memory_keys_expected() -> Iterator[None]:
    """The memory keys among the weights of a plain ``save_pretrained``, which this module reads
    itself, left out of the keys transformers 5 reports as UNEXPECTED ("not ok if you expect
    identical arch") while loading (through its private ``_adjust_missing_and_unexpected_keys``;
    where that is missing, as in transformers 4, the report is as it was)."""
    modeling = sys.modules.get("transformers.modeling_utils")
    base = getattr(modeling, "PreTrainedModel", None)
    adjust = getattr(base, "_adjust_missing_and_unexpected_keys", None)
    if adjust is None:
        yield
        return

    def adjusted(self, loading_info, *args, **kwargs):
        adjust(self, loading_info, *args, **kwargs)
        unexpected = getattr(loading_info, "unexpected_keys", None)
        if isinstance(unexpected, set):
            loading_info.unexpected_keys = {k for k in unexpected if not _MEMORY_KEY.fullmatch(k)}

    base._adjust_missing_and_unexpected_keys = adjusted
    try:
        yield
    finally:
        base._adjust_missing_and_unexpected_keys = adjust


_PEFT_BASE = "base_layer"


def _renamer(
    saved: list[str], names: dict[str, nn.Module], prefix: str
) -> Callable[[str], str | None] | None:
    """Map the record's layer names onto the model's: as they are, or with the base model
    prefix removed (a head model saved, its base model loaded: the head's layers are dropped,
    None) or added (the base model saved, a head model loaded), or the base model's as they
    are and the head's dropped (a model with another head loaded); each also without peft's
    ``base_layer`` parts (a model sparsified inside a ``PeftModel``, then merged: peft put the
    base layers where their LoRA wrappers were)."""
    candidates: list[Callable[[str], str | None]] = [lambda n: n]
    if prefix:
        candidates += [
            lambda n: n.removeprefix(prefix + ".") if n.startswith(prefix + ".") else None,
            lambda n: f"{prefix}.{n}",
        ]
    if any(_PEFT_BASE in n.split(".") for n in saved):
        candidates += [
            lambda n, rename=rename: rename(
                ".".join(part for part in n.split(".") if part != _PEFT_BASE)
            )
            for rename in candidates
        ]
    for rename in candidates:
        mapped = [rename(n) for n in saved]
        kept = [n for n in mapped if n is not None]
        if kept and all(n in names for n in kept):
            return rename
    # another head on the same base model (a language model fine-tuned for classification; a
    # token classifier, which has no pooler): the layers the model has, the rest dropped as
    # transformers drops their weights (the caller warns), the new head dense
    if any(n in names for n in saved):
        return _KeepPresent(names)
    return None


class _KeepPresent:
    """A renamer (called as the lambdas of ``_renamer`` are): the model's own names, else None."""

    def __init__(self, names: dict[str, nn.Module]) -> None:
        self.names = names

    def __call__(self, name: str) -> str | None:
        return name if name in self.names else None


def _load_memories(
    model: nn.Module, path, rename: Callable[[str], str | None], kwargs
) -> None:
    owners = {
        f"{prefix}.{mem}" if prefix else mem: (module, mem)
        for prefix, module in model.named_modules()
        if isinstance(module, MemoryMixin)
        for mem, _ in module._memory_names()
    }

    def to_model(key: str) -> str | None:
        layer, _, mem = key.rpartition(".")
        if not layer:
            return mem
        new = rename(layer)
        return None if new is None else f"{new}.{mem}" if new else mem

    found = _read_memories(path, kwargs)
    saved = {to_model(k): v for k, v in found.items() if to_model(k) in owners}
    missing = sorted(set(owners) - set(saved))
    if missing:  # perhaps written under the names transformers gives them on saving
        for key, name in _saved_names(model, missing).items():
            if name in found:
                saved[key] = found[name]
        missing = sorted(set(owners) - set(saved))
    if missing:
        raise ValueError(
            f"{os.fspath(path)!r} holds no memory for {missing[:5]}"
            + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            + f": neither {MEMORY_FILE} nor the weights have it (if a layer was replaced "
            "after msbp.sparsify, as transformers' resize_token_embeddings replaces an untied "
            "output layer by a new nn.Linear, the layers recorded in config.json by sparsify "
            "are out of date: msbp.save_pretrained records them as they are when saving)"
        )
    for key, (module, mem) in owners.items():
        error = module._load_memory(mem, saved[key])
        if error:
            raise ValueError(f"{key}: {error}")


def _saved_names(model: nn.Module, keys: list[str]) -> dict[str, str]:
    """The names that ``model.save_pretrained`` writes the state-dict entries ``keys`` under,
    where transformers renames them on saving (transformers 5 writes some models' weights under
    their older names, and the memory keys of the renamed modules with them: ViT's
    ``vit.layers.0.attention.q_proj.memory`` as ``vit.encoder.layer.0.attention.attention.
    query.memory``); only the keys it renames, {} where this transformers does not say."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4: keys are saved as they are
        return {}
    import torch

    probes = {key: torch.zeros(1) for key in keys}
    try:
        renamed = revert_weight_conversion(model, dict(probes))
    except (AttributeError, KeyError, RuntimeError, TypeError, ValueError):
        return {}  # a private function of transformers: if it changed, no renaming is known
    # matched by identity: the renaming hands each probe on as it is
    key_of = {id(probe): key for key, probe in probes.items()}
    return {key_of[id(v)]: name for name, v in renamed.items()
            if id(v) in key_of and key_of[id(v)] != name}


def _read_memories(path, kwargs) -> dict[str, Tensor]:
    """Every memory-like tensor saved under ``path``: ``msbp_memory.safetensors`` if there,
    else the memory keys of the weight files."""
    from safetensors import safe_open

    from msbp.nn.memory import _MEMORY_KEY

    def read_safetensors(file: str, only_memory: bool) -> dict[str, Tensor]:
        with safe_open(file, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()
                    if not only_memory or _MEMORY_KEY.fullmatch(k)}

    file = _resolve(path, MEMORY_FILE, kwargs)
    if file is not None:
        return read_safetensors(file, only_memory=False)
    out: dict[str, Tensor] = {}
    for name in _WEIGHT_FILES:
        file = _resolve(path, name, kwargs)
        if file is None:
            continue
        if name.endswith(".index.json"):
            with open(file) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            files = [_resolve(path, shard, kwargs) for shard in shards]
        else:
            files = [file]
        for shard in files:
            if shard is None:
                continue
            if shard.endswith(".safetensors"):
                out.update(read_safetensors(shard, only_memory=True))
            else:
                import torch

                state = torch.load(shard, map_location="cpu", weights_only=True)
                out.update({k: v for k, v in state.items() if _MEMORY_KEY.fullmatch(k)})
        break
    return out


def _resolve(path, filename: str, kwargs) -> str | None:
    """The local file ``filename`` of a checkpoint directory or of a cached hub model."""
    if os.path.isdir(path):
        file = os.path.join(path, filename)
        return file if os.path.isfile(file) else None
    try:
        from transformers.utils import cached_file

        hub = {k: kwargs[k] for k in ("cache_dir", "revision", "token", "local_files_only",
                                      "subfolder") if k in kwargs}
        return cached_file(path, filename, _raise_exceptions_for_missing_entries=False, **hub)
    except (OSError, ValueError):
        return None


__all__ = ["MEMORY_FILE", "from_pretrained", "save_pretrained", "sparse_layer_record"]
