"""HMEDN training loss: difficulty-guided CE + contour regression + deep supervision (SPEC sections 2-3)."""
from __future__ import annotations

import math
from numbers import Real
from typing import NamedTuple, Sequence

import torch
from torch import Tensor, nn

from hmedn_fast.models.output import SegmentationOutput
from hmedn_fast.ops.loss import check_input_values, difficulty_guided_loss
from hmedn_fast.targets import Targets, make_targets

DEFAULT_AUX_WEIGHT = 0.5


class LossOutput(NamedTuple):
    """``total``: 0-dim float32 loss to backpropagate. ``parts``: detached 0-dim terms for logging:
    ``"seg"`` (main ``L_s``), ``"contour"`` (main ``L_r``, unweighted by alpha; present when the contour
    term is used) and ``"aux0"``, ``"aux1"``, ... (each auxiliary head's ``L_s``, before its weight)."""

    total: Tensor
    parts: dict[str, Tensor]


class HMEDNLoss(nn.Module):
    """``L = L_s(seg) + alpha L_r(contour) + sum_i a_i L_s(aux_i)`` for a :class:`SegmentationOutput`.

    ``L_s`` is the difficulty-guided cross-entropy and ``L_r`` the contour regression of
    :func:`hmedn_fast.ops.difficulty_guided_loss` (mean over the non-ignored voxels). The weight map
    ``W`` and contour target ``C`` come from :func:`hmedn_fast.targets.make_targets` (computed from the
    labels without gradient unless given to :meth:`forward`); ignored voxels are set to background
    for that computation only. Auxiliary (deep-supervision) logits may be at an integer fraction of the
    label resolution: their loss is that of the nearest-upsampled logits, computed without
    materialising them (see ``docs/decisions/loss.md``); when the output says the aux scales
    (``output.aux_scales``) and the label size is not a whole multiple of them (odd input sizes), the term
    covers the aux cells lying wholly inside the labels. Dispatch picks the fused Triton kernel on CUDA.

    Args:
        num_classes: K, background included (must match the logits' channels).
        alpha: weight of the contour term (paper 1).
        aux_weights: weight ``a_i`` of each auxiliary head's ``L_s``: one number for every head or one
            per head (length checked against ``output.aux``). Default 0.5 each: the paper gives none;
            half of the main term keeps the side outputs as guides without letting coarse heads dominate.
        class_weight: optional (K,) class weights ``nu`` (multiply ``W``), stored as a buffer.
        ignore_index: label value left out of every term, or None.
        use_weight_map: False replaces ``W`` by 1 (plain / class-weighted CE, the HRDN ablation).
        use_contour: False drops ``L_r`` even when the model has a contour head.
        sigma_contour, sigma_weight, mu0, mu: target parameters (paper 2, 8, 1, 25), see make_targets.
        backend: loss backend (None = automatic), target_backend: make_targets backend.
        check_values: check label values and NaN logits in each loss call: every head's, and the labels once, in one
            host synchronisation before the targets and the loss terms are computed. ``False``
            (the trainer's setting, for labels checked when loaded) makes a CUDA loss call free of them: it never
            waits for the GPU and can be captured in a CUDA graph.
    """

    def __init__(
        self,
        num_classes: int,
        alpha: float = 1.0,
        aux_weights: float | Sequence[float] = DEFAULT_AUX_WEIGHT,
        class_weight: Tensor | Sequence[float] | None = None,
        ignore_index: int | None = None,
        use_weight_map: bool = True,
        use_contour: bool = True,
        sigma_contour: float = 2.0,
        sigma_weight: float = 8.0,
        mu0: float = 1.0,
        mu: float | Sequence[float] = 25.0,
        backend: str | None = None,
        target_backend: str | None = None,
        check_values: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        weights = [aux_weights] if isinstance(aux_weights, Real) else list(aux_weights)
        if not weights or any(isinstance(a, bool) or not isinstance(a, Real) or not math.isfinite(a) or a < 0
                              for a in weights):
            raise ValueError(f"aux_weights must be a finite number >= 0 or a sequence of them, got {aux_weights!r}")
        self.num_classes = num_classes
        self.alpha = alpha
        self.aux_weights = aux_weights if isinstance(aux_weights, Real) else tuple(float(a) for a in weights)
        self.ignore_index = ignore_index
        self.use_weight_map = use_weight_map
        self.use_contour = use_contour
        self.target_kwargs = dict(sigma_contour=sigma_contour, sigma_weight=sigma_weight, mu0=mu0, mu=mu,
                                  backend=target_backend)
        self.backend = backend
        self.check_values = check_values
        if class_weight is not None:
            class_weight = torch.as_tensor(class_weight, dtype=torch.float32)
            if class_weight.shape != (num_classes,):
                raise ValueError(f"class_weight must have shape ({num_classes},), got {tuple(class_weight.shape)}")
        self.register_buffer("class_weight", class_weight)

    def _aux_weight(self, i: int, n_aux: int) -> float:
        if isinstance(self.aux_weights, Real):
            return float(self.aux_weights)
        if len(self.aux_weights) != n_aux:
            raise ValueError(f"aux_weights has {len(self.aux_weights)} entries but the output has {n_aux} aux heads")
        return self.aux_weights[i]

    def make_targets(self, labels: Tensor) -> Targets:
        """Contour target and weight map of ``labels`` (ignored voxels as background), without gradient."""
        return self._targets(labels, self.check_values)

    def _targets(self, labels: Tensor, check_labels: bool) -> Targets:
        if self.ignore_index is not None:
            labels = torch.where(labels == self.ignore_index, torch.zeros_like(labels), labels)
        with torch.no_grad():
            return make_targets(labels, self.num_classes, **self.target_kwargs, check_labels=check_labels)

    def forward(self, output: SegmentationOutput, labels: Tensor, targets: Targets | None = None) -> LossOutput:
        """Loss of a model output.

        Args:
            output: ``seg`` (N, K, *spatial) logits, optional ``contour`` (N, 1, *spatial) logits and
                ``aux`` logits (N, K, *spatial / integer factor).
            labels: (N, *spatial) integer labels.
            targets: precomputed :class:`Targets` (e.g. from the data loader) to skip make_targets.
        Returns:
            :class:`LossOutput` ``(total, parts)``.
        """
        if not isinstance(output, SegmentationOutput):
            raise TypeError(f"output must be a SegmentationOutput, got {type(output).__name__}")
        if output.seg.ndim >= 2 and output.seg.shape[1] != self.num_classes:
            raise ValueError(f"output.seg has {output.seg.shape[1]} channels but num_classes={self.num_classes}")
        with_contour = self.use_contour and output.contour is not None
        aux_terms = []  # (head index, aux logits, scale, the aux cells the term scores)
        for i, aux in enumerate(output.aux):
            scale = output.aux_scales[i] if i < len(output.aux_scales) else None
            aligned = _tile_aligned(aux, labels, None, scale)
            if aligned is not None:  # else the input is smaller than one aux cell: no term
                aux_terms.append((i, aux, scale, aligned[0]))
        integer_labels = isinstance(labels, Tensor) and not (labels.is_floating_point() or labels.is_complex())
        if self.check_values and integer_labels and not torch.compiler.is_compiling():
            # every head and the labels once, one read-back (other label types: the loss's TypeError below)
            check_input_values(output.seg, labels, output.contour if with_contour else None, self.ignore_index,
                               [cells for _, _, _, cells in aux_terms])
        if targets is None and (self.use_weight_map or with_contour):
            targets = self._targets(labels, check_labels=False)  # checked above when asked to
        weight = targets.weight if self.use_weight_map else None
        common = dict(class_weight=self.class_weight, ignore_index=self.ignore_index, backend=self.backend,
                      check_values=False)
        total, seg, contour = difficulty_guided_loss(
            output.seg, labels, weight,
            output.contour if with_contour else None, targets.contour if with_contour else None,
            alpha=self.alpha, return_parts=True, **common,
        )
        parts = {"seg": seg.detach()}
        if with_contour:
            parts["contour"] = contour.detach()
        for i, aux, scale, _ in aux_terms:
            term = difficulty_guided_loss(*_tile_aligned(aux, labels, weight, scale), **common)
            total = total + self._aux_weight(i, len(output.aux)) * term
            parts[f"aux{i}"] = term.detach()
        return LossOutput(total, parts)


def _tile_aligned(aux: Tensor, labels: Tensor, weight: Tensor | None, scale: tuple[int, ...] | None):
    """``(aux, labels, weight)`` restricted to the aux cells that lie wholly inside the labels.

    A model's aux map at factor ``f`` has ``ceil(size / f)`` cells per axis when the input size is not a multiple
    of ``f`` (see :class:`SegmentationOutput`); its last, partial cell is left out of the deep-supervision term
    and the labels (and weight map) are cropped to the whole cells. Without a known ``scale`` (e.g. a user's
    model), or when the sizes already tile exactly, the tensors are returned as they are. Returns None when
    not one whole cell fits.
    """
    full, low = labels.shape[1:], aux.shape[2:]
    if scale is None or all(f == n * s for f, n, s in zip(full, low, scale)):
        return aux, labels, weight
    keep = [min(n, f // s) for f, n, s in zip(full, low, scale)]
    if any(k == 0 for k in keep):
        return None
    low_idx = (slice(None), slice(None)) + tuple(slice(0, k) for k in keep)
    full_idx = (slice(None),) + tuple(slice(0, k * s) for k, s in zip(keep, scale))
    return aux[low_idx], labels[full_idx], weight[full_idx] if weight is not None else None


__all__ = ["DEFAULT_AUX_WEIGHT", "HMEDNLoss", "LossOutput"]
