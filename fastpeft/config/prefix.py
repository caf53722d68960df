"""The prefix-tuning config (AdapterHub's options, PEFT's position layout)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ._base import AdapterConfig
from ._checks import check_dropout, check_flags, check_int, check_leave_out, check_non_linearity, check_targets


@dataclass
class PrefixTuningConfig(AdapterConfig):
    """Prefix tuning (Li & Liang 2021) with AdapterHub's options: every attention layer attends to
    `prefix_length` learned keys and values before the real ones,

        O = softmax(Q [P_K; K]ᵀ · scale + mask) [P_V; V]   (fp.ops.prefix_attention; K and V never copied)

    The prefix of every layer comes from one MLP per attention kind (flat=False: P_K, P_V = W_2 f(W_1 E + b_1) + b_2
    over a P x hidden embedding E, bottleneck `bottleneck_size`, f = `non_linearity`), or is a parameter itself
    (flat=True; fp.eject_prefix_tuning turns the first into the second). Encoder-decoder models: `encoder_prefix`
    for the encoder's self-attention, `cross_prefix` for the decoder's cross-attention (the decoder's
    self-attention always gets one). `use_gating`: the prefix keys and values are scaled by mean_t sigmoid(W h_t + b)
    over the layer's input tokens (one gate for both when `shared_gating`, else one each).
    `shift_positions`: real tokens sit at positions P..P+L-1 as in PEFT (set when a PEFT checkpoint is loaded; on
    T5 the prefix keys then get the relative position bias of positions 0..P-1); by default real tokens keep
    0..L-1 and the prefix carries no position. `modules_to_save`: modules (e.g. a
    classification head) trained beside the prefix, as in PEFT.
    """

    method: ClassVar[str] = "prefix_tuning"
    aliases: ClassVar[dict[str, str]] = {"num_virtual_tokens": "prefix_length"}

    prefix_length: int = 30
    bottleneck_size: int = 512
    non_linearity: str = "tanh"
    dropout: float = 0.0
    flat: bool = False
    encoder_prefix: bool = True
    cross_prefix: bool = True
    leave_out: list[int] = field(default_factory=list)
    use_gating: bool = False
    shared_gating: bool = True
    shift_positions: bool = False
    modules_to_save: list[str] | None = None
    init_weights_seed: int | None = None
    num_virtual_tokens: int | None = field(default=None, repr=False, compare=False)

    def validate(self) -> None:
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        check_targets(self, "modules_to_save", self.modules_to_save)
        check_int(self, "prefix_length", 1, "30")
        check_int(self, "bottleneck_size", 1, "512")
        check_non_linearity(self)
        check_dropout(self)
        check_flags(self, "flat", "encoder_prefix", "cross_prefix", "use_gating", "shared_gating", "shift_positions")
        check_int(self, "init_weights_seed", 0, "42", optional=True)
        check_leave_out(self)
