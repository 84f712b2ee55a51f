# coding=utf-8
"""Stage II: context over the turns of a conversation (MERITS-L Bi-GRU + self-attention §3.5; the MiSTER-E speech and
text experts, conv 1/3/5 + Bi-GRU §4.3).

Shipped to the Hugging Face Hub as remote code (flat, next to `modeling_merits.py`): imports only torch and its
siblings. `MeritsTurnPlan` (the index bookkeeping of a batch's real turns, shared by every module of one forward),
the GRU over the real turns only (`run_packed_gru`: cuDNN on GPUs, `MeritsGRURecurrence` on CPUs) and
`MeritsContextEncoder`. Section numbers refer to `shared/spec/papers.md`.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_merits import MeritsConfig
from .common_merits import MeritsDropout, _mark_conversation_level, causal_mask, masked_softmax


# ---------------------------------------------------------------------------------------------------------------------
# Turn plan and GRU recurrence (the training hot path on cached embeddings)
# ---------------------------------------------------------------------------------------------------------------------


class MeritsTurnPlan:
    """Index bookkeeping of one batch's real turns, computed once per forward and shared by every module.

    Row-major real rows: row i is (conversation `batch_index[i]`, turn `turn_index[i]`), i < N = turn_mask.sum().
    For the GRUs the conversations are sorted by length (longest first, like `pack_padded_sequence`); time-major
    slot `t * B + rank[b]` holds turn t of conversation b, and `batch_sizes[t]` conversations are still running at
    step t. `forward_slots` / `reverse_slots` [N] give each real row's slot in the forward and in the per-conversation
    reversed (backward-direction) order; `forward_rows` / `reverse_rows` [T * B] are the inverse maps (0 at padding).
    `conv_positions` [N] place the rows in one long sequence with `gap` zeros around every conversation, so one
    convolution over it equals a zero-padded convolution of each conversation alone.
    """

    # where the index bookkeeping is computed: None = by device (on the host for any non-CPU mask: ONE host read of
    # the mask instead of one per `int()` / `nonzero` / `.tolist()` below, then the indices are copied over without
    # waiting); True forces the host route (bench/op_counts.py counts the GPU path on a CPU with it)
    host_bookkeeping = None

    @classmethod
    def on_host(cls, device) -> bool:
        """Whether a plan for a mask on `device` computes its bookkeeping on the host (`host_bookkeeping`)."""
        return cls.host_bookkeeping if cls.host_bookkeeping is not None else torch.device(device).type != "cpu"

    def __init__(self, turn_mask: torch.Tensor, gap: int = 0, host_mask: torch.Tensor = None):
        """`host_mask`: a host copy of `turn_mask` that the caller made already (the model's `_prepare_masks` reads
        the masks back once per forward to check them), used on the host route instead of a second read."""
        turn_mask = turn_mask.bool()
        device = turn_mask.device
        if self.on_host(device) and not getattr(turn_mask, "_merits_host_copy", False):
            if host_mask is None:
                host_mask = turn_mask.cpu()
                if host_mask is turn_mask:  # forced on a CPU mask (host_bookkeeping=True): never mark the caller's
                    host_mask = turn_mask.clone()
            elif not getattr(host_mask, "_merits_host_copy", False):  # a caller's tensor: never marked either
                host_mask = host_mask.bool().cpu().clone()
            if tuple(host_mask.shape) != tuple(turn_mask.shape):
                raise ValueError(f"`host_mask` {tuple(host_mask.shape)} is not a copy of `turn_mask` "
                                 f"{tuple(turn_mask.shape)}.")
            host_mask._merits_host_copy = True  # the nested plan below computes in place
            host = MeritsTurnPlan(host_mask, gap=gap)
            for name, value in host.__dict__.items():
                if isinstance(value, torch.Tensor):
                    value = value.to(device, non_blocking=True)
                setattr(self, name, value)
            self.turn_mask = turn_mask
            return
        self.turn_mask = turn_mask
        self.batch_size, self.total_turns = turn_mask.shape
        lengths = turn_mask.sum(1)
        self.lengths = lengths
        self.num_real = int(lengths.sum())
        self.max_length = int(lengths.max()) if self.batch_size else 0
        self.batch_index, self.turn_index = turn_mask.nonzero(as_tuple=True)
        order = torch.argsort(lengths, descending=True, stable=True)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel(), device=device)
        steps = torch.arange(self.max_length, device=device)
        self.batch_sizes = (lengths.unsqueeze(0) > steps.unsqueeze(1)).sum(1).tolist()
        row_rank = rank[self.batch_index]
        row_length = lengths[self.batch_index]
        self.forward_slots = self.turn_index * self.batch_size + row_rank
        self.reverse_slots = (row_length - 1 - self.turn_index) * self.batch_size + row_rank
        rows = torch.arange(self.num_real, device=device)
        num_slots = self.max_length * self.batch_size
        self.forward_rows = torch.zeros(num_slots, dtype=torch.long, device=device).index_copy_(0, self.forward_slots, rows)
        self.reverse_rows = torch.zeros(num_slots, dtype=torch.long, device=device).index_copy_(0, self.reverse_slots, rows)
        self.gap = int(gap)
        starts = torch.cumsum(lengths + self.gap, 0) - lengths  # each conversation preceded by `gap` zeros
        self.conv_positions = starts[self.batch_index] + self.turn_index
        self.conv_length = int(lengths.sum()) + (self.batch_size + 1) * self.gap

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, ...] -> [N, ...] rows of the real turns."""
        return x[self.batch_index, self.turn_index]

    def scatter(self, rows: torch.Tensor) -> torch.Tensor:
        """[N, ...] -> [B, T, ...] with zeros at padded turns."""
        out = rows.new_zeros(self.batch_size, self.total_turns, *rows.shape[1:])
        out[self.batch_index, self.turn_index] = rows
        return out


