"""The search-space DSL: dotted parameter paths -> distributions, with optional conditions.

```yaml
space:
  train.optimizer: {type: choice, values: [sgd, adamw]}
  train.lr:        {type: loguniform, low: 1.0e-4, high: 0.3}
  train.momentum:  {type: uniform, low: 0.8, high: 0.99, when: {train.optimizer: sgd}}
```
The space compiles to a pure Optuna define-by-run function (`suggest`): conditional parameters are only
sampled when their condition holds, so TPE models them separately. No computation happens inside it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

from pydantic import Field, model_validator

from raycls.config.schema import Frozen

if TYPE_CHECKING:  # optuna is imported by the functions that need it, not by every config load
    import optuna

Scalar = Union[bool, int, float, str, None]


class _Param(Frozen):
    # Sample this parameter only when every listed parameter has the given value (or one of a list of values).
    when: dict[str, Union[Scalar, list[Scalar]]] = Field(default_factory=dict)

    def representative(self) -> Any:
        """A value inside the distribution, used to type-check the path against TrialConfig."""
        raise NotImplementedError

    def suggest(self, trial: optuna.Trial, name: str) -> Any:
        raise NotImplementedError

    def distribution(self) -> optuna.distributions.BaseDistribution:
        """The Optuna distribution `suggest` samples from (a warm start checks old values against it)."""
        raise NotImplementedError

    def column_type(self) -> str:
        """The Arrow type (an alias `pyarrow.type_for_alias` reads) of this parameter's leaderboard column."""
        return "double"


class Uniform(_Param):
    type: Literal["uniform"]
    low: float
    high: float

    @model_validator(mode="after")
    def _range(self) -> Uniform:
        if not self.low < self.high:
            raise ValueError(f"low={self.low} must be < high={self.high}")
        return self

    def representative(self) -> float:
        return self.low

    def suggest(self, trial: optuna.Trial, name: str) -> float:
        return trial.suggest_float(name, self.low, self.high)

    def distribution(self) -> optuna.distributions.BaseDistribution:
        from optuna.distributions import FloatDistribution

        return FloatDistribution(self.low, self.high, log=isinstance(self, LogUniform))


class LogUniform(Uniform):
    type: Literal["loguniform"]  # type: ignore[assignment]

    @model_validator(mode="after")
    def _positive(self) -> LogUniform:
        if self.low <= 0:
            raise ValueError(f"loguniform needs low > 0, got low={self.low}")
        return self

    def suggest(self, trial: optuna.Trial, name: str) -> float:
        return trial.suggest_float(name, self.low, self.high, log=True)


class IntRange(_Param):
    type: Literal["int"]
    low: int
    high: int
    step: Annotated[int, Field(ge=1)] = 1
    log: bool = False

    @model_validator(mode="after")
    def _range(self) -> IntRange:
        if not self.low < self.high:
            raise ValueError(f"low={self.low} must be < high={self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"log=true needs low > 0, got low={self.low}")
        if self.log and self.step != 1:
            raise ValueError("log=true cannot be combined with step != 1 (Optuna's rule)")
        return self

    def representative(self) -> int:
        return self.low

    def suggest(self, trial: optuna.Trial, name: str) -> int:
        return trial.suggest_int(name, self.low, self.high, step=self.step, log=self.log)

    def distribution(self) -> optuna.distributions.BaseDistribution:
        from optuna.distributions import IntDistribution

        return IntDistribution(self.low, self.high, step=self.step, log=self.log)

    def column_type(self) -> str:
        return "int64"


class Choice(_Param):
    type: Literal["choice"]
    values: Annotated[list[Scalar], Field(min_length=1)]

    def representative(self) -> Scalar:
        return self.values[0]

    def suggest(self, trial: optuna.Trial, name: str) -> Scalar:
        return trial.suggest_categorical(name, self.values)

    def distribution(self) -> optuna.distributions.BaseDistribution:
        from optuna.distributions import CategoricalDistribution

        return CategoricalDistribution(self.values)

    def column_type(self) -> str:
        """The narrowest type that holds every value: bool, int64, double, else string."""
        numbers = [v for v in self.values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if all(isinstance(v, bool) for v in self.values):
            return "bool"
        if len(numbers) == len(self.values):
            return "int64" if all(isinstance(v, int) for v in numbers) else "double"
        return "string"


Param = Annotated[Union[Uniform, LogUniform, IntRange, Choice], Field(discriminator="type")]
DISTRIBUTIONS = ("uniform", "loguniform", "int", "choice")


class Space(Frozen):
    params: dict[str, Param] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _conditions(self) -> Space:
        unknown = unknown_conditions(self.params)
        if unknown:
            raise ValueError("; ".join(unknown))
        for path, param in self.params.items():
            for other, expected in param.when.items():
                target = self.params[other]
                allowed = expected if isinstance(expected, list) else [expected]
                if isinstance(target, Choice):
                    missing = [v for v in allowed if v not in target.values]
                    if missing:
                        raise ValueError(
                            f"{path}: condition {other}={missing} can never hold; {other} takes {target.values}"
                        )
        self.order()  # raises on cycles
        return self

    def order(self) -> list[str]:
        """Parameters in an order where each condition's parameters come first (stable w.r.t. the YAML)."""
        done: list[str] = []
        visiting: set[str] = set()

        def visit(path: str) -> None:
            if path in done:
                return
            if path in visiting:
                raise ValueError(f"conditions form a cycle through {path!r}")
            visiting.add(path)
            for other in self.params[path].when:
                visit(other)
            visiting.discard(path)
            done.append(path)

        for path in self.params:
            visit(path)
        return done


def unknown_conditions(params: Mapping[str, Any]) -> list[str]:
    """Conditions (`when`) on names that are not parameters of the space. Takes parsed parameters or the
    YAML's raw mappings: pydantic runs Space's own checks only once every field is valid, so the loader asks
    this directly to report these beside field errors, all at once."""
    problems = []
    for path, param in params.items():
        when = param.get("when") if isinstance(param, Mapping) else getattr(param, "when", None)
        for other in when if isinstance(when, Mapping) else {}:
            if other not in params:
                problems.append(
                    f"{path}: condition on {other!r}, which is not a parameter of the space; "
                    f"parameters: {', '.join(params) or '(none)'}"
                )
    return problems


def condition_holds(when: Mapping[str, Any], values: Mapping[str, Any]) -> bool:
    for other, expected in when.items():
        allowed = expected if isinstance(expected, list) else [expected]
        if other not in values or values[other] not in allowed:
            return False
    return True


def suggest(trial: optuna.Trial, space: Space, fixed: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The define-by-run function: sample every parameter whose condition holds, in dependency order.

    `fixed` holds values pinned by `--set`: they are not sampled, but conditions see them.
    """
    fixed = dict(fixed or {})
    values: dict[str, Any] = {}
    for path in space.order():
        if path in fixed:
            continue
        param = space.params[path]
        if condition_holds(param.when, {**values, **fixed}):
            values[path] = param.suggest(trial, path)
    return values
