"""The one place that knows how coders meet the model: which hook a coder reads and which it
writes, positions flattened to tokens and back, activations (and loss gradients) captured at a
set of hooks, and a splice that puts any number of coders into the model at once.

A coder reads `coder.cfg.hook` and writes `output_hook(coder)`: its target for a transcoder, the
hook it reads for an SAE. A hook's activation is (batch, pos, *dims); coders see it flattened to
(tokens, features), heads of `attn.hook_z` concatenated.

`splice(model, coders)` replaces each coder's written activation by its reconstruction of what
it reads (`keep_error=False`), or by reconstruction + error, where error = clean - reconstruction
(`keep_error=True`: the model computes exactly what it did, but each coder's features and error
term are tensors of the forward pass). With `expose=True` and gradients enabled, the features
(`code.values_bk`) and the error of every coder receive gradients: the error enters as a leaf
(its value fixed, as Marks et al. treat error nodes), the features stay connected to what the
coder read, so a gradient reaches an upstream coder's features through a downstream coder's.
Coders edit only where `where` allows (by default every position but 0, the BOS token no coder
trains on) and only tokens they cover (`max_input_norm`); elsewhere the activation passes
unchanged. All coders are in at once: a coder reading a hook that another
coder writes reads the other's output.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from interp.errors import BadInput
from interp.models import check_hooks, hook_widths, stop_layer
from interp.sae.base import SparseCode, SparseCoder

Activations = dict[str, torch.Tensor]
Where = Callable[[int, int, torch.device], torch.Tensor]
"""(batch, seq_len, device) -> bool mask (batch, seq_len) or (seq_len,) of the positions to edit."""


def written_hook(read: str, target: str | None) -> str:
    """The hook a coder reading `read` writes: its target for a transcoder, else `read`."""
    return target or read


def output_hook(coder: SparseCoder) -> str:
    """The hook `coder` writes."""
    return written_hook(coder.cfg.hook, coder.cfg.target_hook)


def hook_pair(read: str, target: str | None) -> list[str]:
    """The distinct hooks a coder reading `read` and reconstructing `target` (None: itself) needs."""
    return list(dict.fromkeys([read, written_hook(read, target)]))


def coder_hooks(coder: SparseCoder) -> list[str]:
    return hook_pair(coder.cfg.hook, coder.cfg.target_hook)


def grad_key(hook: str) -> str:
    """Where captured activations keep the loss gradient at `hook`."""
    return f"{hook}:grad"


def by_position(act: torch.Tensor) -> torch.Tensor:
    """(batch, pos, *dims) -> (batch, pos, features): heads of hook_z concatenated."""
    return act.reshape(*act.shape[:2], -1)


def flatten_positions(act: torch.Tensor, mask_bt: torch.Tensor) -> torch.Tensor:
    """(batch, pos, *dims) -> (kept positions, features)."""
    return by_position(act)[mask_bt]


def check_coder_fits(model, coder: SparseCoder) -> None:
    """Raise unless the model has the coder's hooks, at the widths the coder was trained on."""
    try:
        check_hooks(model, coder_hooks(coder))
    except BadInput as err:
        raise BadInput(f"the coder was trained on {coder.cfg.model or 'another model'}: {err}") from None
    widths = hook_widths(model, coder_hooks(coder))
    for hook, width in ((coder.cfg.hook, coder.cfg.d_in), (output_hook(coder), coder.cfg.d_out)):
        if widths[hook] != width:
            raise BadInput(
                f"the coder expects width {width} at {hook}, but this model's {hook} has width {widths[hook]}; "
                f"was the coder trained on this model ({coder.cfg.model or 'unknown'})?"
            )


