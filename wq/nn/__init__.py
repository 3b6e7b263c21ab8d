from .experts import QuantExperts
from .quant_linear import QuantLinear, compact
from .surgery import DEFAULT_SKIP, linear_shape, materialize, parse_overrides, plan_layers, set_module

__all__ = ["DEFAULT_SKIP", "QuantExperts", "QuantLinear", "compact", "linear_shape", "materialize", "parse_overrides",
           "plan_layers", "set_module"]
