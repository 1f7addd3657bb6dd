"""(IA)³ (learned rescaling vectors): ``peft``'s ``PeftType.IA3``.

Keys are ``ParameterDict`` entries: ``<module>.ia3_l.<adapter>`` in memory, ``<module>.ia3_l``
on disk. Math in :mod:`peftcore.methods.ia3.ops`.
"""

from peftcore.mapping import MethodSpec, register_method
from peftcore.methods.ia3.config import IA3Config

SPEC = register_method(
    MethodSpec(
        peft_type="IA3",
        config_cls=IA3Config,
        prefix="ia3_",
        parameter_containers=("ia3_l",),
    )
)

__all__ = ["SPEC", "IA3Config"]
