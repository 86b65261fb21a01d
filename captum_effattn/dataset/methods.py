"""Method names for dataset explanations: a view of :data:`captum_effattn.attr.VIEWS`, optionally
followed by ``+WEIGHTING``.

The valid names are read from the attribution registries, so a view (or a weighting, once
:mod:`captum_effattn.attr` exposes a ``WEIGHTINGS`` registry) added there is accepted here with no
change: ``efficient``, ``raw``, ``efficient+norm``, ... Each method becomes one output column,
``scores_`` followed by the name with ``+`` replaced by ``_``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from captum_effattn.dataset.errors import UnknownMethodError

DEFAULT_METHODS: tuple[str, ...] = ("efficient",)
"""What ``--methods`` defaults to."""

SCORES_PREFIX = "scores_"
WEIGHTING_SEPARATOR = "+"


def available_views() -> tuple[str, ...]:
    from captum_effattn.attr import VIEWS

    return tuple(VIEWS)


def available_weightings() -> tuple[str, ...]:
    """Names of the weightings :mod:`captum_effattn.attr` registers."""
    from captum_effattn import attr

    return tuple(getattr(attr, "WEIGHTINGS", {}))


def available_methods() -> tuple[str, ...]:
    """Every valid method name: each view, then each ``view+weighting``."""
    views = available_views()
    weighted = tuple(
        f"{view}{WEIGHTING_SEPARATOR}{weighting}"
        for view in views
        for weighting in available_weightings()
    )
    return views + weighted


@dataclass(frozen=True)
class Method:
    """One way of scoring tokens.

    Attributes:
        view: a key of :data:`captum_effattn.attr.VIEWS`.
        weighting: a weighting name, or ``None`` for the view's rows as they are.
    """

    view: str
    weighting: str | None = None

    @property
    def name(self) -> str:
        if self.weighting is None:
            return self.view
        return f"{self.view}{WEIGHTING_SEPARATOR}{self.weighting}"

    @property
    def column(self) -> str:
        """The output column holding this method's token scores."""
        return SCORES_PREFIX + self.name.replace(WEIGHTING_SEPARATOR, "_")

    def attribute_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``EfficientAttentionAttribution.attribute`` for this method."""
        kwargs: dict[str, Any] = {"view": self.view}
        if self.weighting is not None:
            kwargs["weighting"] = self.weighting
        return kwargs


def parse_methods(spec: str | Sequence[str]) -> tuple[Method, ...]:
    """Parse ``"efficient,raw"`` (or a sequence of names) into methods, in the order given.

    Raises:
        UnknownMethodError: an unknown name (the message lists the valid ones), an empty list,
            or a name given twice.
    """
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [str(name).strip() for name in names]
    valid = available_methods()
    if not [name for name in names if name]:
        raise UnknownMethodError(f"no method given; choose from {', '.join(valid)}")
    methods = []
    for name in names:
        if name not in valid:
            raise UnknownMethodError(
                f"unknown method {name!r}; choose from {', '.join(valid)} "
                f"(a view, optionally followed by '{WEIGHTING_SEPARATOR}WEIGHTING')"
            )
        view, _, weighting = name.partition(WEIGHTING_SEPARATOR)
        methods.append(Method(view, weighting or None))
    seen = [method.name for method in methods]
    duplicated = sorted({name for name in seen if seen.count(name) > 1})
    if duplicated:
        raise UnknownMethodError(f"method(s) listed twice: {', '.join(duplicated)}")
    return tuple(methods)