def _baddbmm_into(out: torch.Tensor, batch1: torch.Tensor, batch2: torch.Tensor) -> torch.Tensor:
    """out += batch1 @ batch2, in place. A strided `out` (a step's first rows) takes a contiguous product and a copy: an
    in-place product into it falls back to one single-threaded matrix product per batch entry (~2x slower)."""
    if out.is_contiguous():
        return out.baddbmm_(batch1, batch2)
    return out.copy_(torch.baddbmm(out, batch1, batch2))


class MeritsGRURecurrence(torch.autograd.Function):
    """The recurrent half of a (multi-direction) GRU layer over time-major, length-sorted sequences.

    Inputs: `input_gates` [T, D, B, 3H] (x W_ih^T + b_ih, precomputed for all steps in one matrix product; D
    directions, each already in its own time order), `weight_hh` [D, 3H, H], `bias_hh` [D, 3H], `batch_sizes`
    (running sequences per step, non-increasing). Output [T, D, B, H] (zero where a sequence has ended). Equations of
    `torch.nn.GRU`: r = σ(i_r + h W_hr + b_hr), z = σ(i_z + h W_hz + b_hz), n = tanh(i_n + r (h W_hn + b_hn)),
    h' = (1 - z) n + z h.

    Time-major buffers make every step's block [D, B, ...] contiguous while all sequences run (strided per-step views
    made the step's elementwise kernels 1.1-1.5x slower), and a step is 5 kernels writing straight into the saved
    buffers: the hidden-gate buffer starts as (i_r + b_hr, i_z + b_hz, b_hn) and the step adds h W_hh^T in place.
    Steps past a sequence's end skip its row (a small matrix product costs less with fewer rows). The backward is
    written out through time with the derivative factors of every step computed at once beforehand (3 kernels a
    step), and the weight gradient is ONE matrix product over all steps (autograd through a cell loop would
    accumulate a full [3H, H] gradient at every step).
    """

    @staticmethod
    def forward(ctx, input_gates, weight_hh, bias_hh, batch_sizes):
        steps, num_dirs, batch, three_hidden = input_gates.shape
        hidden = three_hidden // 3
        dtype = input_gates.dtype
        weight_t = weight_hh.to(dtype).transpose(1, 2).contiguous()  # [D, H, 3H] (~10 % faster steps)
        bias = bias_hh.to(dtype).unsqueeze(1)  # [D, 1, 3H]
        gates = torch.empty_like(input_gates)  # per step: (r, z, h W_hn + b_hn) once the step is done
        torch.add(input_gates[..., : 2 * hidden], bias[..., : 2 * hidden], out=gates[..., : 2 * hidden])
        gates[..., 2 * hidden :] = bias[..., 2 * hidden :]
        news = input_gates.new_zeros(steps, num_dirs, batch, hidden)
        outputs = input_gates.new_zeros(steps, num_dirs, batch, hidden)
        h_prev = input_gates.new_zeros(num_dirs, batch, hidden)
        # every step's views made at once ([D, B, *] each): a loop of indexing ops cost ~10 % of a small step
        per_step = list(zip(*(x.unbind(0) for x in (
            gates, gates[..., : 2 * hidden], gates[..., :hidden], gates[..., hidden : 2 * hidden],
            gates[..., 2 * hidden :], input_gates[..., 2 * hidden :], news, outputs,
        ))))
        for views, size in zip(per_step, batch_sizes):
            if size < batch:  # a sequence has ended: its row is skipped
                views = [v[:, :size] for v in views]
            gate, rz, r, z, hidden_n, input_n, new, output = views
            h = h_prev if h_prev.shape[1] == size else h_prev[:, :size]
            _baddbmm_into(gate, h, weight_t)
            rz.sigmoid_()
            n = torch.addcmul(input_n, r, hidden_n, out=new)
            h_prev = torch.lerp(n.tanh_(), h, z, out=output)  # n + z (h - n)
        ctx.save_for_backward(weight_hh, bias_hh, outputs, gates, news)
        ctx.batch_sizes = list(batch_sizes)
        ctx.input_dtype = dtype
        return outputs

    @staticmethod
    def backward(ctx, grad_outputs):
        weight_hh, bias_hh, outputs, gates, n = ctx.saved_tensors
        sizes = ctx.batch_sizes
        steps, num_dirs, batch, hidden = outputs.shape
        weight = weight_hh.to(outputs.dtype)  # [D, 3H, H]
        grad_outputs = grad_outputs.to(outputs.dtype)
        r, z, h_n = gates.split(hidden, dim=-1)
        previous = torch.cat([outputs.new_zeros(1, num_dirs, batch, hidden), outputs[:-1]])  # h_{t-1}
        n_factor = (1 - z) * (1 - n * n)  # dh -> d(pre-activation of n)
        # dh -> d(h W_hh^T + b_hh) of (r, z, n), every step at once: [T, D, B, 3, H]
        factors = torch.stack([n_factor * h_n * r * (1 - r), (previous - n) * z * (1 - z), n_factor * r], dim=3)
        grad_hidden_gates = torch.zeros_like(factors)  # stays 0 at ended rows
        grad_h = torch.zeros_like(outputs)  # dL/dh_t of running rows: from the output and from step t + 1
        grad_h[steps - 1, :, : sizes[-1]] = grad_outputs[steps - 1, :, : sizes[-1]]
        flat_hidden_gates = grad_hidden_gates.view(steps, num_dirs, batch, 3 * hidden)
        per_step = list(zip(*(x.unbind(0) for x in (
            grad_h, grad_h.unsqueeze(3), factors, grad_hidden_gates, flat_hidden_gates, z,
        ))))
        previous_grad_outputs = [None, *grad_outputs.unbind(0)[:-1]]  # at step t: the output gradient of step t - 1
        for t in range(steps - 1, -1, -1):
            size = sizes[t]
            views = per_step[t] if size == batch else [v[:, :size] for v in per_step[t]]
            d_h, d_h_wide, factor, d_hidden, d_hidden_flat, z_t = views
            torch.mul(factor, d_h_wide, out=d_hidden)
            if t:
                grad_output = previous_grad_outputs[t]
                step_grad = per_step[t - 1][0]
                if size < batch:
                    grad_output, step_grad = grad_output[:, :size], step_grad[:, :size]
                torch.addcmul(grad_output, d_h, z_t, out=step_grad)
                _baddbmm_into(step_grad, d_hidden_flat, weight)
                if sizes[t - 1] > size:  # rows whose sequence ends at step t - 1
                    grad_h[t - 1, :, size : sizes[t - 1]] = grad_outputs[t - 1, :, size : sizes[t - 1]]
        grad_hidden_gates = flat_hidden_gates
        grad_input_gates = torch.cat([grad_hidden_gates[..., : 2 * hidden], grad_h * n_factor], dim=-1)
        flat_grad = grad_hidden_gates.transpose(0, 1).reshape(num_dirs, steps * batch, 3 * hidden)
        flat_previous = previous.transpose(0, 1).reshape(num_dirs, steps * batch, hidden)
        grad_weight = torch.bmm(flat_grad.transpose(1, 2), flat_previous)
        grad_bias = flat_grad.sum(1)
        return (grad_input_gates.to(ctx.input_dtype), grad_weight.to(weight_hh.dtype), grad_bias.to(bias_hh.dtype),
                None)


