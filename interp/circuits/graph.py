"""An attribution graph for one prompt through MLP transcoders (Ameisen et al. 2025, the method
of circuit-tracer), with every edge exact.

The local replacement model: attention patterns and norm scales are frozen at their values on the
prompt, and every MLP's output is a constant: at a layer with a transcoder, its active features
(the set and the activations as they fired, each writing activation x decoder row), its decoder
bias and its error (the MLP's output minus the transcoder's reconstruction); at a layer without
one, the MLP's output itself, one MLP-error node per position. A skip transcoder's linear term
stays live (it is linear in the residual stream). What remains is linear in the nodes, so a
node's input (a feature's pre-activation; the target: a logit, a logit difference or any
direction read from the final norm's output) is exactly the sum of the edges into it,

    edge(s -> t) = output_s . d input_t / d output_s,

the direct effect of s on t, holding every other node fixed. One batched backward pass computes
the edges into a batch of targets. A transcoder's bias node carries its decoder bias into the
residual stream and its encoder bias into its own features at that position, so that the sum
rule holds with nothing left over; the checks measure it on every node (`sum_rule_error`) and
compare the edges with forward passes that move one node (`intervention_error`).

Pruning keeps the nodes carrying `node_threshold` of the target's influence (influence: the
target's share through all paths of the normalised absolute edges) and, among them, the edges
carrying `edge_threshold`; tokens and the target always stay. The strongest kept edges are split
by the first attention head on their paths (`head_split`): query heads, each reading its group's
key-value head under grouped-query attention, plus the residual path at the same position.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from interp.circuits.weights import transcoder_layer
from interp.errors import BadInput, check_positive
from interp.hooks import capture, splice
from interp.sae.base import SparseCoder

FEATURE, ERROR, EMBEDDING, BIAS, TARGET = "feature", "error", "embedding", "bias", "target"
FINAL = "ln_final.hook_out"
"""The final norm's output: what the unembedding reads, and where a target's direction lives."""


@dataclass
class Target:
    """What a graph explains at `position` of the prompt: the logit of `answer`, the logit
    difference `answer` - `wrong`, or `direction` . (the final norm's output). With none given,
    the logit of the model's top prediction."""

    answer: int | None = None
    wrong: int | None = None
    direction: torch.Tensor | None = None
    position: int = -1

    def vector(self, model) -> torch.Tensor:
        """(d_model,) the direction in the final norm's output whose dot product is the target."""
        if self.direction is not None:
            if self.answer is not None or self.wrong is not None:
                raise BadInput("a target is a direction or a logit (difference), not both")
            direction = torch.as_tensor(self.direction).flatten().to(model.W_U)
            if direction.numel() != model.cfg.d_model:
                raise BadInput(f"a target direction has the model's width {model.cfg.d_model}, got {direction.numel()} numbers")
            return direction
        if self.answer is None:
            raise BadInput("a logit target needs an answer token")
        W_U = model.W_U.detach()
        for name, token in (("answer", self.answer), ("wrong", self.wrong)):
            if token is not None and not 0 <= token < W_U.shape[1]:
                raise BadInput(f"{name} token {token} is outside the vocabulary (0..{W_U.shape[1] - 1})")
        return W_U[:, self.answer] - (W_U[:, self.wrong] if self.wrong is not None else 0.0)

    def label(self, tokenizer) -> str:
        if self.direction is not None:
            return "direction"
        answer = repr(tokenizer.decode([self.answer]))
        return f"logit {answer}" if self.wrong is None else f"logit {answer} - {tokenizer.decode([self.wrong])!r}"


@dataclass
class Graph:
    """Every node of one prompt's graph and the dense edges into every node that has an input."""

    tokens: list[int]
    n_layers: int
    kind: list[str]
    """Per node: feature, error, embedding, bias or target; in that order, features by layer,
    position and latent, errors by layer and position."""
    layer: torch.Tensor
    """(nodes,) the block a feature, error or bias belongs to; -1 for embeddings, n_layers for the target."""
    position: torch.Tensor
    """(nodes,)"""
    feature: torch.Tensor
    """(nodes,) the latent of a feature, the token of an embedding, -1 otherwise."""
    activation: torch.Tensor
    """(nodes,) a feature's activation; 0 for other nodes."""
    rows: torch.Tensor
    """(rows,) the node of each row of `adjacency`: every feature, then the target."""
    inputs: torch.Tensor
    """(rows,) each row node's input as the model computes it (a pre-activation, the target's value)."""
    adjacency: torch.Tensor
    """(rows, nodes): adjacency[r, s] is the edge from node s into node rows[r]."""
    direction: torch.Tensor
    """(d_model,) the target's direction in the final norm's output."""
    replacement: _Prompt = field(repr=False)
    """The frozen values and constants the edges were computed under (for interventions)."""

    @property
    def target(self) -> int:
        return len(self.kind) - 1

    def sum_rule_error(self) -> torch.Tensor:
        """(rows,) |sum of edges in - input| / |input| for every node with an input."""
        return (self.adjacency.double().sum(1) - self.inputs.double()).abs() / self.inputs.double().abs().clamp_min(1e-12)


class _Sources:
    """The nodes that write into one hook (an MLP's output, the embedding), each a vector at a
    position; laid out by position (zero-padded) so that their edges are one batched product."""

    def __init__(self, nodes: torch.Tensor, position: torch.Tensor, vector_sd: torch.Tensor, n_pos: int):
        self.nodes, self.position, self.vector_sd = nodes, position, vector_sd
        order = position.argsort(stable=True)
        counts = torch.bincount(position, minlength=n_pos)
        starts = counts.cumsum(0) - counts
        self.slot = torch.empty_like(position)
        self.slot[order] = torch.arange(len(position)) - starts[position[order]]
        self.vector_psd = torch.zeros(n_pos, int(counts.max()), vector_sd.shape[1], dtype=vector_sd.dtype)
        self.vector_psd[position, self.slot] = vector_sd

    def edges(self, grad_bpd: torch.Tensor) -> torch.Tensor:
        """(batch, s) each source's vector . the gradient at its position."""
        per_position_pbs = torch.bmm(grad_bpd.transpose(0, 1), self.vector_psd.to(grad_bpd).transpose(1, 2))
        return per_position_pbs[self.position, :, self.slot].t()


@dataclass
class _Prompt:
    """What one clean pass of the prompt leaves: the frozen patterns and scales, each MLP's
    constant output, each transcoder's code, and the nodes."""

    frozen: dict[str, torch.Tensor]
    constant: dict[int, torch.Tensor]  # layer -> (1, pos, d) the MLP output the replacement holds fixed
    skips: dict[int, tuple[SparseCoder, torch.Tensor]]  # layer -> (skip transcoder, its edited positions (pos,))
    sources: dict[str, _Sources]  # hook -> the nodes written there
    read: dict[int, torch.Tensor]  # coder layer -> (1, pos, d) what it read


def mlp_hook(layer: int) -> str:
    return f"blocks.{layer}.hook_mlp_out"


def frozen_hooks(model) -> list[str]:
    """The hooks whose values the replacement model holds at the prompt's: attention patterns and
    norm scales."""
    hooks = [f"blocks.{l}.attn.hook_pattern" for l in range(model.cfg.n_layers)]
    hooks += [f"blocks.{l}.{norm}.hook_scale" for l in range(model.cfg.n_layers) for norm in ("ln1", "ln2")]
    missing = [h for h in hooks + ["ln_final.hook_scale"] if h not in model.hook_dict]
    if missing:
        raise BadInput(f"attribution graphs freeze attention patterns and RMS norm scales; this model has no {missing[0]}")
    return hooks + ["ln_final.hook_scale"]


def by_layer(model, coders: list[SparseCoder]) -> dict[int, SparseCoder]:
    """The transcoders by the layer whose MLP they replace; a clear error for anything else."""
    found: dict[int, SparseCoder] = {}
    for coder in coders:
        layer = transcoder_layer(coder)
        if layer in found:
            raise BadInput(f"two transcoders replace the MLP of layer {layer}: give one per layer")
        found[layer] = coder
    biases = [name for name, p in model.named_parameters() if name.endswith("bias") and p.abs().max() > 0]
    if biases or (getattr(model, "b_U", None) is not None and model.b_U.abs().max() > 0):
        raise BadInput(f"attribution graphs here handle bias-free models (Llama-style, like SmolLM2); this one has {biases[:1] or ['b_U']}")
    return dict(sorted(found.items()))


def frozen_pass(model, tokens_1t: torch.Tensor, prompt: _Prompt, hooks: list[str], constant: dict[int, torch.Tensor] | None = None,
                patch: dict[str, Callable] | None = None) -> dict[str, torch.Tensor]:
    """The replacement model's forward pass, with gradients: {hook: (1, pos, *dims)} in the graph.
    `constant` overrides MLP outputs (interventions); `patch` adds activation patches."""
    constant = prompt.constant if constant is None else constant
    patches: dict[str, Callable] = {hook: (lambda act, value=value: value) for hook, value in prompt.frozen.items()}
    live: dict[str, torch.Tensor] = {}
    for layer, value in constant.items():
        if layer in prompt.skips:
            coder, edited_p = prompt.skips[layer]

            def store(act, read=coder.cfg.hook):
                live[read] = act
                return act

            def with_skip(act, value=value, coder=coder, edited_p=edited_p):
                x_pd = live.pop(coder.cfg.hook)[0]
                skip_pd = torch.zeros_like(value[0])
                skip_pd[edited_p] = (x_pd[edited_p] @ coder.model_units().W_skip.t().to(x_pd)).to(value)
                return value + skip_pd[None]

            patches[coder.cfg.hook] = store
            patches[mlp_hook(layer)] = with_skip
        else:
            patches[mlp_hook(layer)] = lambda act, value=value: value
    patches.update(patch or {})
    with warnings.catch_warnings():
        # TransformerLens says a norm computed from an edited hook_scale may differ from the
        # unhooked one at rounding scale: that edit is the freeze, and the sum rule measures it.
        warnings.filterwarnings("ignore", message="A forward hook edited hook_scale")
        return capture(model, tokens_1t, hooks, patch=patches, keep_graph=True)


def read_prompt(model, coders: dict[int, SparseCoder], tokens_1t: torch.Tensor) -> tuple[_Prompt, dict]:
    """One clean pass with the transcoders spliced in (reconstruction + error: the model computes
    what it does): the frozen values, the constants and the nodes (as a dict of per-node lists)."""
    n_layers, n_pos = model.cfg.n_layers, tokens_1t.shape[1]
    frozen = frozen_hooks(model)
    hooks = frozen + [mlp_hook(l) for l in range(n_layers)] + ["hook_embed"] + [c.cfg.hook for c in coders.values()]
    with splice(model, list(coders.values()), keep_error=True) as records:
        acts = {hook: act.detach() for hook, act in capture(model, tokens_1t, hooks, keep_graph=True).items()}
    nodes = {"kind": [], "layer": [], "position": [], "feature": [], "activation": []}

    def add(kind, layer, position, feature=-1, activation=0.0):
        nodes["kind"].append(kind)
        nodes["layer"].append(layer)
        nodes["position"].append(position)
        nodes["feature"].append(feature)
        nodes["activation"].append(activation)
        return len(nodes["kind"]) - 1

    written: dict[int, list[tuple[int, int, torch.Tensor]]] = {l: [] for l in range(n_layers)}  # (node, pos, vector)
    constant: dict[int, torch.Tensor] = {}
    skips: dict[int, tuple[SparseCoder, torch.Tensor]] = {}
    edited: dict[int, torch.Tensor] = {}
    for record in records:
        layer = transcoder_layer(record.coder)
        units = record.coder.model_units()
        edited_p = record.mask_bt[0].nonzero().flatten()
        edited[layer] = edited_p
        for row, p in enumerate(edited_p.tolist()):
            for latent, value in zip(record.code.indices_bk[row].tolist(), record.code.values_bk[row].tolist()):
                if latent >= 0 and value != 0:
                    written[layer].append((add(FEATURE, layer, p, latent, value), p, value * units.W_dec[latent]))
        if record.coder.cfg.skip:
            skips[layer] = (record.coder, edited_p)
    for layer in range(n_layers):
        mlp_pd = acts[mlp_hook(layer)][0]
        error_pd = mlp_pd.clone()
        if layer in coders:
            record = records[list(coders).index(layer)]
            error_pd[edited[layer]] = record.error_td.to(error_pd)
        for p in range(n_pos):
            written[layer].append((add(ERROR, layer, p), p, error_pd[p]))
    embed = [(add(EMBEDDING, -1, p, int(tokens_1t[0, p])), p, acts["hook_embed"][0, p]) for p in range(n_pos)]
    bias_node: dict[tuple[int, int], int] = {}
    for layer, coder in coders.items():
        b_dec = coder.model_units().b_dec
        for p in edited[layer].tolist():
            bias_node[(layer, p)] = add(BIAS, layer, p)
            written[layer].append((bias_node[(layer, p)], p, b_dec))
    add(TARGET, n_layers, n_pos - 1)

    def sources(entries) -> _Sources:
        index, position, vectors = zip(*entries)
        return _Sources(torch.tensor(index), torch.tensor(position), torch.stack(vectors).to(acts["hook_embed"]), n_pos)

    by_hook = {"hook_embed": sources(embed)} | {mlp_hook(l): sources(written[l]) for l in range(n_layers)}
    for layer in range(n_layers):
        # The constant the replacement holds is the sum of the nodes it stands for, so the graph's
        # sum rule is exact by construction here and is tested against the model's own values.
        src = by_hook[mlp_hook(layer)]
        value = torch.zeros_like(src.vector_sd[:n_pos]).index_add_(0, src.position, src.vector_sd)
        constant[layer] = value[None].to(acts[mlp_hook(layer)])
    prompt = _Prompt({h: acts[h] for h in frozen}, constant, skips, by_hook, {l: acts[c.cfg.hook] for l, c in coders.items()})
    nodes["bias_node"] = bias_node
    return prompt, nodes


def memory_bytes(n_rows: int, n_nodes: int, n_pos: int, d_model: int, n_layers: int, batch: int) -> int:
    """What a graph's build holds at its peak: the dense adjacency, one batch's gradients at every
    MLP output and the embedding, and their gathers at the sources."""
    return 4 * (n_rows * n_nodes + batch * (n_layers + 1) * n_pos * d_model * 2)


def build_graph(model, coders: list[SparseCoder], tokens_1t: torch.Tensor, target: Target, batch: int = 64,
                progress: bool = True, say: Callable[[str], None] | None = None) -> Graph:
    """The full (unpruned) graph of `tokens_1t` (1, pos) through `coders` (MLP transcoders, any
    subset of layers), explaining `target`."""
    check_positive("batch", batch)
    coders_at = by_layer(model, coders)
    tokens_1t = tokens_1t.to(model.cfg.device)
    n_layers, n_pos, d_model = model.cfg.n_layers, tokens_1t.shape[1], model.cfg.d_model
    position = target.position % n_pos
    direction = target.vector(model)
    prompt, nodes = read_prompt(model, coders_at, tokens_1t)
    kinds = nodes["kind"]
    features = [i for i, k in enumerate(kinds) if k == FEATURE]
    n_nodes, n_rows = len(kinds), len(features) + 1
    if say is not None:
        gib = memory_bytes(n_rows, n_nodes, n_pos, d_model, n_layers, batch) / 2**30
        say(f"graph: {len(features)} features, {n_nodes} nodes; it needs about {gib:.2f} GiB beyond the model")
    nodes["position"][-1] = position
    nodes["feature"][-1] = -1 if target.answer is None or target.direction is not None else target.answer
    # float64 models (tests, to see exactness beyond float32's rounding) keep their precision here
    dtype = torch.float64 if model.cfg.dtype == torch.float64 else torch.float32
    adjacency = torch.zeros(n_rows, n_nodes, dtype=dtype)
    inputs = torch.zeros(n_rows, dtype=dtype)
    hooks = ["hook_embed"] + [mlp_hook(l) for l in range(n_layers)] + [c.cfg.hook for c in coders_at.values()] + [FINAL]
    acts = frozen_pass(model, tokens_1t, prompt, hooks)
    layer_of = torch.tensor(nodes["layer"])
    pos_of = torch.tensor(nodes["position"])
    latent_of = torch.tensor(nodes["feature"])
    jobs = []  # (output hook, its layer, rows, the gradient to inject (rows, pos, d))
    for layer, coder in coders_at.items():
        rows = torch.tensor([i for i in features if nodes["layer"][i] == layer], dtype=torch.long)
        if len(rows) == 0:
            continue
        units = coder.model_units()
        x_pd = prompt.read[layer][0].to(units.W_enc)
        pre = coder.preacts(coder.encoder_input(coder.normalized_input(x_pd)))
        inputs[rows] = pre[pos_of[rows], latent_of[rows]].to(dtype).cpu()
        for r in rows.tolist():
            adjacency[r, nodes["bias_node"][(layer, int(pos_of[r]))]] = float(units.b_enc[latent_of[r]])
        jobs.append((coder.cfg.hook, layer, rows, units.W_enc[latent_of[rows]], pos_of[rows]))
    target_row = n_rows - 1
    jobs.append((FINAL, n_layers, torch.tensor([target_row]), direction[None], torch.tensor([position])))
    with torch.no_grad():
        inputs[target_row] = float(target_value(model, tokens_1t, direction, position))
    bar = tqdm(total=n_rows, desc="graph", unit="node", disable=not progress)
    for hook, layer, rows, directions_rd, positions in jobs:
        upstream = ["hook_embed"] + [mlp_hook(l) for l in range(min(layer, n_layers))]
        out = acts[hook]
        for start in range(0, len(rows), batch):
            chunk = slice(start, start + batch)
            grads = _batched_grads(out, [acts[h] for h in upstream], directions_rd[chunk], positions[chunk])
            for h, grad in zip(upstream, grads):
                src = prompt.sources[h]
                adjacency[rows[chunk, None], src.nodes[None]] += src.edges(grad[:, 0]).to(dtype).cpu()
            bar.update(len(rows[chunk]))
    bar.close()
    row_nodes = torch.tensor(features + [n_nodes - 1])
    return Graph(tokens_1t[0].tolist(), n_layers, kinds, layer_of, pos_of, latent_of, torch.tensor(nodes["activation"]),
                 row_nodes, inputs, adjacency, direction, prompt)


def _batched_grads(out: torch.Tensor, inputs: list[torch.Tensor], directions_rd: torch.Tensor, positions: torch.Tensor) -> list[torch.Tensor]:
    """d(direction_r . out[0, position_r]) / d(input) for each row r at once: [(rows, 1, pos, d)]."""
    seed = torch.zeros(len(directions_rd), *out.shape, dtype=out.dtype, device=out.device)
    seed[torch.arange(len(directions_rd)), 0, positions.to(out.device)] = directions_rd.to(out)
    grads = torch.autograd.grad(out, inputs, seed, retain_graph=True, is_grads_batched=True, allow_unused=True)
    return [torch.zeros_like(seed) if g is None else g for g in grads]


def target_value(model, tokens_1t: torch.Tensor, direction: torch.Tensor, position: int) -> torch.Tensor:
    """direction . (the final norm's output) at `position`, from a plain forward pass of the model."""
    final = capture(model, tokens_1t, [FINAL])[FINAL]
    return final[position] @ direction.to(final)


def written_hook(graph: Graph, node: int) -> str:
    """Where a source node writes: the embedding, or its layer's MLP output."""
    if graph.kind[node] == TARGET:
        raise BadInput("the target has no output")
    return "hook_embed" if graph.kind[node] == EMBEDDING else mlp_hook(int(graph.layer[node]))


def output_vector(graph: Graph, node: int) -> torch.Tensor:
    """(d_model,) what a source node adds to the residual stream at its position."""
    sources = graph.replacement.sources[written_hook(graph, node)]
    return sources.vector_sd[(sources.nodes == node).nonzero().flatten()[0]]


def row_inputs(model, graph: Graph, coders: list[SparseCoder], acts: dict[str, torch.Tensor]) -> torch.Tensor:
    """(rows,) every row node's input read off a pass's activations: the features' pre-activations
    as their coders compute them from what they read, and the target."""
    coders_at = by_layer(model, coders)
    out = torch.zeros(len(graph.rows), dtype=torch.float64)
    features = graph.rows[:-1]
    for layer, coder in coders_at.items():
        mine = (graph.layer[features] == layer).nonzero().flatten()
        if len(mine) == 0:
            continue
        x_pd = acts[coder.cfg.hook][0].detach().to(coder.W_enc)
        pre = coder.preacts(coder.encoder_input(coder.normalized_input(x_pd)))
        out[mine] = pre[graph.position[features[mine]], graph.feature[features[mine]]].double().cpu()
    position = int(graph.position[graph.target])
    out[-1] = float(acts[FINAL][0, position].detach() @ graph.direction.to(acts[FINAL]))
    return out


@torch.no_grad()
def intervene(model, graph: Graph, coders: list[SparseCoder], node: int, scale: float) -> torch.Tensor:
    """(rows,) the change in every row node's input when `node`'s output is multiplied by
    `scale`, everything else held as in the replacement model: by forward passes alone, the
    reference the edges must match (scale - 1) x adjacency[:, node]."""
    replacement = graph.replacement
    kind, layer, position = graph.kind[node], int(graph.layer[node]), int(graph.position[node])
    hooks = [c.cfg.hook for c in coders] + [FINAL]
    constant, patch = dict(replacement.constant), {}
    vector_d = output_vector(graph, node)
    if kind == EMBEDDING:
        def shift(act):
            act = act.clone()
            act[0, position] += (scale - 1) * vector_d.to(act)
            return act
        patch["hook_embed"] = shift
    else:
        moved = constant[layer].clone()
        moved[0, position] += (scale - 1) * vector_d.to(moved)
        constant[layer] = moved
    tokens_1t = torch.tensor([graph.tokens], device=model.cfg.device)
    before = row_inputs(model, graph, coders, frozen_pass(model, tokens_1t, replacement, hooks))
    after = row_inputs(model, graph, coders, frozen_pass(model, tokens_1t, replacement, hooks, constant=constant, patch=patch))
    return after - before
