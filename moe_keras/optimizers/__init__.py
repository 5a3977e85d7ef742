"""Optimizers: Adam factory and the factored second-moment Adam of appendix D."""

# Registers 'factored_adam' with `factory.make_optimizer` and the gin factory
# `factored_adam` as soon as any optimizer module is imported.
from moe_keras.optimizers import factored_adam  # pylint: disable=unused-import