RECURRENCE_ROUTES = ("cudnn", "loop")


def resolve_recurrence(recurrence: str, device: torch.device) -> str:
    """`MeritsConfig.recurrence` -> the route for tensors on `device`: "auto" is "loop" on CPU (our per-step loop is the
    fastest there) and "cudnn" on any other device (`nn.GRU` runs a whole layer in one cuDNN call on a GPU, where a
    Python loop would issue ~5 small kernels per step, layer and direction)."""
    if recurrence == "auto":
        return "loop" if torch.device(device).type == "cpu" else "cudnn"
    if recurrence not in RECURRENCE_ROUTES:
        raise ValueError(f"Unknown recurrence {recurrence!r}; valid ones are auto, {', '.join(RECURRENCE_ROUTES)}.")
    return recurrence


def _packed_positions(plan: MeritsTurnPlan) -> torch.Tensor:
    """Row i's index in the data of the `PackedSequence` of the plan's conversations (time-major, length-sorted:
    step t holds its `batch_sizes[t]` running conversations in rank order); computed once per plan."""
    positions = getattr(plan, "_packed_positions", None)
    if positions is None:
        sizes = torch.tensor(plan.batch_sizes, dtype=torch.long)
        offsets = (torch.cumsum(sizes, 0) - sizes).to(plan.turn_index.device)
        positions = offsets[plan.turn_index] + plan.forward_slots % plan.batch_size
        plan._packed_positions = positions
    return positions


