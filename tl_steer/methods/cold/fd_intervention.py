"""The :class:`ColdFD` intervention: adds ``m * dZ(x)`` at a residual-stream hook, with dZ(x) the change
one gradient step along the stored gradient would make to the activation for the current input x.

How COLD-FD sees its input. A hook sees the activation at its hook point, not the tokens. :class:`ColdFD`
therefore also records, in the same forward pass, the residual entering block 0
(``blocks.0.hook_resid_pre``) and, from block 0's attention scores, the KV-cache offset and the padding
mask. The perturbed partial pass runs the blocks up to the hook from that residual with the perturbed
parameters (``start_at_layer=0, stop_at_layer=...``), with every TransformerLens hook of those blocks suspended, so
that it neither re-triggers steering nor overwrites activations that other hooks record. The embedding
part of ``g`` (rows of ``W_E`` of the example tokens, and ``W_pos`` for absolute positions) enters as a
perturbation of that residual: the token at each position is recognised by an exact match of the
recorded residual with ``W_E[token] (+ W_pos[position])`` among the tokens whose gradient row is not zero
(a check at construction makes sure this recovers the tokens of the examples). Only the parameters before
the hook are copied (for ``"fd"``); the model is never copied.

Where it steers. Any position policy works in full forward passes (scoring, uncached generation). Under
the KV cache a forward pass holds only the new positions, while dZ of a new position depends on the
perturbed states of all earlier ones: COLD-FD steers the prompt pass (``positions="prompt"``, the
published setting; the effect carries through the cache) and raises a clear error if a policy asks it to
steer positions of a cached continuation step. Use ``generate(..., use_past_kv_cache=False)`` for the
other policies.

Composition. ``fd_method="jvp"`` computes dZ from the clean network and composes freely with other
interventions. ``fd_method="fd"`` takes ``Z(x; theta)`` from the ordinary (steered) pass, so it assumes that
no other intervention changes activations at or before its hook.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from tl_steer.dtypes import is_half
from tl_steer.errors import ConfigError, DataError, HookNameError, ModelMismatchError, ShapeError, TlSteerError
from tl_steer.hosts import Host, is_bridge
from tl_steer.interventions import EditEntry, Intervention, ReadOnly
from tl_steer.methods.cold.blocks import (
    _FD_HOOK,
    _INPUT_HOOK,
    _SCORES_HOOK,
    EMBED,
    POS_EMBED,
    _hooks_suspended,
    embedding_tables,
    fd_blocks,
    parameters_before,
)
from tl_steer.methods.cold.examples import _check_positive_finite
from tl_steer.models import model_identity, weights_version
from tl_steer.positions import PositionsLike, PositionState, steer_mask


class ColdFD(Intervention):
    """COLD-FD: adds ``m * dZ(x)`` at a residual-stream hook, where dZ(x) is the change one gradient step
    of size eta along ``-g`` would make to that activation for the current input x.

    ``g`` is stored as tensors (block parameters by name; the non-zero rows of the token-embedding
    gradient; the position-embedding gradient for absolute positions), so the intervention saves and
    loads like any other; it acts on the model it was made for (checked by :meth:`check`) and needs that
    model to build its hooks (:attr:`needs_model`: ``hooks(m, model=model)``; ``steer`` passes it).
    Its ``unit`` (set by :func:`cold_fd`) makes ``m = 1`` add, on the examples it was made from, a mean
    per-position norm equal to DiffMean's norm on them (docs/methods.md, section 1).

    ``n_perturbed_passes`` counts the perturbed partial passes run so far (one per steered forward pass
    over inputs not seen before). dZ(x) does not depend on m, so it is kept per input (a memo of at most
    :attr:`memo_bytes`, least recently used dropped first, keyed by the input of block 0, the padding mask,
    the model's weights and for "fd" the clean activation): a strength sweep or the gap's strengths run the
    perturbed pass once per batch, not once per strength. ``memo_bytes = 0`` turns it off.
    """

    #: the most bytes of dZ(x) kept for inputs seen again (0: none)
    memo_bytes: int = 256 * 2**20

    kind = "cold_fd"
    saved_index_tensors = ("embed.index",)
    # dZ(x) does not depend on m, which only scales it; the perturbed pass needs the model.
    linear_in_m = True
    needs_model = True
    needs_full_input = True

    def __init__(
        self,
        hook: str,
        grads: dict[str, Tensor],
        *,
        embed_index: Tensor,
        embed_grad: Tensor,
        pos_grad: Tensor | None = None,
        eta: float = 1.0,
        eps: float = 1e-6,
        fd_method: str = "fd",
        n_blocks: int,
        d_model: int,
        positions: PositionsLike | None = None,
        method: str | None = None,
        info: dict[str, Any] | None = None,
        model_identity: dict[str, Any] | None = None,
        unit: float = 1.0,
    ) -> None:
        super().__init__(
            positions=positions, method=method or "cold_fd", info=info, model_identity=model_identity, unit=unit
        )
        if not isinstance(hook, str) or _FD_HOOK.match(hook) is None:
            raise HookNameError(f"ColdFD needs a 'blocks.{{l}}.hook_resid_pre/post' hook, got {hook!r}")
        if fd_method not in ("fd", "jvp"):
            raise ConfigError(f"fd_method must be 'fd' or 'jvp', got {fd_method!r}")
        self.hook = hook
        self.eta = _check_positive_finite("eta", eta)
        self.eps = _check_positive_finite("eps", eps)
        self.fd_method = fd_method
        for name, value in (("n_blocks", n_blocks), ("d_model", d_model)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"ColdFD's {name} must be a positive integer, got {value!r}")
        self.n_blocks = int(n_blocks)
        self.d_model = int(d_model)
        self.grads = {k: v.detach() for k, v in grads.items()}
        self.embed_index = embed_index.detach().to(torch.long).reshape(-1)
        self.embed_grad = embed_grad.detach()
        self.pos_grad = None if pos_grad is None else pos_grad.detach()
        if self.embed_index.numel() and int(self.embed_index.min()) < 0:
            raise ShapeError(f"ColdFD's embed_index holds a negative token id {int(self.embed_index.min())}")
        if self.embed_grad.shape != (self.embed_index.shape[0], self.d_model):
            raise ShapeError(
                f"embed_grad must have shape [{self.embed_index.shape[0]}, {self.d_model}], "
                f"got {tuple(self.embed_grad.shape)}"
            )
        for name, t in [*self.grads.items(), ("embed_grad", self.embed_grad)]:
            if not torch.isfinite(t).all():
                raise DataError(f"the COLD-FD gradient {name!r} has NaN or infinite entries")
        self.n_perturbed_passes = 0
        self._memo: OrderedDict[bytes, Tensor] = OrderedDict()
        self._memo_size = 0

    # ----- construction from a full gradient -----------------------------------------------------
    @classmethod
    def from_gradient(
        cls,
        model: Host,
        hook: str,
        g: dict[str, Tensor],
        *,
        eta: float = 1.0,
        eps: float = 1e-6,
        fd_method: str = "fd",
        positions: PositionsLike | None = None,
        info: dict[str, Any] | None = None,
    ) -> ColdFD:
        """Build from a gradient ``g`` over :func:`parameters_before` (names as in ``named_parameters``)."""
        n_blocks = fd_blocks(model, hook)
        expected = set(parameters_before(model, hook))
        if set(g) != expected:
            missing, extra = sorted(expected - set(g)), sorted(set(g) - expected)
            raise ShapeError(f"g must hold the parameters before {hook!r}; missing {missing[:5]}, extra {extra[:5]}")
        embedding = [name for name in g if name.startswith(("embed.", "pos_embed."))]
        for name in embedding:
            if name not in (EMBED, POS_EMBED) and g[name].abs().max() > 0:
                raise TlSteerError(f"cold_fd does not support embedding parameters other than W_E / W_pos ({name})")
        w_e = g[EMBED]
        index = (w_e != 0).any(-1).nonzero()[:, 0]
        iv = cls(
            hook,
            {k: v for k, v in g.items() if k not in embedding},
            embed_index=index,
            embed_grad=w_e[index],
            pos_grad=g.get(POS_EMBED),
            eta=eta,
            eps=eps,
            fd_method=fd_method,
            n_blocks=n_blocks,
            d_model=model.cfg.d_model,
            positions=positions,
            info={**(info or {}), "norm_g": float(sum(float(v.double().pow(2).sum()) for v in g.values()) ** 0.5)},
            model_identity=model_identity(model),
        )
        iv.check(model)
        if iv.method_for(model) == "fd":
            lost = iv.fd_rounding_error(model)
            iv.info["fd_rounding_error"] = lost
            if lost > 0.2:
                warnings.warn(
                    f"with eps={eps}, {100 * lost:.0f}% of the parameter perturbation eps*g is lost to rounding in "
                    f"{model.cfg.dtype} (|fl(theta + eps g) - theta - eps g| / |eps g|); the finite difference "
                    "will be noisy. Use a larger eps (the error of the difference grows with eps * |g|) or "
                    "method='jvp'.",
                    stacklevel=3,
                )
        return iv

    def method_for(self, model: Host) -> str:
        """How dZ is computed on ``model``: ``fd_method``, except that a finite difference requested for a
        float16 or bfloat16 model is computed by the exact JVP instead.

        Why: with 8 to 11 significant bits, ``theta + eps g`` rounds most of ``eps g`` away for any useful
        eps (measured on the tiny test models: 92-100% of the perturbation lost at eps=1e-6, and a dZ with
        cosine ~0 to the float32 one at eps=1e-3), and running the partial pass in float32 instead would
        need float32 copies of every block before the hook. The JVP is the quantity the finite difference
        approximates, exact in any dtype, so it is the float32 answer up to the rounding of the forward pass.
        """
        return "jvp" if self.fd_method == "fd" and is_half(model) else self.fd_method

    # ----- Intervention protocol -------------------------------------------------------------------
    @property
    def hook_names(self) -> tuple[str, ...]:
        return (self.hook,)

    def first_layer(self, n_layers: int) -> int:
        # dZ depends on the input of block 0, which must be part of every steered pass.
        return 0

    def widths(self) -> dict[str, int]:
        return {self.hook: self.d_model}

    def tensors(self) -> dict[str, Tensor]:
        out = {f"grad.{k}": v for k, v in self.grads.items()}
        out["embed.index"] = self.embed_index
        out["embed.grad"] = self.embed_grad
        if self.pos_grad is not None:
            out["pos.grad"] = self.pos_grad
        return out

    def config(self) -> dict[str, Any]:
        return {
            "hook": self.hook,
            "eta": self.eta,
            "eps": self.eps,
            "fd_method": self.fd_method,
            "n_blocks": self.n_blocks,
            "d_model": self.d_model,
        }

    @classmethod
    def from_saved(cls, config: dict[str, Any], tensors: dict[str, Tensor], common: dict[str, Any]) -> ColdFD:
        grads = {k.removeprefix("grad."): v for k, v in tensors.items() if k.startswith("grad.")}
        return cls(
            config["hook"],
            grads,
            embed_index=tensors["embed.index"],
            embed_grad=tensors["embed.grad"],
            pos_grad=tensors.get("pos.grad"),
            eta=config["eta"],
            eps=config["eps"],
            fd_method=config["fd_method"],
            n_blocks=config["n_blocks"],
            d_model=config["d_model"],
            **common,
        )

    def check(self, model: Host) -> None:
        """Check that this intervention fits ``model`` (identity, hook, width, parameter shapes)."""
        super().check(model)
        if fd_blocks(model, self.hook) != self.n_blocks:
            raise ShapeError(
                f"ColdFD at {self.hook!r} runs {self.n_blocks} blocks; this model would run another number"
            )
        params = dict(model.named_parameters())
        for name, t in self.grads.items():
            if name not in params and (name.startswith("blocks.") == is_bridge(model)):
                hosts = ("a HookedTransformer", "a TransformerBridge")
                made, here = hosts if is_bridge(model) else hosts[::-1]
                raise ModelMismatchError(
                    f"this ColdFD was made on {made}: it holds its gradient under that host's parameter names "
                    f"({name!r}), which {here} does not have. Make it again on this model with tl_steer.cold_fd "
                    "(the same examples give the same dZ on either host)"
                )
            if name not in params or params[name].shape != t.shape:
                raise ShapeError(f"ColdFD's gradient {name!r} of shape {tuple(t.shape)} does not fit this model")
        if self.embed_index.numel() and int(self.embed_index.max()) >= model.cfg.d_vocab:
            raise ShapeError("ColdFD's embedding gradient refers to tokens outside this model's vocabulary")
        if (self.pos_grad is None) != (model.cfg.positional_embedding_type != "standard"):
            raise ShapeError("ColdFD's position-embedding gradient does not fit this model's positional embeddings")
        w_pos = embedding_tables(model)[1]
        if self.pos_grad is not None and w_pos is not None and self.pos_grad.shape != w_pos.shape:
            raise ShapeError(
                f"ColdFD's position-embedding gradient has shape {tuple(self.pos_grad.shape)}, but this model's "
                f"W_pos has {tuple(w_pos.shape)}"
            )

    def with_positions(self, positions: PositionsLike) -> ColdFD:
        """The same intervention (sharing its tensors, and its unit) with another position policy."""
        return ColdFD.from_saved(
            self.config(),
            self.tensors(),
            {
                "positions": positions,
                "method": self.method,
                "info": self.info,
                "model_identity": self.model_identity,
                "unit": self.unit,
            },
        )

    def _edits(self, model: Host | None) -> list[tuple[str, EditEntry]]:
        """Two readers at block 0 (its input, and the KV-cache offset and padding mask from its attention
        scores) and the steering edit, which runs the perturbed partial pass of ``model``."""
        assert model is not None  # needs_model: hooks() refuses to come here without one
        run = _Run(self, model)
        return [
            (_INPUT_HOOK, ReadOnly(run.record_input)),
            (_SCORES_HOOK, ReadOnly(run.record_scores)),
            (self.hook, run.edit),
        ]

    # ----- the perturbed pass -------------------------------------------------------------------------
    def embedding_direction(
        self,
        model: Host,
        resid0: Float[Tensor, "batch pos d"],
        key_mask: Int[Tensor, "batch pos"] | None,
    ) -> tuple[Float[Tensor, "batch pos d"], Int[Tensor, "batch pos"]]:
        """The embedding part of g at each position of an input whose block-0 input is ``resid0``, and
        the recognised token id at each position (-1 where the token's gradient row is zero).

        The token at a position is the one among those with a non-zero gradient row whose
        ``W_E[token] (+ W_pos[position])`` equals ``resid0`` there exactly.
        """
        batch, pos, d = resid0.shape
        flat = resid0.reshape(-1, d)
        w_e, w_pos = embedding_tables(model)
        pos_embed: Tensor | None = None
        pos_ids: Tensor | None = None
        pad: Tensor | None = None
        if model.cfg.positional_embedding_type == "standard":
            if key_mask is None:
                pos_ids = torch.arange(pos, device=resid0.device)[None].expand(batch, pos)
            else:
                pos_ids = (key_mask.cumsum(dim=1) - 1).clamp(min=0)
                pad = key_mask == 0
            assert w_pos is not None
            pos_embed = w_pos[pos_ids]
            if pad is not None:
                pos_embed = torch.where(pad[..., None], torch.zeros_like(pos_embed), pos_embed)
        # The gradient keeps its own (master) precision: in float16 most of its entries are subnormal.
        dtype = torch.promote_types(self.embed_grad.dtype, resid0.dtype)
        direction = torch.zeros_like(resid0, dtype=dtype)
        tokens = torch.full((batch * pos,), -1, dtype=torch.long, device=resid0.device)
        index = self.embed_index.to(resid0.device)
        if index.numel():
            rows = w_e[index].detach()
            target = flat - pos_embed.reshape(-1, d) if pos_embed is not None else flat
            nearest = torch.cdist(target, rows).argmin(-1)
            candidate = rows[nearest]
            rebuilt = candidate + pos_embed.reshape(-1, d) if pos_embed is not None else candidate
            exact = (rebuilt == flat).all(-1)
            grad_rows = self.embed_grad.to(device=resid0.device, dtype=dtype)[nearest]
            direction = torch.where(exact[:, None], grad_rows, torch.zeros_like(grad_rows)).reshape(batch, pos, d)
            tokens = torch.where(exact, index[nearest], tokens)
        if self.pos_grad is not None and pos_ids is not None:
            pos_dir = self.pos_grad.to(device=resid0.device, dtype=dtype)[pos_ids]
            if pad is not None:
                pos_dir = torch.where(pad[..., None], torch.zeros_like(pos_dir), pos_dir)
            direction = direction + pos_dir
        return direction, tokens.reshape(batch, pos)

    def delta(
        self,
        model: Host,
        activation: Float[Tensor, "batch pos d"],
        resid0: Float[Tensor, "batch pos d"],
        key_mask: Int[Tensor, "batch pos"] | None = None,
        perturbed: dict[str, Tensor] | None = None,
    ) -> Float[Tensor, "batch pos d"]:
        """dZ(x) for every position of an input whose block-0 input is ``resid0`` and whose clean
        activation at the hook is ``activation`` (used by "fd" only): one perturbed partial pass.

        The method is :meth:`method_for` the model (the exact JVP in float16 / bfloat16). In those dtypes the
        JVP's tangent (g and its embedding part) is multiplied by a power of two that brings its largest
        entry near 1 before it is cast to the model's dtype, and the result divided by it in float32: the
        JVP is linear in the tangent, and unscaled most entries of g would be subnormal in float16."""
        direction, _ = self.embedding_direction(model, resid0, key_mask)
        partial_pass = _PartialPass(model, self.n_blocks, key_mask)
        with torch.no_grad(), _hooks_suspended(model, self.n_blocks), partial_pass.no_cache_capture():
            self.n_perturbed_passes += 1
            if self.method_for(model) == "fd":
                if perturbed is None:
                    perturbed = self.perturbed_parameters(model)
                shifted = (resid0 + self.eps * direction).to(resid0.dtype)
                z = partial_pass(perturbed, shifted)
                return -(self.eta / self.eps) * (z - activation)
            scale = 1.0
            if is_half(model):
                peak = max([float(direction.abs().max())] + [float(v.abs().max()) for v in self.grads.values()])
                scale = 2.0 ** -math.floor(math.log2(peak)) if peak > 0 else 1.0
            tangents = {
                k: (v.to(device=resid0.device, dtype=torch.promote_types(v.dtype, resid0.dtype)) * scale).to(
                    resid0.dtype
                )
                for k, v in self.grads.items()
            }
            params = dict(model.named_parameters())
            primals = {k: params[k].detach() for k in tangents}
            out = torch.func.jvp(partial_pass, (primals, resid0), (tangents, (direction * scale).to(resid0.dtype)))
            dz = out[1] if scale == 1.0 else out[1].float() / scale
            return -self.eta * dz

    # ----- the memo of dZ(x) ------------------------------------------------------------------------
    def memo_key(
        self,
        model: Host,
        method: str,
        resid0: Tensor,
        key_mask: Tensor | None,
        activation: Tensor | None,
    ) -> bytes:
        """What dZ(x) is a function of: the model (and its weights' in-place versions), the method, eta and
        eps, the input of block 0, the padding mask, and for "fd" the clean activation at the hook; as a
        digest."""
        digest = hashlib.blake2b(digest_size=20)
        version = weights_version(model)
        digest.update(f"{id(model)}|{version}|{method}|{self.eta!r}|{self.eps!r}".encode())
        for t in (resid0, key_mask, activation):
            if t is None:
                digest.update(b"-")
                continue
            digest.update(f"{tuple(t.shape)}{t.dtype}".encode())
            # as raw bytes: numpy has no bfloat16
            digest.update(t.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy().tobytes())
        return digest.digest()

    def memo_get(self, key: bytes) -> Tensor | None:
        dz = self._memo.get(key)
        if dz is not None:
            self._memo.move_to_end(key)
        return dz

    def memo_put(self, key: bytes, dz: Tensor) -> None:
        """Keep dZ under ``key``, dropping the least recently used entries beyond :attr:`memo_bytes`."""
        size = dz.numel() * dz.element_size()
        if size > self.memo_bytes:
            return
        self._memo[key] = dz
        self._memo_size += size
        while self._memo_size > self.memo_bytes:
            _, old = self._memo.popitem(last=False)
            self._memo_size -= old.numel() * old.element_size()

    def perturbed_parameters(self, model: Host) -> dict[str, Tensor]:
        """theta + eps g for the block parameters before the hook (the only parameters copied)."""
        params = dict(model.named_parameters())
        return {
            k: params[k].detach() + self.eps * v.to(device=params[k].device, dtype=params[k].dtype)
            for k, v in self.grads.items()
        }

    def fd_rounding_error(self, model: Host) -> float:
        """|fl(theta + eps g) - theta - eps g| / |eps g| over the block parameters: the share of the finite
        difference's parameter perturbation that the model's dtype cannot represent."""
        params = dict(model.named_parameters())
        err = ref = 0.0
        with torch.no_grad():
            for name, grad in self.perturbed_parameters(model).items():
                theta = params[name].detach().double()
                step = self.eps * self.grads[name].to(theta.device).double()
                err += float((grad.double() - theta - step).pow(2).sum())
                ref += float(step.pow(2).sum())
        return math.sqrt(err / ref) if ref > 0 else 0.0

    def _check_token_recovery(self, model: Host, resid0: Tensor, tokens: Tensor) -> None:
        """Raise if the tokens of an example batch cannot be recognised from its block-0 input (an
        architecture whose embedding is not a plain lookup), and warn about tokens sharing an embedding
        row with a token of the examples (they would receive its gradient)."""
        _, found = self.embedding_direction(model, resid0, None)
        known = torch.isin(tokens, self.embed_index.to(tokens.device))
        w_e = model.W_E.detach()
        recognised = bool((found[known] >= 0).all()) and torch.equal(w_e[found[known].clamp(min=0)], w_e[tokens[known]])
        if not recognised:
            raise TlSteerError(
                "cold_fd cannot recognise the input tokens from 'blocks.0.hook_resid_pre' for this model (its "
                "embedding is not a plain W_E lookup plus W_pos); use cold_kernel"
            )
        proj = w_e.double() @ torch.randn(
            w_e.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(0)
        ).to(w_e.device)
        order = proj.argsort()
        same = (w_e[order[1:]] == w_e[order[:-1]]).all(-1)
        if same.any():
            dup = torch.cat([order[1:][same], order[:-1][same]])
            shared = dup[torch.isin(dup, self.embed_index.to(dup.device))]
            if shared.numel():
                warnings.warn(
                    f"tokens {sorted(set(shared.tolist()))[:10]} share their embedding row with other tokens; "
                    "COLD-FD gives all of them the same embedding update",
                    stacklevel=3,
                )


@contextlib.contextmanager
def _parameters_replaced(model: Host, params: dict[str, Tensor]) -> Iterator[None]:
    """The model's parameters named in ``params`` replaced by those tensors for the duration of the block,
    and the very same Parameter objects put back afterwards (also on error).

    Why not ``torch.func.functional_call``: a bridge reaches each Hugging Face module under two paths (its
    own component and the Hugging Face model's), and functional_call, which saves and restores per path,
    then restores the second path to the tensor it put in: measured on TransformerLens 3.9, the bridge
    kept the perturbed weights after the call. Swapping once per module object has no such order."""
    slots: list[tuple[torch.nn.Module, str, Any]] = []
    try:
        for name, value in params.items():
            path, _, attr = name.rpartition(".")
            module = model.get_submodule(path)
            slots.append((module, attr, module._parameters[attr]))
            module._parameters[attr] = value  # type: ignore[assignment]
        yield
    finally:
        for module, attr, original in reversed(slots):
            module._parameters[attr] = original


class _PartialPass:
    """The blocks before a ColdFD's hook, run from a given block-0 input ``resid`` with the parameters
    ``params`` (by name) in place of the model's: ``pass_(params, resid)`` is the residual after block
    ``n_blocks - 1``, a function of both (torch.func transforms it).

    A HookedTransformer starts there (``start_at_layer=0``). A bridge cannot (Hugging Face's forward starts
    at the token embedding): it runs from placeholder tokens with ``resid`` put in at block 0's input by a
    hook and the result read at the last block's output, stopping there (``stop_at_layer``) unless that is
    the last block. The same function of ``params`` and ``resid``; positions come from ``key_mask`` on both."""

    def __init__(self, model: Host, n_blocks: int, key_mask: Tensor | None) -> None:
        self.model, self.n_blocks, self.key_mask = model, n_blocks, key_mask

    def __call__(self, params: dict[str, Tensor], resid: Tensor) -> Tensor:
        model = self.model
        kwargs: dict[str, Any] = {"attention_mask": self.key_mask}
        if not is_bridge(model):
            kwargs |= {"start_at_layer": 0, "stop_at_layer": self.n_blocks}
            return torch.func.functional_call(model, params, (resid,), kwargs)
        seen: list[Tensor] = []

        def put(act: Tensor, hook: HookPoint) -> Tensor:
            return resid

        def take(act: Tensor, hook: HookPoint) -> None:
            seen.append(act)

        if self.n_blocks < model.cfg.n_layers:
            kwargs["stop_at_layer"] = self.n_blocks
        tokens = torch.zeros(resid.shape[:2], dtype=torch.long, device=resid.device)
        hooks = [(_INPUT_HOOK, put), (f"blocks.{self.n_blocks - 1}.hook_resid_post", take)]
        with _parameters_replaced(model, params), model.hooks(fwd_hooks=hooks):  # type: ignore[arg-type]
            model(tokens, **kwargs)
        return seen[-1]

    @contextlib.contextmanager
    def no_cache_capture(self) -> Iterator[None]:
        """Keep a bridge's generate (KV cache) from taking this pass's Hugging Face cache for its own: the
        perturbed pass runs inside a hook of the steered prompt pass, whose cache generation goes on from."""
        flag = getattr(self.model, "_capture_hf_cache", None)
        if flag is None:
            yield
            return
        model: Any = self.model
        model._capture_hf_cache = False
        try:
            yield
        finally:
            model._capture_hf_cache = flag


class _Run:
    """The per-installation state of a ColdFD: what the recorders saw in the current forward pass."""

    def __init__(self, iv: ColdFD, model: Host) -> None:
        self.iv = iv
        self.model = model
        self.state = PositionState()
        self.resid0: Tensor | None = None
        self.key_mask: Tensor | None = None
        self.offset: int | None = None
        self.perturbed: dict[str, Tensor] | None = None

    def record_input(self, act: Tensor, hook: HookPoint) -> None:
        self.resid0 = act.detach()

    def record_scores(self, scores: Tensor, hook: HookPoint) -> None:
        self.state.record_offset(scores, hook)
        self.offset = int(scores.shape[-1] - scores.shape[-2])
        # A real key is attended by at least its own query (causal or local attention); a padding key is
        # masked for every query: -inf on a HookedTransformer, the dtype's minimum (plus the score) on a bridge.
        keys = (scores[:, 0] > torch.finfo(scores.dtype).min / 2).any(dim=-2)
        self.key_mask = None if bool(keys.all()) else keys.to(torch.long)

    def edit(self, activation: Tensor, hook: HookPoint, raw: float) -> Tensor:
        """``raw * dZ(x)`` for this forward pass (the base class adds it at the selected positions)."""
        resid0, key_mask, offset = self.resid0, self.key_mask, self.offset
        self.resid0 = self.key_mask = self.offset = None
        batch, q_len = activation.shape[0], activation.shape[1]
        # The same mask as the base class's; computed here too, to skip the perturbed pass when no
        # position of this pass is steered (e.g. the cached steps under positions="prompt").
        mask = steer_mask(self.iv.positions, self.state, batch, q_len, activation.device)
        if mask is not None and not bool(mask.any()):
            return torch.zeros_like(activation)
        if offset is None or resid0 is None:
            raise TlSteerError(
                f"ColdFD at {self.iv.hook!r} did not see block 0 of this forward pass; COLD-FD needs passes that "
                "start at the embeddings (no start_at_layer)"
            )
        if offset > 0:
            raise TlSteerError(
                f"ColdFD with positions={self.iv.positions.kind!r} was asked to steer a cached continuation step "
                "(KV cache), which holds only the new positions while dZ depends on the whole input. Steer the "
                "prompt pass only (positions='prompt', the published setting) or generate with "
                "use_past_kv_cache=False."
            )
        if resid0.shape[:2] != activation.shape[:2]:
            raise ShapeError(
                f"ColdFD: the input of block 0 has shape {tuple(resid0.shape)} but the activation at "
                f"{self.iv.hook!r} has shape {tuple(activation.shape)}"
            )
        method = self.iv.method_for(self.model)
        # dZ(x) does not depend on m: a pass over inputs seen before (a sweep's next strength, the next
        # scoring of the same items) takes it from the memo instead of running the perturbed pass again
        key = self.iv.memo_key(self.model, method, resid0, key_mask, activation if method == "fd" else None)
        dz = self.iv.memo_get(key)
        if dz is None:
            if method == "fd" and self.perturbed is None:
                self.perturbed = self.iv.perturbed_parameters(self.model)
            dz = self.iv.delta(self.model, activation, resid0, key_mask, self.perturbed)
            self.iv.memo_put(key, dz)
        return raw * dz
