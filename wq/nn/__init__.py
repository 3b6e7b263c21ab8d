from .quant_linear import QuantLinear
from .surgery import DEFAULT_SKIP, parse_overrides, plan_layers, set_module

__all__ = ["DEFAULT_SKIP", "QuantLinear", "parse_overrides", "plan_layers", "set_module"]