def capture(
    model, tokens_bt: torch.Tensor, hooks: Sequence[str], mask_bt: torch.Tensor | None = None, with_grads: bool = False,
    objective: Callable[[torch.Tensor], torch.Tensor] | None = None,
    patch: dict[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
    keep_graph: bool = False,
) -> Activations:
    """{hook: (kept positions, features)} of one forward pass over `tokens_bt`, at the positions
    `mask_bt` keeps (all by default). Without gradients the pass stops after the deepest hooked
    block; with them it runs to the end and also returns, under `grad_key(hook)`, the gradient
    with respect to each hooked activation of the summed next-token loss, or of
    `objective(logits_bsv)` (a scalar) when given. Each gradient is the total derivative: through
    every path, later hooked activations included. `patch[hook](act)` replaces a hooked activation
    (batch, pos, *dims) before anything reads it (activation patching); its gradient is then the
    gradient at the patched value. With `keep_graph` the pass runs with gradients enabled and
    returns the activations themselves, (batch, pos, *dims) and still in the autograd graph, for
    the caller to differentiate one by another (edges between coders)."""
    hooks = list(dict.fromkeys(hooks))
    check_hooks(model, hooks)
    tokens_bt = tokens_bt.to(model.cfg.device)
    mask_bt = torch.ones_like(tokens_bt, dtype=torch.bool) if mask_bt is None else mask_bt.to(tokens_bt.device)
    captured: dict[str, torch.Tensor] = {}

    check_hooks(model, list(patch or {}))
    by_name = {model.hook_dict[hook].name: fn for hook, fn in (patch or {}).items()}

    def keep(act, hook):
        if hook.name in by_name:
            act = by_name[hook.name](act)
        if with_grads or keep_graph:
            # The model's weights are frozen: the first hooked activation becomes the leaf the loss
            # is differentiated by; later ones, computed from it, keep their graph (and their .grad
            # only for with_grads: a caller of keep_graph differentiates with autograd.grad, and
            # a retained .grad would accumulate across its calls).
            act = _exposed(act, leaf=False, retain=with_grads)
        captured[hook.name] = act
        return act

    names = {hook: model.hook_dict[hook].name for hook in hooks}
    fwd_hooks = [(name, keep) for name in set(names.values()) | set(by_name)]
    if with_grads:
        with torch.enable_grad():
            if objective is None:
                loss = model.run_with_hooks(tokens_bt, fwd_hooks=fwd_hooks, return_type="loss", loss_per_token=True).sum()
            else:
                loss = objective(model.run_with_hooks(tokens_bt, fwd_hooks=fwd_hooks, return_type="logits"))
            loss.backward()
    else:
        with torch.set_grad_enabled(keep_graph):
            model.run_with_hooks(tokens_bt, fwd_hooks=fwd_hooks, return_type=None, stop_at_layer=stop_layer(model, hooks))
        if keep_graph:
            return {hook: captured[name] for hook, name in names.items()}
    out: Activations = {}
    for hook, name in names.items():
        act = captured[name]
        out[hook] = flatten_positions(act.detach(), mask_bt)
        if with_grads:
            out[grad_key(hook)] = flatten_positions(act.grad, mask_bt)
    return out


@torch.no_grad()
def patched_logits(model, tokens_bt: torch.Tensor, patch: dict[str, Callable[[torch.Tensor], torch.Tensor]]) -> torch.Tensor:
    """(batch, pos, vocab) logits of a forward pass in which `patch[hook](act)` replaces each named
    activation (batch, pos, *dims) before anything reads it (activation patching)."""
    check_hooks(model, list(patch))
    by_name = {model.hook_dict[hook].name: fn for hook, fn in patch.items()}
    return model.run_with_hooks(tokens_bt.to(model.cfg.device), fwd_hooks=[(name, lambda act, hook: by_name[hook.name](act)) for name in by_name])


@dataclass
class Spliced:
    """What one spliced coder did in the latest forward pass, over the tokens it edited."""

    coder: SparseCoder
    mask_bt: torch.Tensor | None = None
    """The positions it edited: allowed by `where` and covered by the coder."""
    code: SparseCode | None = None
    """Its code of those tokens; with `expose`, `values_bk` receives gradients."""
    error_td: torch.Tensor | None = None
    """clean - reconstruction at those tokens (with keep_error), a gradient leaf with `expose`."""


def _check_widths(coder: SparseCoder, d_in: int, d_out: int) -> None:
    if (d_in, d_out) != (coder.cfg.d_in, coder.cfg.d_out):
        raise BadInput(
            f"the coder reads width {coder.cfg.d_in} at {coder.cfg.hook} and writes {coder.cfg.d_out} at "
            f"{output_hook(coder)}, but this model has {d_in} and {d_out} there; was it trained on this model "
            f"({coder.cfg.model or 'unknown'})?"
        )


def _mask(where: Where | torch.Tensor | None, b: int, s: int, device) -> torch.Tensor:
    if where is None:
        # Position 0 is BOS: an attention sink no coder trains on.
        mask = torch.ones(b, s, dtype=torch.bool, device=device)
        mask[:, 0] = False
        return mask
    mask = where(b, s, device) if callable(where) else where.to(device)
    return mask.expand(b, s) if mask.dim() == 1 else mask


def _exposed(t: torch.Tensor, leaf: bool, retain: bool = True) -> torch.Tensor:
    """`t` as a tensor that gradients reach: a leaf if asked or if nothing upstream has gradients,
    else `t` itself, whose .grad the backward fills when `retain`."""
    if leaf or not t.requires_grad:
        return t.detach().requires_grad_(True)
    if retain:
        t.retain_grad()
    return t


@contextmanager
def splice(
    model,
    coders: Sequence[SparseCoder],
    keep_error: bool = False,
    where: Where | torch.Tensor | None = None,
    edit: Callable[[SparseCoder, SparseCode], SparseCode] | None = None,
    expose: bool = False,
    rewrite: Callable[[Spliced, torch.Tensor], torch.Tensor] | None = None,
) -> Iterator[list[Spliced]]:
    """Put `coders` into every forward pass of `model` inside the block (see the module
    docstring). `edit(coder, code)` may change a code before it is decoded (steering); with
    keep_error the change is then the only difference from the clean model. `rewrite(spliced,
    x_td)`, given the coder's record of this pass (its edited positions, code and error) and what
    it read, returns what it writes instead (circuit ablations: some features and errors replaced
    by baselines). Yields one `Spliced` per coder, refreshed by each pass."""
    written = [output_hook(c) for c in coders]
    twice = sorted({h for h in written if written.count(h) > 1})
    if twice:
        raise BadInput(f"two spliced coders write the same hook {twice}: splice them one at a time")
    for coder in coders:
        check_hooks(model, coder_hooks(coder))
    records = [Spliced(coder) for coder in coders]
    writes, reads = [], []
    for record in records:
        coder = record.coder
        read_name, write_name = model.hook_dict[coder.cfg.hook].name, model.hook_dict[output_hook(coder)].name
        inputs: dict[str, torch.Tensor] = {}

        def read(act, hook, inputs=inputs):
            inputs["x"] = by_position(act)
            return act

        def write(act, hook, record=record, inputs=inputs, same=read_name == write_name):
            y_bsf = by_position(act)
            x_bsf = y_bsf if same else inputs.pop("x")
            b, s = y_bsf.shape[:2]
            coder = record.coder
            _check_widths(coder, x_bsf.shape[-1], y_bsf.shape[-1])
            device = coder.W_dec.device
            mask_bt = _mask(where, b, s, act.device)
            x_td = x_bsf[mask_bt].to(device)
            covered_t = coder.inliers(x_td)
            mask_bt = mask_bt.masked_scatter(mask_bt, covered_t.to(mask_bt.device))
            x_td = x_td[covered_t]
            code = coder.encode(x_td)
            if expose and torch.is_grad_enabled():
                code = SparseCode(code.indices_bk, _exposed(code.values_bk, leaf=False))
            recon_td = coder.reconstruct(x_td, code)
            out_td = coder.reconstruct(x_td, edit(coder, code)) if edit else recon_td
            error_td = None
            if keep_error:
                error_td = (y_bsf[mask_bt].to(device) - recon_td).detach()
                if expose and torch.is_grad_enabled():
                    error_td = _exposed(error_td, leaf=True)
                out_td = out_td + error_td
            record.mask_bt, record.code, record.error_td = mask_bt, code, error_td
            if rewrite is not None:
                out_td = rewrite(record, x_td)
            flat = y_bsf.clone()
            flat[mask_bt] = out_td.to(flat)
            return flat.reshape(act.shape)

        writes.append((write_name, write))
        if read_name != write_name:
            reads.append((read_name, read))
    # Writes first: a coder reading a hook another coder writes must read the other's output.
    with model.hooks(fwd_hooks=writes + reads):
        yield records
