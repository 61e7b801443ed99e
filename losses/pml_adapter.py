"""``pml:<ClassName>``: any pytorch-metric-learning loss behind the registry's interface.

The hyperparameters are read from the PML class's constructor: one :class:`HyperParam` per
argument whose default is a bool, number or string (numbers are floats, except count-like names
such as ``num_classes``), with no search range (a sweep keeps them fixed unless its config names a
range). Required count arguments default to 0, meaning "inferred at run time" as for the built-in
losses: ``num_classes`` from the data and ``embedding_dim`` (PML's ``embedding_size`` or
``descriptors_dim``) from the model; building the loss with them still at 0 raises ``ValueError``.
Other required arguments must be given. Arguments that take objects (distance, reducer,
regularizers) keep PML's defaults.
"""

from __future__ import annotations

import difflib
import functools
import inspect

import torch

from .base import MetricLoss
from .mining import label_masks
from .params import HyperParam
from .registry import LossInfo, register_resolver

PML_PREFIX = "pml:"

# Base classes and wrappers of other losses: not usable on their own by name.
_NOT_STANDALONE = {
    "BaseMetricLossFunction",
    "GenericPairLoss",
    "BaseLossWrapper",
    "MultipleLosses",
    "CrossBatchMemory",
    "SelfSupervisedLoss",
}
_COUNT_NAMES = ("num_", "n_")
_COUNT_SUFFIXES = ("_size", "_dim", "_per_class")
_RENAMED = {"embedding_size": "embedding_dim", "descriptors_dim": "embedding_dim"}
_OWN_ARGS = {"self", "embedding_regularizer", "embedding_reg_weight", "args", "kwargs"}


def pml_loss_names() -> list[str]:
    """Names of the pytorch-metric-learning losses usable as ``pml:<Name>``."""
    from pytorch_metric_learning import losses as pml_losses  # imported on first use: it takes a second

    return sorted(
        name
        for name, obj in vars(pml_losses).items()
        if isinstance(obj, type) and issubclass(obj, torch.nn.Module) and name not in _NOT_STANDALONE
    )


def _is_count(name: str) -> bool:
    return (
        name.startswith(_COUNT_NAMES) or name.endswith(_COUNT_SUFFIXES) or name in ("K", "l", "sub_centers")
    )


def _constructor_params(cls: type) -> list[inspect.Parameter]:
    """Constructor arguments of ``cls`` and, where it forwards ``*args``/``**kwargs``, of the
    standalone PML losses it derives from (not of abstract bases or mixins)."""
    standalone = set(pml_loss_names())
    seen: dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        if klass.__name__ not in standalone or "__init__" not in vars(klass):
            continue
        params = list(inspect.signature(klass.__init__).parameters.values())
        for p in params:
            if p.name not in _OWN_ARGS and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                seen.setdefault(p.name, p)
        if not any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
            break
    return list(seen.values())


def _hyperparam(p: inspect.Parameter) -> HyperParam | None:
    default = p.default
    if default is inspect.Parameter.empty:
        if _is_count(p.name):
            return HyperParam(_RENAMED.get(p.name, p.name), int, 0, "required (0 = infer at run time)", low=0)
        return HyperParam(p.name, float, None, "required")
    if isinstance(default, bool):
        return HyperParam(p.name, bool, default)
    if isinstance(default, (int, float)):
        return HyperParam(p.name, int if _is_count(p.name) and isinstance(default, int) else float, default)
    if isinstance(default, str):
        return HyperParam(p.name, str, default)
    return None


class PMLLoss(MetricLoss):
    """A pytorch-metric-learning loss with its own reduction, distance and defaults, unchanged.

    Statistics: ``mean_d_ap`` / ``mean_d_an`` on the PML loss's own distance (``1 - cos`` for
    cosine similarity), when it has a distance that is a true distance or cosine similarity.
    """

    pml_class: type
    pml_int_params: frozenset = frozenset()
    pml_required: frozenset = frozenset()
    pml_names: dict = {}

    def __init__(self, **params) -> None:
        super().__init__()
        missing = [name for name in sorted(self.pml_required) if params.get(name) in (None, 0)]
        if missing:
            raise ValueError(
                f"pml:{self.pml_class.__name__} needs {', '.join(missing)} (no default in "
                f"pytorch-metric-learning); pass them, e.g. {missing[0]}=<value>"
            )
        params = {
            k: int(v) if k in self.pml_int_params and float(v).is_integer() else v for k, v in params.items()
        }
        self.pml_loss = self.pml_class(**{self.pml_names.get(k, k): v for k, v in params.items()})

    def compute(self, embeddings, labels, ref_embeddings, ref_labels):
        loss = self.pml_loss(embeddings, labels, ref_emb=ref_embeddings, ref_labels=ref_labels)
        self._record_distances(embeddings, labels, ref_embeddings, ref_labels)
        return loss

    @torch.no_grad()
    def _record_distances(self, embeddings, labels, ref_embeddings, ref_labels) -> None:
        from pytorch_metric_learning.distances import CosineSimilarity

        distance = getattr(self.pml_loss, "distance", None)
        if distance is None or (distance.is_inverted and not isinstance(distance, CosineSimilarity)):
            return
        mat = distance(embeddings.detach(), None if ref_embeddings is None else ref_embeddings.detach())
        if distance.is_inverted:
            mat = 1 - mat
        positive, negative = label_masks(labels, ref_labels)
        self.record_stats(
            mean_d_ap=(mat * positive).sum() / positive.sum().clamp_min(1),
            mean_d_an=(mat * negative).sum() / negative.sum().clamp_min(1),
        )


@functools.lru_cache(maxsize=None)
def pml_info(class_name: str) -> LossInfo:
    """The registry entry of ``pml:<class_name>``, built by introspecting the PML constructor."""
    available = pml_loss_names()
    if class_name not in available:
        lowered = {n.lower(): n for n in available}
        close = difflib.get_close_matches(class_name.lower(), list(lowered), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(PML_PREFIX + lowered[c]) for c in close)}?" if close else ""
        raise ValueError(
            f"unknown pytorch-metric-learning loss {class_name!r}.{hint} Available: {', '.join(available)}"
        )
    from pytorch_metric_learning import losses as pml_losses

    pml_class = getattr(pml_losses, class_name)
    declared = [(p, _hyperparam(p)) for p in _constructor_params(pml_class)]
    params = tuple(hp for _, hp in declared if hp is not None)
    int_params = frozenset(
        p.name
        for p, hp in declared
        if hp is not None and isinstance(p.default, int) and not isinstance(p.default, bool)
    )  # PML gets ints back where it had them
    required = frozenset(
        hp.name for p, hp in declared if hp is not None and p.default is inspect.Parameter.empty
    )
    names = {hp.name: p.name for p, hp in declared if hp is not None and hp.name != p.name}
    doc = inspect.cleandoc(vars(pml_class).get("__doc__") or "").split("\n")[0]
    wrapper = type(
        f"PML{class_name}",
        (PMLLoss,),
        {
            "__doc__": f"pytorch-metric-learning's {class_name}. {doc}".strip(),
            "pml_class": pml_class,
            "pml_int_params": int_params,
            "pml_required": required,
            "pml_names": names,
            "hyperparams": params,
            "paper": f"pytorch-metric-learning {class_name}",
        },
    )
    return LossInfo(
        PML_PREFIX + class_name,
        wrapper,
        params,
        wrapper.paper,
        wrapper.__doc__.split("\n")[0],
        False,
        "pytorch-metric-learning",
    )


register_resolver(PML_PREFIX, pml_info, "any pytorch-metric-learning loss")
