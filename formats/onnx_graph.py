"""The ONNX graph of a LLaDA / Dream model and the ``qdllm`` functions of its quantized linears.

Every quantized linear is one node of domain ``qdllm`` whose definition ships in the model as an
ONNX ``FunctionProto`` (stock onnxruntime inlines it; no plugin). See ``docs/onnx-format.md``.

``PlaneMatMul(X, planes, signs, row_scale, col_scale) -> Y`` (``PlaneMatMulMu`` adds ``mu``): the
initializers are exactly the stored fields of ``formats.qtensor.QuantizedTensor``. Per call it

1. lists, from ``planes`` (K_j per block), the block of every plane in stored (order-major) order:
   ``NonZero(Less(arange(8)[:, None], K[None, :]))[1]``;
2. gathers the input's 128-column block of every plane and multiplies it by that plane's column
   scales: ``Xp [..., P*G]`` (at most 8x the input, in practice ~2x);
3. unpacks the sign bits through a 256 x 8 lookup table to +-1 floats, multiplies by the row scales:
   ``Wp [n_out, P*G]``, whose column ``(p, c)`` is ``row_scale[p] * B_p[:, c]``;
4. ``Y = Xp @ Wp^T`` (+ ``sum_c X[..., block j, c] @ mu^T`` for ``mu``).

So ``Y = X @ W_hat^T`` exactly (up to float summation order) and the only float copy of a weight is
the per-call temporary ``Wp`` of one linear. ``PlaneMatMulNBits`` does steps 1-2 and runs
``com.microsoft.MatMulNBits`` (bits 2, codes 1/3 = -/+ row scale with the default zero point 2) on
``Xp``: one node per linear covering all its planes, blocks with fewer planes simply absent.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import onnx
from onnx import TensorProto as TP
from onnx import helper

from formats.families import HParams
from formats.qtensor import MAX_PLANES

OPSET = 21
IR_VERSION = 10
DOMAIN = "qdllm"
DOMAIN_VERSION = 1
MS_DOMAIN = "com.microsoft"

F_PLANE, F_PLANE_MU = "PlaneMatMul", "PlaneMatMulMu"
F_NBITS, F_NBITS_MU = "PlaneMatMulNBits", "PlaneMatMulNBitsMu"
FUNCTIONS = (F_PLANE, F_PLANE_MU, F_NBITS, F_NBITS_MU)

# byte -> its 8 bits, LSB first, as +-1 (bit 1 = +1)
SIGN_LUT = (((np.arange(256)[:, None] >> np.arange(8)[None, :]) & 1) * 2.0 - 1.0).astype(np.float32)


class Builder:
    """Appends nodes; names values uniquely. In a function body constants are ``Constant`` nodes,
    in the main graph small initializers (deduplicated)."""

    def __init__(self, function: bool = False):
        self.function = function
        self.nodes: list[onnx.NodeProto] = []
        self.small: list[TP] = []
        self._consts: dict[tuple, str] = {}
        self._k = 0
        self.scope = ""

    def name(self, hint: str) -> str:
        self._k += 1
        return f"{self.scope}{hint}_{self._k}" if not self.function else f"{hint}_{self._k}"

    def op(self, op_type: str, inputs: list[str], *, domain: str = "", out: str | None = None,
           attrs: list[onnx.AttributeProto] | None = None, **kw: Any) -> str:
        o = out or self.name(op_type.lower())
        node = helper.make_node(op_type, inputs, [o], name=("" if self.function else o), domain=domain, **kw)
        if attrs:
            node.attribute.extend(attrs)
        self.nodes.append(node)
        return o

    def const(self, value: Any, dtype: Any = np.int64) -> str:
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key in self._consts:
            return self._consts[key]
        nm = self.name("c")
        if self.function:
            self.nodes.append(helper.make_node("Constant", [], [nm], value=onnx.numpy_helper.from_array(arr, nm)))
        else:
            nm = f"const.{len(self._consts)}"
            self.small.append(onnx.numpy_helper.from_array(arr, nm))
        self._consts[key] = nm
        return nm


def _ref_attr(name: str, kind: int = onnx.AttributeProto.INT) -> onnx.AttributeProto:
    a = onnx.AttributeProto()
    a.name, a.ref_attr_name, a.type = name, name, kind
    return a


def _gather_input(b: Builder, x: str, planes: str, col_scale: str) -> tuple[str, str]:
    """Steps 1-2: ``Xp [..., P*G]`` (each plane's input block times its column scales) and ``Xb [..., nb, G]``."""
    k = b.op("Cast", [planes], to=TP.INT64)
    live = b.op("Less", [b.const(np.arange(MAX_PLANES).reshape(-1, 1)), k])  # [8, nb]: order k exists in block j
    nz = b.op("NonZero", [live])  # [2, P], row-major = order-major plane order
    block_of_plane = b.op("Gather", [nz, b.const(1)], axis=0)  # [P]
    g = b.op("Shape", [col_scale], start=1, end=2)
    lead = b.op("Shape", [x], end=-1)
    xb = b.op("Reshape", [x, b.op("Concat", [lead, b.const([-1]), g], axis=0)])
    xg = b.op("Gather", [xb, block_of_plane], axis=-2)  # [..., P, G]
    xc = b.op("Mul", [xg, b.op("Cast", [col_scale], to=TP.FLOAT)])
    return b.op("Reshape", [xc, b.op("Concat", [lead, b.const([-1])], axis=0)]), xb


def _add_mu(b: Builder, y: str, xb: str, mu: str, out: str) -> str:
    xs = b.op("ReduceSum", [xb, b.const([-1])], keepdims=0)  # [..., nb]
    mut = b.op("Transpose", [b.op("Cast", [mu], to=TP.FLOAT)], perm=[1, 0])  # [nb, n_out]
    return b.op("Add", [y, b.op("MatMul", [xs, mut])], out=out)


def make_function(fname: str) -> onnx.FunctionProto:
    """The ``FunctionProto`` of one of ``FUNCTIONS`` (opset 21 standard ops, plus MatMulNBits for NBits)."""
    b = Builder(function=True)
    mu = fname.endswith("Mu")
    if fname.startswith(F_NBITS):
        inputs = ["X", "planes", "codes", "scales", "col_scale"] + (["mu"] if mu else [])
        xp, xb = _gather_input(b, "X", "planes", "col_scale")
        sc = b.op("Cast", ["scales"], to=TP.FLOAT)
        y = b.op("MatMulNBits", [xp, "codes", sc], domain=MS_DOMAIN,
                 attrs=[_ref_attr("K"), _ref_attr("N"), _ref_attr("block_size"), _ref_attr("accuracy_level"),
                        helper.make_attribute("bits", 2)])
        # MatMulNBits has no ONNX schema, so ONNX type inference (checker full_check) stops at it; a Cast to
        # float restores the type (onnxruntime removes it: CastElimination)
        y = b.op("Cast", [y], to=TP.FLOAT, out=None if mu else "Y")
        attributes = ["K", "N", "block_size", "accuracy_level"]
    else:
        inputs = ["X", "planes", "signs", "row_scale", "col_scale"] + (["mu"] if mu else [])
        xp, xb = _gather_input(b, "X", "planes", "col_scale")
        # a (free) data dependency on X, so the per-call dequantization runs when this linear runs, not
        # all linears' at once at the start of the graph (which would hold every float weight at once)
        dep = b.op("Add", [b.op("Shape", ["signs"]), b.op("Mul", [b.op("Size", ["X"]), b.const(0)])])
        st = b.op("Transpose", [b.op("Reshape", ["signs", dep])], perm=[1, 0, 2])  # [n_out, P, G/8]
        pm = b.op("Gather", [b.const(SIGN_LUT, np.float32), b.op("Cast", [st], to=TP.INT32)])  # [n_out, P, G/8, 8]
        rs = b.op("Transpose", [b.op("Cast", ["row_scale"], to=TP.FLOAT)], perm=[1, 0])  # [n_out, P]
        w = b.op("Mul", [pm, b.op("Unsqueeze", [rs, b.const([2, 3])])])
        wp = b.op("Reshape", [w, b.const([0, -1])])  # [n_out, P*G]
        y = b.op("MatMul", [xp, b.op("Transpose", [wp], perm=[1, 0])], out=None if mu else "Y")
        attributes = []
    if mu:
        _add_mu(b, y, xb, "mu", "Y")
    opsets = [helper.make_opsetid("", OPSET)] + ([helper.make_opsetid(MS_DOMAIN, 1)] if fname.startswith(F_NBITS) else [])
    return helper.make_function(DOMAIN, fname, inputs, ["Y"], b.nodes, opsets, attributes=attributes,
                                doc_string=f"qdllm {fname}: Y = X @ W_hat^T for a binary-plane weight (docs/onnx-format.md)")


# ---------------------------------------------------------------------------------------------- model


Linear = Callable[["Builder", str, str], str]  # (builder, input value, canonical tensor name) -> output value


def build_forward(b: Builder, hp: HParams, linear: Linear, vector: Callable[[str], str],
                  embed: Callable[["Builder", str], str]) -> None:
    """Nodes of the whole forward pass into ``b``: ``input_ids``/``attention_mask`` -> ``logits``.

    ``linear(b, x, name)`` emits ``x @ W^T`` for a weight, ``vector(name)`` gives the float32
    initializer of a norm weight or bias, ``embed(b, ids)`` the embedding lookup.
    """
    hd, nh, nkv = hp.head_dim, hp.n_heads, hp.n_kv_heads
    rep = nh // nkv
    half = hd // 2
    fp = np.float32

    # RoPE tables, float32 as the official code (inv_freq = 1/theta^(arange(0,hd,2)/hd)). Positions: the
    # optional input position_ids [B, T] (an overridable initializer whose default, an empty [1, 0]
    # tensor, means 0..T-1 for every row)
    b.scope = "rope/"
    inv_freq = (fp(1.0) / (fp(hp.rope_theta) ** (np.arange(0, hd, 2, dtype=fp) / fp(hd)))).astype(fp)
    t = b.op("Gather", [b.op("Shape", ["input_ids"]), b.const(1)], axis=0)
    arange = helper.make_graph(
        [helper.make_node("Range", [b.const(0), t, b.const(1)], ["rope/arange"]),
         helper.make_node("Unsqueeze", ["rope/arange", b.const([0])], ["rope/pos_default"])],
        "default_positions", [], [helper.make_tensor_value_info("rope/pos_default", TP.INT64, [1, None])])
    given = helper.make_graph([helper.make_node("Identity", ["position_ids"], ["rope/pos_given"])],
                              "given_positions", [], [helper.make_tensor_value_info("rope/pos_given", TP.INT64, [None, None])])
    use_default = b.op("Equal", [b.op("Size", ["position_ids"]), b.const(0)])
    pos = b.op("Cast", [b.op("If", [use_default], then_branch=arange, else_branch=given)], to=TP.FLOAT)  # [B|1, T]
    freqs = b.op("Mul", [b.op("Unsqueeze", [pos, b.const([-1])]), b.const(inv_freq, fp)])  # [B|1, T, hd/2]
    emb = b.op("Concat", [freqs, freqs], axis=-1)
    cos, sin = b.op("Cos", [emb]), b.op("Sin", [emb])
    cos4, sin4 = (b.op("Unsqueeze", [c, b.const([1])]) for c in (cos, sin))  # [B|1, 1, T, hd] for k
    cos5, sin5 = (b.op("Unsqueeze", [c, b.const([1, 2])]) for c in (cos, sin))  # [B|1, 1, 1, T, hd] for q

    # key padding mask -> additive bias [B, 1, 1, T] (0 where attended, float32 min where padded)
    b.scope = "mask/"
    m = b.op("Cast", ["attention_mask"], to=TP.FLOAT)
    bias = b.op("Mul", [b.op("Sub", [b.const(1.0, fp), m]), b.const(np.finfo(fp).min, fp)])
    bias = b.op("Unsqueeze", [bias, b.const([1, 2])])

    def rms(x: str, w: str) -> str:
        ms = b.op("ReduceMean", [b.op("Pow", [x, b.const(2.0, fp)]), b.const([-1])], keepdims=1)
        return b.op("Mul", [b.op("Div", [x, b.op("Sqrt", [b.op("Add", [ms, b.const(hp.norm_eps, fp)])])]), vector(w)])

    def rope(x: str, cos: str, sin: str) -> str:  # x [..., T, hd]
        x1 = b.op("Slice", [x, b.const([0]), b.const([half]), b.const([-1])])
        x2 = b.op("Slice", [x, b.const([half]), b.const([hd]), b.const([-1])])
        rot = b.op("Concat", [b.op("Neg", [x2]), x1], axis=-1)
        return b.op("Add", [b.op("Mul", [x, cos]), b.op("Mul", [rot, sin])])

    def proj(x: str, name: str, bias_name: str | None) -> str:
        y = linear(b, x, name)
        return b.op("Add", [y, vector(bias_name)]) if bias_name else y

    def moe(h: str, p: str) -> str:
        """Routing in the graph: softmax over the router's logits, TopK (ties: lowest id), the k weights scattered
        into a dense ``[N, E]`` over the ``N = B * T`` tokens (not renormalised). Each expert runs only on its
        routed tokens (``NonZero`` of its column, ``Gather``) and its weighted output is added back into their rows
        (``ScatterND``, reduction add), experts in id order as the float model. Every expert's batch also holds
        token 0 at weight 0 (it adds an exact zero), so no batch is empty: the plane functions' reshapes cannot
        infer a dimension of an empty tensor."""
        probs = b.op("Softmax", [linear(b, h, p + "ffn_gate_inp.weight")], axis=-1)
        top = [b.name("topk_w"), b.name("topk_i")]
        b.nodes.append(helper.make_node("TopK", [probs, b.const([hp.n_expert_used])], top, name=top[0], axis=-1,
                                        largest=1, sorted=1))
        dense = b.op("ScatterElements", [b.op("Mul", [probs, b.const(0.0, fp)]), top[1], top[0]], axis=-1)
        dense = b.op("Reshape", [dense, b.const([-1, hp.n_expert])])  # [N, E]
        rows_of_h = b.op("Reshape", [h, b.const([-1, hp.d_model])])  # [N, d]
        out = b.op("ConstantOfShape", [b.op("Shape", [rows_of_h])])  # float32 zeros [N, d]
        for e in range(hp.n_expert):
            w = b.op("Gather", [dense, b.const(e)], axis=1)  # [N]
            routed = b.op("Squeeze", [b.op("NonZero", [b.op("Greater", [w, b.const(0.0, fp)])]), b.const([0])])
            rows = b.op("Concat", [routed, b.const([0])], axis=0)  # [n_e + 1]: the routed tokens and token 0
            we = b.op("Concat", [b.op("Gather", [w, routed], axis=0), b.const([0.0], fp)], axis=0)
            xe = b.op("Gather", [rows_of_h, rows], axis=0)  # [n_e + 1, d]
            g = linear(b, xe, p + f"ffn_gate_exps.{e}.weight")
            u = linear(b, xe, p + f"ffn_up_exps.{e}.weight")
            act = b.op("Mul", [b.op("Mul", [g, b.op("Sigmoid", [g])]), u])
            y = b.op("Mul", [linear(b, act, p + f"ffn_down_exps.{e}.weight"), b.op("Unsqueeze", [we, b.const([1])])])
            out = b.op("ScatterND", [out, b.op("Unsqueeze", [rows, b.const([1])]), y], reduction="add")
        return b.op("Reshape", [out, b.op("Shape", [h])])

    b.scope = "embed/"
    x = embed(b, "input_ids")  # [B, T, d]
    for i in range(hp.n_layers):
        p = f"blk.{i}."
        b.scope = f"blk.{i}/attn/"
        h = rms(x, p + "attn_norm.weight")
        qb = (p + "attn_q.bias", p + "attn_k.bias", p + "attn_v.bias") if hp.spec.qkv_bias else (None, None, None)
        q = proj(h, p + "attn_q.weight", qb[0])
        k = proj(h, p + "attn_k.weight", qb[1])
        v = proj(h, p + "attn_v.weight", qb[2])
        # q: [B,T,nkv,rep,hd] -> [B,nkv,rep,T,hd]; head h = kv*rep + r (HF repeat_kv order)
        q = b.op("Transpose", [b.op("Reshape", [q, b.const([0, 0, nkv, rep, hd])])], perm=[0, 2, 3, 1, 4])
        k = b.op("Transpose", [b.op("Reshape", [k, b.const([0, 0, nkv, hd])])], perm=[0, 2, 1, 3])
        v = b.op("Transpose", [b.op("Reshape", [v, b.const([0, 0, nkv, hd])])], perm=[0, 2, 1, 3])
        if hp.spec.qk_norm:  # per-head RMSNorm over hd before RoPE (llada-moe)
            q, k = rms(q, p + "attn_q_norm.weight"), rms(k, p + "attn_k_norm.weight")
        q = b.op("Mul", [rope(q, cos5, sin5), b.const(1.0 / np.sqrt(hd), fp)])
        k = rope(k, cos4, sin4)
        q = b.op("Reshape", [q, b.const([0, 0, -1, hd])])  # [B, nkv, rep*T, hd]
        s = b.op("MatMul", [q, b.op("Transpose", [k], perm=[0, 1, 3, 2])])  # [B, nkv, rep*T, T]
        a = b.op("Softmax", [b.op("Add", [s, bias])], axis=-1)
        o = b.op("MatMul", [a, v])  # [B, nkv, rep*T, hd]
        o = b.op("Transpose", [b.op("Reshape", [o, b.const([0, 0, rep, -1, hd])])], perm=[0, 3, 1, 2, 4])
        o = b.op("Reshape", [o, b.const([0, 0, -1])])  # [B, T, nh*hd]
        x = b.op("Add", [x, linear(b, o, p + "attn_output.weight")])
        b.scope = f"blk.{i}/ffn/"
        h = rms(x, p + "ffn_norm.weight")
        if hp.n_expert:
            x = b.op("Add", [x, moe(h, p)])
            continue
        g = linear(b, h, p + "ffn_gate.weight")
        u = linear(b, h, p + "ffn_up.weight")
        act = b.op("Mul", [b.op("Mul", [g, b.op("Sigmoid", [g])]), u])
        x = b.op("Add", [x, linear(b, act, p + "ffn_down.weight")])
    b.scope = "head/"
    h = rms(x, "output_norm.weight")
    y = linear(b, h, "output.weight")
    b.op("Identity", [y], out="logits")


def io_values(hp: HParams) -> tuple[list[onnx.ValueInfoProto], list[onnx.ValueInfoProto], list[TP]]:
    """Graph inputs, outputs, and the defaults of the optional inputs (overridable initializers):
    ``attention_mask`` ``[[1]]`` (every token attended) and ``position_ids`` empty ``[1, 0]`` (0..T-1)."""
    inputs = [helper.make_tensor_value_info("input_ids", TP.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info("attention_mask", TP.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info("position_ids", TP.INT64, ["batch", "seq"])]
    outputs = [helper.make_tensor_value_info("logits", TP.FLOAT, ["batch", "seq", hp.n_vocab])]
    return inputs, outputs, [onnx.numpy_helper.from_array(np.ones((1, 1), np.int64), "attention_mask"),
                             onnx.numpy_helper.from_array(np.zeros((1, 0), np.int64), "position_ids")]
