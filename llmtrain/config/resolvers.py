"""OmegaConf resolvers used by the recipes."""

from omegaconf import OmegaConf


def if_lowp(precision_name: str, bf16_value, low_precision_value):
    """Recipes pick Megatron-Bridge's low-precision hyper-parameters for any precision but bf16."""
    return bf16_value if precision_name == "bf16" else low_precision_value


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("if_lowp", if_lowp, replace=True)
