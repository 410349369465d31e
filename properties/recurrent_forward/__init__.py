"""Properties shared by the recurrent forward families (``la-forward``, ``gla-forward``, ``delta-forward``):
the reference-free checks of SPEC §6 and packed variable-length batches (``cu_seqlens``).

A family declares what differs (:class:`RecurrentForward`: its time inputs, how far values are drawn, its
magnitude bounds, its reference and baseline) and adds ``metamorphic_properties(name, form)`` and
``varlen_properties(name, form)`` to its property list.
"""

from iqa_verify.properties.recurrent_forward.form import Far, RecurrentForward
from iqa_verify.properties.recurrent_forward.metamorphic import metamorphic_properties
from iqa_verify.properties.recurrent_forward.varlen import varlen_properties

__all__ = ["Far", "RecurrentForward", "metamorphic_properties", "varlen_properties"]