def run_packed_gru_cudnn(gru: nn.GRU, rows: torch.Tensor, plan: MeritsTurnPlan) -> torch.Tensor:
    """`gru` itself over the plan's conversations as one `PackedSequence` (cuDNN on a GPU): rows [N, D_in] ->
    [N, num_directions * H], the same function (and parameters) as `run_packed_gru`'s loop route."""
    width = gru.hidden_size * (2 if gru.bidirectional else 1)
    if plan.num_real == 0:
        return rows.new_zeros(0, width)
    positions = _packed_positions(plan)
    data = rows.new_empty(rows.shape).index_copy(0, positions, rows)  # [N, D_in] in packed order
    packed = nn.utils.rnn.PackedSequence(data, torch.tensor(plan.batch_sizes, dtype=torch.long))
    output, _ = gru(packed)
    return output.data.index_select(0, positions)


def run_packed_gru(gru: nn.GRU, rows: torch.Tensor, plan: MeritsTurnPlan, recurrence: str = "loop") -> torch.Tensor:
    """`gru` (batch-first) over the real turns only, using its own parameters.

    rows [N, D_in] (row-major real turns) -> [N, num_directions * H]; equals `gru` on the packed sequences.
    `recurrence` ("auto" | "cudnn" | "loop", see `resolve_recurrence`): "cudnn" hands the packed sequences to `gru`
    itself; "loop" (no inter-layer dropout) computes each layer's input projection as one matrix product over the N
    real rows and only the recurrence loops over time (`MeritsGRURecurrence`). (Running the two experts' GRUs in one
    recurrence was tried: on a CPU a step costs one read of the [3H, H] weights per direction, so it saved nothing.)
    """
    if resolve_recurrence(recurrence, rows.device) == "cudnn":
        return run_packed_gru_cudnn(gru, rows, plan)
    if gru.dropout and gru.training and gru.num_layers > 1:
        raise ValueError("run_packed_gru does not implement inter-layer GRU dropout.")
    if plan.num_real == 0:
        return rows.new_zeros(0, gru.hidden_size * (2 if gru.bidirectional else 1))
    directions = [("", plan.forward_slots, plan.forward_rows)]
    if gru.bidirectional:
        directions.append(("_reverse", plan.reverse_slots, plan.reverse_rows))
    steps, batch, num_dirs = plan.max_length, plan.batch_size, len(directions)
    # row i's place in the flat [T * D * B] recurrence output, per direction: [N, D]
    places = torch.stack(
        [(slots // batch) * (num_dirs * batch) + d * batch + slots % batch for d, (_, slots, _) in enumerate(directions)],
        dim=1,
    )
    x = rows
    for layer in range(gru.num_layers):
        input_gates, weights, biases = [], [], []
        for suffix, _, slot_rows in directions:
            gates = F.linear(x, getattr(gru, f"weight_ih_l{layer}{suffix}"), getattr(gru, f"bias_ih_l{layer}{suffix}"))
            input_gates.append(gates[slot_rows].view(steps, batch, -1))  # time-major, length-sorted
            weights.append(getattr(gru, f"weight_hh_l{layer}{suffix}"))
            biases.append(getattr(gru, f"bias_hh_l{layer}{suffix}"))
        outputs = MeritsGRURecurrence.apply(
            torch.stack(input_gates, dim=1), torch.stack(weights), torch.stack(biases), plan.batch_sizes
        )  # [T, D, B, H]
        x = outputs.reshape(steps * num_dirs * batch, -1)[places].flatten(1)  # [N, D * H], directions side by side
    return x


# ---------------------------------------------------------------------------------------------------------------------
# Context encoders (Stage II / MiSTER-E speech and text experts)
# ---------------------------------------------------------------------------------------------------------------------


class MeritsContextEncoder(nn.Module):
    """Context over the turns of a conversation.

    kind="bigru_attention" (MERITS-L Stage II, §3.5): 2-layer Bi-GRU -> the two halves of the output (forward /
    backward direction) each projected by its own Linear(H, H) -> unscaled dot-product self-attention over turns with a
    row softmax and a key mask -> concatenated [B, T, 2H] context features -> Linear(2H, C).

    kind="conv_bigru" (MiSTER-E expert, §4.3): ReLU(Conv1d k=1) + ReLU(Conv1d k=3) + ReLU(Conv1d k=5) over the turn
    axis -> 3-layer Bi-GRU -> + Linear(D_in, 2H)(x) skip -> [B, T, 2H] -> Linear(2H, C).

    GRUs run packed, so padded turns never leak into real ones; inputs are zeroed at padded turns (so the convolutions
    see padding exactly as their own zero padding). With `causal=True` the GRU is unidirectional with hidden size 2H
    (same output size), the convolutions look only left and the attention is causal; `step` then runs one turn at a
    time from a cached state and equals the full causal forward.
    """

    def __init__(self, config: MeritsConfig, input_size: int, hidden_size: int, kind: str):
        super().__init__()
        if kind not in ("bigru_attention", "conv_bigru"):
            raise ValueError(f"Unknown context encoder kind {kind!r}; valid ones are bigru_attention, conv_bigru.")
        self.kind = kind
        self.causal = config.causal
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.output_size = 2 * hidden_size
        gru_hidden = hidden_size if not self.causal else 2 * hidden_size
        if kind == "conv_bigru":
            self.kernel_sizes = list(config.context_conv_kernel_sizes)
            self.convs = nn.ModuleList(
                [
                    nn.Conv1d(input_size, config.context_conv_channels, k, padding=0 if self.causal else k // 2)
                    for k in self.kernel_sizes
                ]
            )
            gru_input = config.context_conv_channels
            self.skip = nn.Linear(input_size, self.output_size)
        else:
            gru_input = input_size
            self.direction_projections = nn.ModuleList([nn.Linear(hidden_size, hidden_size) for _ in range(2)])
        self.gru = nn.GRU(
            gru_input,
            gru_hidden,
            num_layers=config.context_num_layers,
            batch_first=True,
            bidirectional=not self.causal,
        )
        self.dropout = MeritsDropout(config.context_dropout)
        self.classifier = nn.Linear(self.output_size, config.num_labels)
        self.recurrence = getattr(config, "recurrence", "auto")  # resolved per call by the input's device
        _mark_conversation_level(self)

    # ---- full conversation ------------------------------------------------------------------------------------
    def _attend(self, gru_out, key_mask):
        """MERITS-L self-attention per direction half. `key_mask` [B, T] bool = turns that may be attended."""
        length = gru_out.shape[1]
        allowed = key_mask[:, None, :].expand(-1, length, -1)
        if self.causal:
            allowed = allowed & causal_mask(length, gru_out.device)
        halves = gru_out.split(self.hidden_size, dim=-1)
        outputs = []
        for half, projection in zip(halves, self.direction_projections):
            p = projection(half)
            scores = p @ p.transpose(1, 2)  # plain, unscaled dot product (§3.5)
            outputs.append(masked_softmax(scores, allowed) @ p)
        return torch.cat(outputs, dim=-1)

    @property
    def conv_gap(self):
        """Zeros needed around a conversation so that the convolutions see only its own turns."""
        return max(self.kernel_sizes) - 1 if self.kind == "conv_bigru" else 0

    def _convolve_rows(self, rows, plan):
        """Real rows [N, D] -> sum of ReLU(conv_k) over each conversation's turn axis -> [N, channels].

        The conversations are laid end to end in ONE sequence with `plan.gap` zeros around each, and only the N real
        output positions are computed: each is one matrix product of its window of turns (im2col) with the kernel,
        which equals `Conv1d` with zero padding (left-only when causal) applied to each conversation alone."""
        if plan.gap < self.conv_gap:
            raise ValueError(f"The turn plan has gap {plan.gap}, the convolutions need {self.conv_gap}.")
        sequence = rows.new_zeros(plan.conv_length, rows.shape[-1])
        sequence[plan.conv_positions] = rows
        widest = max(self.kernel_sizes)
        first = -(widest - 1) if self.causal else -(widest // 2)  # offset of the window's first turn
        offsets = torch.arange(first, first + widest, device=rows.device)
        windows = sequence[plan.conv_positions.unsqueeze(1) + offsets].transpose(1, 2)  # [N, D, widest]
        out = 0
        for kernel_size, conv in zip(self.kernel_sizes, self.convs):
            start = widest - kernel_size if self.causal else (widest - kernel_size) // 2
            # [N, D * k], channel-major like the Conv1d weight [C, D, k]: its flat view needs no copy (nor its gradient)
            taps = windows[..., start : start + kernel_size].reshape(windows.shape[0], -1)
            out = out + torch.relu(F.linear(taps, conv.weight.view(conv.out_channels, -1), conv.bias))
        return out

    def forward(self, x, turn_mask, key_mask=None, plan=None, exported=None):
        """x [B, T, D], turn_mask [B, T] (real turns), key_mask [B, T] (turns that have this modality) ->
        (features [B, T, 2H], logits [B, T, C]); both zero at padded turns.

        Everything but the attention runs on the N real turns only (`plan`, a `MeritsTurnPlan` shared by the
        modules of one forward; built here when not given). With `exported` (features [B, T, 2H] this encoder returned
        before: stage III trains on them, §3.1) only the classifier runs."""
        if exported is not None:
            return self.classify(exported, turn_mask)
        turn_mask = turn_mask.bool()
        key_mask = turn_mask if key_mask is None else key_mask.bool() & turn_mask
        if plan is None:
            plan = MeritsTurnPlan(turn_mask, gap=self.conv_gap)
        rows = plan.gather(x)  # [N, D]
        gru_in = self._convolve_rows(rows, plan) if self.kind == "conv_bigru" else rows
        gru_out = run_packed_gru(self.gru, gru_in, plan, self.recurrence)  # [N, 2H]
        if self.kind == "conv_bigru":
            features = gru_out + self.skip(rows)
            logits = self.classifier(self.dropout(features))
            return plan.scatter(features), plan.scatter(logits)
        features = self._attend(plan.scatter(gru_out), key_mask)
        features = features * turn_mask.unsqueeze(-1).to(features.dtype)
        logits = self.classifier(self.dropout(features)) * turn_mask.unsqueeze(-1).to(features.dtype)
        return features, logits

    def classify(self, features, turn_mask):
        """Exported stage II features [B, T, 2H] (as `forward` returned them) -> (features, logits), zero at padded
        turns: the classifier alone, so that stage III can train on features computed once (§3.1)."""
        expected = (*turn_mask.shape, self.output_size)
        if tuple(features.shape) != expected:
            raise ValueError(f"exported context features must be [B, T, 2H] = {expected}, got {tuple(features.shape)}.")
        features = features.to(self.classifier.weight.dtype)
        keep = turn_mask.bool().unsqueeze(-1).to(features.dtype)
        features = features * keep
        return features, self.classifier(self.dropout(features)) * keep

    # ---- streaming (causal only) ------------------------------------------------------------------------------
    def init_state(self, batch_size, device, dtype):
        state = {"gru": None}
        if self.kind == "conv_bigru":
            state["window"] = torch.zeros(batch_size, max(self.kernel_sizes) - 1, self.input_size, device=device, dtype=dtype)
        else:
            state["keys"] = [torch.zeros(batch_size, 0, self.hidden_size, device=device, dtype=dtype) for _ in range(2)]
            state["key_mask"] = torch.zeros(batch_size, 0, dtype=torch.bool, device=device)
        return state

    def step(self, x, key_mask, state):
        """One turn: x [B, D], key_mask [B] -> (features [B, 2H], logits [B, C], new_state). Causal only."""
        if not self.causal:
            raise ValueError("Streaming needs a causal context encoder (config.causal=True).")
        new_state = {}
        if self.kind == "conv_bigru":
            window = torch.cat([state["window"], x.unsqueeze(1)], dim=1)  # [B, kmax, D]
            conv_out = 0
            for kernel_size, conv in zip(self.kernel_sizes, self.convs):
                conv_out = conv_out + torch.relu(conv(window[:, -kernel_size:].transpose(1, 2)))
            gru_in = conv_out.transpose(1, 2)  # [B, 1, channels]
            new_state["window"] = window[:, 1:]
        else:
            gru_in = x.unsqueeze(1)
        gru_out, hidden = self.gru(gru_in, state["gru"])
        new_state["gru"] = hidden
        if self.kind == "conv_bigru":
            features = gru_out[:, 0] + self.skip(x)
        else:
            mask = torch.cat([state["key_mask"], key_mask.bool().unsqueeze(1)], dim=1)  # [B, t]
            new_state["key_mask"] = mask
            new_state["keys"] = []
            outputs = []
            for half, projection, cached in zip(
                gru_out[:, 0].split(self.hidden_size, dim=-1), self.direction_projections, state["keys"]
            ):
                p = projection(half)  # [B, H]
                keys = torch.cat([cached, p.unsqueeze(1)], dim=1)  # [B, t, H]
                new_state["keys"].append(keys)
                scores = (keys @ p.unsqueeze(-1)).squeeze(-1)  # [B, t]
                outputs.append((masked_softmax(scores, mask).unsqueeze(1) @ keys).squeeze(1))
            features = torch.cat(outputs, dim=-1)
        logits = self.classifier(self.dropout(features))
        return features, logits, new_state


__all__ = [
    "RECURRENCE_ROUTES",
    "MeritsContextEncoder",
    "MeritsGRURecurrence",
    "MeritsTurnPlan",
    "resolve_recurrence",
    "run_packed_gru",
    "run_packed_gru_cudnn",
]
