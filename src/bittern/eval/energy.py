"""Arithmetic energy per token from operation counts: BitNet b1.58 versus an FP16 model of the same shape.

The model is the one the BitNet b1.58 paper uses for its energy figure (Wang, Ma et al., "The Era of
1-bit LLMs: All Large Language Models are in 1.58 Bits", arXiv 2402.17764, section 3 and Figure 3),
with per-operation energies from Horowitz, "Computing's energy problem (and what we can do about it)",
ISSCC 2014 (45nm), as scaled to 7nm in the paper's table:

===========  =====  =====  =====  =====
pJ / op      FP16+  FP16x  INT8+  INT8x
===========  =====  =====  =====  =====
7nm          0.16   0.34   0.007  0.07
45nm         0.4    1.1    0.03   0.2
===========  =====  =====  =====  =====

Counting rules (per generated token, i.e. one decode step that attends over ``context`` positions):

* Linear layers of the blocks (q, k, v, o, gate, up, down): an FP model spends one FP16 multiply and
  one FP16 add per weight (a multiply-accumulate); BitNet b1.58 spends one INT8 add per weight, since a
  ternary weight only adds, subtracts or skips its input (the paper's rule: "a ternary MAC is one
  INT8 add").
* BitNet's extra work around its integer products: quantising each distinct linear input (one FP16
  compare for the absmax and one FP16 multiply for the scaling per element; the inputs are the
  attention input, the ``o_proj`` input, the MLP input and the ``down_proj`` input, plus one per layer
  when the norm sits inside each BitLinear) and one FP16 multiply per output element for the rescale.
* Attention scores and the weighted sum of values (``q.k`` and ``p.v``, ``heads * head_dim *
  context`` multiply-adds each) and the LM head (``vocab * hidden``) run in FP16 in both models.
* Element-wise work (norms, RoPE, activation functions, softmax, residual adds) is O(hidden) per
  layer and not counted; for the paper's shapes it is well under 1% of the total.

``linear`` (what the paper's Figure 3 compares: the matrix multiplications of the linear layers) and
``total`` (everything counted above) are both reported.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..configs import ModelConfig

#: pJ per operation, by process node (keys: fp16_add, fp16_mul, int8_add, int8_mul).
ENERGY_TABLES: dict[str, dict[str, float]] = {
    "7nm": {"fp16_add": 0.16, "fp16_mul": 0.34, "int8_add": 0.007, "int8_mul": 0.07},
    "45nm": {"fp16_add": 0.4, "fp16_mul": 1.1, "int8_add": 0.03, "int8_mul": 0.2},
}


@dataclass(frozen=True)
class OpCounts:
    """Arithmetic operations of one kind of work, by number format."""

    fp16_add: int = 0
    fp16_mul: int = 0
    int8_add: int = 0
    int8_mul: int = 0

    def __add__(self, other: "OpCounts") -> "OpCounts":
        return OpCounts(self.fp16_add + other.fp16_add, self.fp16_mul + other.fp16_mul,
                        self.int8_add + other.int8_add, self.int8_mul + other.int8_mul)

    def energy_pj(self, node: str) -> float:
        """Energy of these operations in picojoules under the named process-node table."""
        table = energy_table(node)
        return sum(getattr(self, k) * table[k] for k in table)

    def to_dict(self) -> dict[str, int]:
        """Plain-JSON form."""
        return asdict(self)


def energy_table(node: str) -> dict[str, float]:
    """The pJ-per-op table of a process node ("7nm" or "45nm")."""
    try:
        return ENERGY_TABLES[node]
    except KeyError:
        raise ValueError(f"unknown process node {node!r}; known: {sorted(ENERGY_TABLES)}") from None


def _macs_fp16(n: int) -> OpCounts:
    return OpCounts(fp16_add=n, fp16_mul=n)


def count_ops(config: ModelConfig, linear: str | None = None, context: int = 512) -> dict[str, OpCounts]:
    """Operations of one decode step (one token attending over ``context`` positions), by part.

    Keys: ``linear`` (block linear layers), ``quant`` (BitNet activation quantisation and rescale;
    zero for FP), ``attention`` (scores and weighted values), ``lm_head``. ``linear`` defaults to
    ``config.linear`` ("bitnet" or "fp").
    """
    kind = linear or config.linear
    if kind not in ("bitnet", "fp"):
        raise ValueError(f"linear must be 'bitnet' or 'fp', got {kind!r}")
    if context <= 0:
        raise ValueError("context must be a positive number of positions")
    c = config
    shapes = c.linear_shapes()
    macs = sum(o * i for o, i in shapes.values()) * c.num_layers
    if kind == "bitnet":
        linear_ops = OpCounts(int8_add=macs)
        h, f = c.hidden_size, c.intermediate_size
        # distinct inputs quantised per block: attention input, o_proj input, MLP input, down_proj input;
        # with the norm inside every BitLinear, q/k/v and gate/up each quantise their own normalised input.
        quant_inputs = (3 * h + h + 2 * h + f) if c.bitlinear_norm else (h + h + h + f)
        outputs = sum(o for o, _ in shapes.values())
        quant = OpCounts(fp16_add=quant_inputs * c.num_layers, fp16_mul=(quant_inputs + outputs) * c.num_layers)
    else:
        linear_ops = _macs_fp16(macs)
        quant = OpCounts()
    attention = _macs_fp16(2 * c.num_heads * c.head_dim * context * c.num_layers)
    lm_head = _macs_fp16(c.vocab_size * c.hidden_size)
    return {"linear": linear_ops, "quant": quant, "attention": attention, "lm_head": lm_head}


def energy_per_token(config: ModelConfig, context: int = 512, nodes: tuple[str, ...] = ("7nm", "45nm")) -> dict[str, Any]:
    """Joules per generated token for BitNet b1.58 and FP16 of ``config``'s shape, under each node.

    Returns ``{"context": n, "ops": {kind: {part: counts}}, node: {"bitnet": {"linear_j", "total_j"},
    "fp16": {...}, "linear_ratio", "total_ratio"}}`` (ratios are FP16 / BitNet).
    """
    ops = {kind: count_ops(config, kind, context) for kind in ("bitnet", "fp")}
    out: dict[str, Any] = {"context": context,
                           "ops": {k: {part: v.to_dict() for part, v in parts.items()} for k, parts in ops.items()}}
    for node in nodes:
        row: dict[str, Any] = {}
        for kind, label in (("bitnet", "bitnet"), ("fp", "fp16")):
            parts = ops[kind]
            linear_pj = parts["linear"].energy_pj(node)
            total_pj = sum(p.energy_pj(node) for p in parts.values())
            row[label] = {"linear_j": linear_pj * 1e-12, "total_j": total_pj * 1e-12}
        row["linear_ratio"] = row["fp16"]["linear_j"] / row["bitnet"]["linear_j"]
        row["total_ratio"] = row["fp16"]["total_j"] / row["bitnet"]["total_j"]
        out[node] = row
    return out
