from .quant_linear import QuantLinear, compact
from .surgery import DEFAULT_SKIP, parse_overrides, plan_layers, set_module

__all__ = ["DEFAULT_SKIP", "QuantLinear", "compact", "parse_overrides", "plan_layers", "set_module"]
