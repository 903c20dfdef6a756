"""Fused Triton kernels of the difficulty-guided loss (eager autograd.Function + torch custom ops).

One kernel (:func:`_loss_kernel`) serves every pass. Its programs (``PROGRAMS_PER_SM`` per multiprocessor) loop
over tiles of ``BLOCK`` voxels of the logits' grid of one sample; for each voxel a program computes
``logsumexp`` over the K classes (unrolled, K a compile-time constant; the K logits and their exponentials
stay in registers, so the gradient reuses them), then visits the label voxels it covers (1 when logits and
labels share a resolution, ``fd*fh*fw`` when the logits are an integer fraction of it: nearest upsampling
without materialising it), reading labels, weight map, contour target and (backward of ``none``) the
upstream gradient once, and accumulates

- the loss: per-program partial sums of ``L_s`` and ``L_r`` over all its tiles; the last program to finish
  (integer atomic ticket) adds them in a fixed order into ``[L, L_s, L_r, divisor]`` (a deterministic
  two-stage reduction in one launch, no float atomics), or the per-voxel map for ``reduction="none"``;
- the gradients: ``d/dz_k = s_seg (sum_v w_v p_k - sum_{v: y_v = k} w_v)`` and
  ``d/dc = s_ctr 2 sigmoid'(c) sum_v (sigmoid(c) - C_v)``, written in the same pass.

Forward modes: *one-pass* (``write_grads=True``, used for mean / sum under grad mode): the forward also
writes the gradients for an upstream gradient of 1 and the backward only rescales them in place (a
kernel that moves no data when the factor is 1); *two-pass*: the backward recomputes from the inputs.
Logits and contour logits are read in place in NC* or channels-last layout (any strides whose spatial
dims flatten to one stride); labels, weight and contour target are (N, *spatial) contiguous.
Eager calls run the passes under :class:`_FusedLoss` (lowest host overhead); while ``torch.compile``
traces, the custom ops ``hmedn_fast::difficulty_guided_loss`` (+ ``_backward``, ``_scale_``) run them.
See ``docs/decisions/loss.md``.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from hmedn_fast.ops.strides import flat_spatial_stride
from hmedn_fast.ops.triton.launch import (
    INTERPRET, FastLauncher, cdiv, multiprocessors, native_launch_info, next_power_of_2,
)

BLOCK = 1024
STATS_BLOCK = 4096
NUM_WARPS = 8  # measured best with BLOCK = 1024 on H200 (2x4x128^3 fp32: 64.6 us vs 71.3 with 4)
RESCALE_PROGRAMS = 264  # grid of the in-place rescale (2 per H100 SM)
PROGRAMS_PER_SM = 4  # loss kernel programs per multiprocessor (each loops over tiles of BLOCK voxels)


# ----------------------------------------------------------------------------------------------- kernels
@triton.jit
def _exp(x, FAST: tl.constexpr):
    """exp(x); FAST: one MUFU.EX2 with flush-to-zero, not ptxas' subnormal-safe sequence (a result below
    2**-126 becomes 0, which no softmax sum or gradient term here can notice). The interpreter, which
    runs no PTX, takes tl.exp."""
    if FAST:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [x * 1.4426950408889634],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:
        return tl.exp(x)


@triton.jit
def _label_weight(labels_ptr, weight_ptr, cw_ptr, gout_ptr, idx, mask, K, ignore_index,
                  HAS_WEIGHT: tl.constexpr, HAS_CW: tl.constexpr, HAS_IGNORE: tl.constexpr, GOUT: tl.constexpr):
    """Label (clamped to [0, K)), validity and effective weight ``W nu [gout]`` (0 if ignored) of voxels ``idx``."""
    raw = tl.load(labels_ptr + idx, mask=mask, other=0)
    valid = mask
    if HAS_IGNORE:
        valid = valid & (raw != ignore_index)
    y = tl.minimum(tl.maximum(raw.to(tl.int32), 0), K - 1)
    w = tl.where(valid, 1.0, 0.0)
    if HAS_WEIGHT:
        w = w * tl.load(weight_ptr + idx, mask=valid, other=0.0).to(tl.float32)
    if HAS_CW:
        w = w * tl.load(cw_ptr + y, mask=valid, other=0.0).to(tl.float32)
    if GOUT:
        w = w * tl.load(gout_ptr + idx, mask=valid, other=0.0).to(tl.float32)
    return y, valid, w


@triton.jit
def _terms(valid, w, z_y, lse, sig, ctarget_ptr, gout_ptr, out_ptr, idx, mask, alpha,
           GOUT: tl.constexpr, HAS_CONTOUR: tl.constexpr, LOSS: tl.constexpr):
    """Per label voxel: (seg loss, contour loss, contour gradient sum); writes the map for LOSS == 2."""
    seg = tl.zeros_like(lse)
    ctr = tl.zeros_like(lse)
    dctr = tl.zeros_like(lse)
    if LOSS != 0:
        seg = w * (lse - z_y)
    if HAS_CONTOUR:
        diff = tl.where(valid, sig - tl.load(ctarget_ptr + idx, mask=valid, other=0.0).to(tl.float32), 0.0)
        ctr = diff * diff
        dctr = diff
        if GOUT:
            dctr = diff * tl.load(gout_ptr + idx, mask=valid, other=0.0).to(tl.float32)
    if LOSS == 2:
        tl.store(out_ptr + idx, seg + alpha * ctr, mask=mask)
    return seg, ctr, dctr


@triton.jit
def _finalize(partials_ptr, out_ptr, norm_ptr, num, divisor, alpha, NORM_PTR: tl.constexpr, BLOCK: tl.constexpr):
    """Second reduction stage, fixed order: ``out = [L_s + alpha L_r, L_s, L_r, divisor]`` from (2, num) partials."""
    offs = tl.arange(0, BLOCK)
    seg = tl.zeros([BLOCK], tl.float32)
    ctr = tl.zeros([BLOCK], tl.float32)
    for start in range(0, num, BLOCK):
        mask = start + offs < num
        seg += tl.load(partials_ptr + start + offs, mask=mask, other=0.0, cache_modifier=".cg")
        ctr += tl.load(partials_ptr + num + start + offs, mask=mask, other=0.0, cache_modifier=".cg")
    d = divisor
    if NORM_PTR:
        d = tl.maximum(tl.load(norm_ptr).to(tl.float32), 1.0)
    seg_mean = tl.sum(seg, axis=0) / d
    ctr_mean = tl.sum(ctr, axis=0) / d
    tl.store(out_ptr, seg_mean + alpha * ctr_mean)
    tl.store(out_ptr + 1, seg_mean)
    tl.store(out_ptr + 2, ctr_mean)
    tl.store(out_ptr + 3, d)


@triton.jit
def _rescale_kernel(a_ptr, na, b_ptr, nb, g0_ptr, g1_ptr, g2_ptr, b0, b2, HAS_G0: tl.constexpr,
                    HAS_G1: tl.constexpr, HAS_G2: tl.constexpr, BLOCK: tl.constexpr):
    """One-pass backward, in place: ``a *= g0 + g1`` (logits), ``b *= b0 g0 + b2 g2`` (contour logits), ``g``
    the upstream gradients of (L, L_s, L_r) (absent ones 0). A grid-stride loop that reads and writes
    nothing for a factor of 1 (the usual ``loss.backward()``)."""
    g0 = 0.0
    g1 = 0.0
    g2 = 0.0
    if HAS_G0:
        g0 = tl.load(g0_ptr).to(tl.float32)
    if HAS_G1:
        g1 = tl.load(g1_ptr).to(tl.float32)
    if HAS_G2:
        g2 = tl.load(g2_ptr).to(tl.float32)
    fa = g0 + g1
    fb = b0 * g0 + b2 * g2
    offs = tl.arange(0, BLOCK)
    step = tl.num_programs(0) * BLOCK
    for start in range(tl.program_id(0) * BLOCK, tl.where(fa != 1.0, na, 0), step):
        mask = start + offs < na
        x = tl.load(a_ptr + start + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(a_ptr + start + offs, (x * fa).to(a_ptr.dtype.element_ty), mask=mask)
    for start in range(tl.program_id(0) * BLOCK, tl.where(fb != 1.0, nb, 0), step):
        mask = start + offs < nb
        x = tl.load(b_ptr + start + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(b_ptr + start + offs, (x * fb).to(b_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _loss_kernel(
    logits_ptr, labels_ptr, weight_ptr, cw_ptr, clogits_ptr, ctarget_ptr, gout_ptr, norm_ptr, gscale_ptr,
    partials_ptr, counter_ptr, out_ptr, glogits_ptr, gclogits_ptr,
    S_low, HW_low, W_low, S_full, H_full, W_full, tiles_s, num_tiles,
    stride_ln, stride_lk, stride_ls, stride_gn, stride_gk, stride_gs,
    stride_cn, stride_cs, stride_dn, stride_ds,
    ignore_index, alpha, divisor, ctr_coef,
    K: tl.constexpr, FAST_EXP: tl.constexpr, FD: tl.constexpr, FH: tl.constexpr, FW: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_CW: tl.constexpr, HAS_IGNORE: tl.constexpr, HAS_CONTOUR: tl.constexpr,
    LOSS: tl.constexpr, GRAD: tl.constexpr, GOUT: tl.constexpr, NORM_PTR: tl.constexpr, GSCALE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """LOSS: 0 none, 1 ``out = [L, L_s, L_r, divisor]`` (partial sums per program; the last program to finish,
    told by an integer atomic ticket, adds them in a fixed order), 2 per-voxel map in ``out``.
    GRAD: write gradients, scaled by ``1 / divisor``
    (``max(norm_ptr[0], 1)`` with NORM_PTR) times, with GSCALE, the upstream gradients ``g`` of
    ``[total, L_s, L_r]``: ``g0 + g1`` for the logits, ``alpha g0 + g2`` for the contour logits; without
    GSCALE the contour gradient gets ``ctr_coef``. GOUT: per-voxel upstream gradient (reduction none)."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    NUM_CHILD: tl.constexpr = FD * FH * FW
    if GRAD:  # loop-invariant gradient scales
        inv = 1.0 / divisor
        if NORM_PTR:
            inv = 1.0 / tl.maximum(tl.load(norm_ptr).to(tl.float32), 1.0)
        seg_scale = inv
        ctr_scale = inv * ctr_coef
        if GSCALE:
            g0 = tl.load(gscale_ptr).to(tl.float32)
            seg_scale = inv * (g0 + tl.load(gscale_ptr + 1).to(tl.float32))
            ctr_scale = inv * (alpha * g0 + tl.load(gscale_ptr + 2).to(tl.float32))
    seg_tot = tl.zeros([BLOCK], tl.float32)
    ctr_tot = tl.zeros([BLOCK], tl.float32)
    for t in range(pid, num_tiles, nprog):  # tiles t = (sample, block of BLOCK logit voxels), strided over programs
        n = (t // tiles_s).to(tl.int64)
        u = (t % tiles_s) * BLOCK + tl.arange(0, BLOCK)
        mask = u < S_low
        lrow = logits_ptr + n * stride_ln + u * stride_ls
        fbase = n * S_full
        lab_ptr = labels_ptr + fbase
        w_ptr = weight_ptr + fbase
        go_ptr = gout_ptr + fbase
        ct_ptr = ctarget_ptr + fbase
        map_ptr = out_ptr + fbase  # per-voxel map (LOSS == 2); out_ptr itself is the [L, L_s, L_r, divisor] output
        if NUM_CHILD == 1:  # labels first, so that the class loop also picks z[y]
            y1, valid1, w1 = _label_weight(lab_ptr, w_ptr, cw_ptr, go_ptr, u, mask, K, ignore_index,
                                           HAS_WEIGHT, HAS_CW, HAS_IGNORE, GOUT)
        z_y = tl.zeros([BLOCK], tl.float32)

        # softmax over the classes (unrolled: K is a compile-time constant): the K logits stay in registers (a
        # tuple); the maximum first, then one exponential per logit, kept for the gradient
        zs = ()
        m = tl.full([BLOCK], float("-inf"), tl.float32)
        for k in tl.static_range(K):
            z = tl.load(lrow + k * stride_lk, mask=mask, other=0.0).to(tl.float32)
            zs = zs + (z,)
            m = tl.maximum(m, z)
            if NUM_CHILD == 1:
                z_y = tl.where(y1 == k, z, z_y)
        es = ()
        s = tl.zeros([BLOCK], tl.float32)
        for k in tl.static_range(K):
            e = _exp(zs[k] - m, FAST_EXP)
            es = es + (e,)
            s += e
        lse = m + tl.log(s)
        sig = tl.zeros_like(lse)
        if HAS_CONTOUR:
            sig = tl.sigmoid(tl.load(clogits_ptr + n * stride_cn + u * stride_cs, mask=mask, other=0.0).to(tl.float32))

        if NUM_CHILD == 1:
            wsum = w1
            seg_acc, ctr_acc, dctr = _terms(valid1, w1, z_y, lse, sig, ct_ptr, go_ptr, map_ptr, u, mask, alpha,
                                            GOUT, HAS_CONTOUR, LOSS)
        else:
            # label index of the block's first voxel; child c adds ((cd * H + ch) * W + cw)
            ud = u // HW_low
            uh = (u % HW_low) // W_low
            uw = u % W_low
            first = (ud * FD * H_full + uh * FH) * W_full + uw * FW
            wsum = tl.zeros_like(lse)
            seg_acc = tl.zeros_like(lse)
            ctr_acc = tl.zeros_like(lse)
            dctr = tl.zeros_like(lse)
            for c in range(NUM_CHILD):
                idx = first + ((c // (FH * FW)) * H_full + (c // FW) % FH) * W_full + c % FW
                y_c, valid_c, w_c = _label_weight(lab_ptr, w_ptr, cw_ptr, go_ptr, idx, mask, K, ignore_index,
                                                  HAS_WEIGHT, HAS_CW, HAS_IGNORE, GOUT)
                if LOSS != 0:
                    z_y = tl.load(lrow + y_c * stride_lk, mask=valid_c, other=0.0).to(tl.float32)
                seg_c, ctr_c, dctr_c = _terms(valid_c, w_c, z_y, lse, sig, ct_ptr, go_ptr, map_ptr, idx, mask,
                                              alpha, GOUT, HAS_CONTOUR, LOSS)
                wsum += w_c
                seg_acc += seg_c
                ctr_acc += ctr_c
                dctr += dctr_c
        seg_tot += seg_acc
        ctr_tot += ctr_acc

        if GRAD:
            grow = glogits_ptr + n * stride_gn + u * stride_gs
            inv_s = 1.0 / s
            for k in tl.static_range(K):
                p = es[k] * inv_s
                if NUM_CHILD == 1:
                    h = tl.where(y1 == k, wsum, 0.0)
                else:
                    h = tl.zeros_like(lse)
                    for c in range(NUM_CHILD):
                        idx = first + ((c // (FH * FW)) * H_full + (c // FW) % FH) * W_full + c % FW
                        y_c, _, w_c = _label_weight(lab_ptr, w_ptr, cw_ptr, go_ptr, idx, mask, K, ignore_index,
                                                    HAS_WEIGHT, HAS_CW, HAS_IGNORE, GOUT)
                        h += tl.where(y_c == k, w_c, 0.0)
                g = seg_scale * (wsum * p - h)
                tl.store(grow + k * stride_gk, g.to(glogits_ptr.dtype.element_ty), mask=mask)
            if HAS_CONTOUR:
                gc = ctr_scale * 2.0 * sig * (1.0 - sig) * dctr
                tl.store(gclogits_ptr + n * stride_dn + u * stride_ds, gc.to(gclogits_ptr.dtype.element_ty),
                         mask=mask)

    if LOSS == 1:  # one partial pair per program, added in a fixed order by the last program to finish
        tl.store(partials_ptr + pid, tl.sum(seg_tot, axis=0))
        tl.store(partials_ptr + nprog + pid, tl.sum(ctr_tot, axis=0))
        ticket = tl.atomic_add(counter_ptr, 1, sem="acq_rel")  # orders the stores above before the ticket
        if ticket == nprog - 1:
            _finalize(partials_ptr, out_ptr, norm_ptr, nprog, divisor, alpha, NORM_PTR, BLOCK)
            tl.store(counter_ptr, 0)  # every program has taken its ticket: ready for the next launch


@triton.jit
def _label_stats_kernel(labels_ptr, stats_ptr, numel, K, ignore_index, HAS_IGNORE: tl.constexpr,
                        BLOCK: tl.constexpr):
    """Per program: number of kept (non-ignored) voxels and of labels outside [0, K) that are not ignored."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    y = tl.load(labels_ptr + offs, mask=mask, other=0).to(tl.int64)
    kept = mask
    if HAS_IGNORE:
        kept = kept & (y != ignore_index)
    bad = kept & ((y < 0) | (y >= K))
    tl.store(stats_ptr + pid * 2, tl.sum(kept.to(tl.int32), axis=0))
    tl.store(stats_ptr + pid * 2 + 1, tl.sum(bad.to(tl.int32), axis=0))


# ----------------------------------------------------------------------------------------------- launchers
def _launch(
    logits: Tensor, labels: Tensor, weight: Optional[Tensor], contour_logits: Optional[Tensor],
    contour_target: Optional[Tensor], class_weight: Optional[Tensor], ignore_index: Optional[int],
    alpha: float, *, loss: int, out: Optional[Tensor] = None, grads: Optional[tuple[Tensor, Optional[Tensor]]] = None,
    divisor: float = 1.0, norm: Optional[Tensor] = None, gscale: Optional[Tensor] = None,
    gout: Optional[Tensor] = None, ctr_coef: float = 1.0,
) -> None:
    """Run :func:`_loss_kernel` once, writing into ``out`` / ``grads`` (see the kernel for the modes)."""
    n, k, *low = logits.shape
    full = labels.shape[1:]
    pad = [1] * (3 - len(low))
    d_l, h_l, w_l = pad + list(low)
    _, h_f, w_f = pad + list(full)
    fd, fh, fw = (f // s for f, s in zip(pad + list(full), pad + list(low)))
    s_low = d_l * h_l * w_l
    has_contour = contour_logits is not None
    glogits, gclogits = grads if grads is not None else (logits, contour_logits)
    c_first = contour_logits.ndim - len(low) if has_contour else 0
    block = _block(fd * fh * fw, k)
    tiles_s = cdiv(s_low, block)
    grid = (min(tiles_s * n, _max_programs(logits.device)),)
    dummy = logits
    partials = counter = dummy
    if loss == 1:
        partials = torch.empty(2 * grid[0], dtype=torch.float32, device=logits.device)
        counter = _ticket_counter(logits.device)
    _LOSS_KERNEL(
        grid,
        logits, labels, dummy if weight is None else weight, dummy if class_weight is None else class_weight,
        dummy if contour_logits is None else contour_logits, dummy if contour_target is None else contour_target,
        dummy if gout is None else gout, dummy if norm is None else norm, dummy if gscale is None else gscale,
        partials, counter, dummy if out is None else out, glogits, dummy if gclogits is None else gclogits,
        s_low, h_l * w_l, w_l, labels.numel() // n, h_f, w_f, tiles_s, tiles_s * n,
        *_strides(logits, 2), *_strides(glogits, 2),
        *(_sample_strides(contour_logits, c_first) if has_contour else (0, 0)),
        *(_sample_strides(gclogits, c_first) if has_contour else (0, 0)),
        0 if ignore_index is None else ignore_index, alpha, divisor, ctr_coef,
        K=k, FAST_EXP=not INTERPRET, FD=fd, FH=fh, FW=fw, HAS_WEIGHT=weight is not None, HAS_CW=class_weight is not None,
        HAS_IGNORE=ignore_index is not None, HAS_CONTOUR=has_contour, LOSS=loss, GRAD=grads is not None,
        GOUT=gout is not None, NORM_PTR=norm is not None, GSCALE=gscale is not None, BLOCK=block,
        num_warps=NUM_WARPS,
    )


def _strides(t: Tensor, first: int) -> tuple[int, int, int]:
    """Logits-like (N, K, *spatial): strides of N and K, and the flattened stride of dims ``first:``."""
    st = t.stride()
    return st[0], st[1], flat_spatial_stride(t, first)


def _sample_strides(t: Tensor, first: int) -> tuple[int, int]:
    """Contour-logits-like: stride of N and the flattened stride of dims ``first:``."""
    return t.stride(0), flat_spatial_stride(t, first)


_LOSS_KERNEL = FastLauncher(_loss_kernel)
_RESCALE_KERNEL = FastLauncher(_rescale_kernel)
_STATS_KERNEL = FastLauncher(_label_stats_kernel)
_COUNTERS: dict[tuple[int, int], Tensor] = {}


def _ticket_counter(device: torch.device) -> Tensor:
    """int32 zero for the loss kernel's ticket, reset to 0 by the kernel's last program: one per CUDA stream
    (launches on one stream run in order), made once; a fresh one while a CUDA graph is being captured."""
    if device.type != "cuda" or torch._C._cuda_isCurrentStreamCapturing():
        return torch.zeros(1, dtype=torch.int32, device=device)
    # raw calls: torch.cuda.current_stream() builds a Stream object (tens of us of host time per loss call)
    key = (device.index, torch._C._cuda_getCurrentRawStream(device.index))  # CUDA tensors' devices carry an index
    counter = _COUNTERS.get(key)
    if counter is None:
        counter = _COUNTERS[key] = torch.zeros(1, dtype=torch.int32, device=device)
    return counter


def _max_programs(device: torch.device) -> int:
    """Programs of one loss launch (each loops over tiles): PROGRAMS_PER_SM per multiprocessor on CUDA; 3 in the
    interpreter, so that the CPU tests run several tiles per program."""
    return PROGRAMS_PER_SM * multiprocessors(device.index) if device.type == "cuda" else 3


def _block(children: int, num_classes: int) -> int:
    """Logit voxels per program: BLOCK, fewer when each covers several label voxels, and fewer for more than 4
    classes (each thread keeps its voxels' K logits and exponentials in registers)."""
    block = min(BLOCK, 4096 // next_power_of_2(num_classes))
    return block if children == 1 else max(64, block // next_power_of_2(children))


def _label_stats(labels: Tensor, num_classes: int, ignore_index: Optional[int]) -> Tensor:
    """int64 (2,): kept voxels, out-of-range labels (ignore_index excepted)."""
    numel = labels.numel()
    stats = torch.empty((cdiv(numel, STATS_BLOCK), 2), dtype=torch.int32, device=labels.device)
    _STATS_KERNEL(
        (stats.shape[0],), labels, stats, numel, num_classes, 0 if ignore_index is None else ignore_index,
        HAS_IGNORE=ignore_index is not None, BLOCK=STATS_BLOCK,
    )
    return stats.sum(0)


def _divisor(logits: Tensor, labels: Tensor, contour_logits: Optional[Tensor], ignore_index: Optional[int],
             reduction: str, check_values: bool) -> tuple[float, Optional[Tensor]]:
    """Value checks (one host sync), then the divisor of the sums: a host number, or (mean with
    ignore_index) a device count of kept voxels (first element of the returned tensor)."""
    stats = None
    if check_values or (ignore_index is not None and reduction == "mean"):
        stats = _label_stats(labels, logits.shape[1], ignore_index)
    if check_values:
        from hmedn_fast.ops.loss import nan_flag, raise_for_flags

        flags = torch.stack([stats[1] > 0, nan_flag(logits, logits.device),
                             nan_flag(contour_logits, logits.device)]).tolist()
        raise_for_flags(flags, logits, labels, contour_logits, ignore_index)
    if reduction != "mean":
        return 1.0, None
    return (float(labels.numel()), None) if ignore_index is None else (1.0, stats)


def _grad_buffers(logits: Tensor, contour_logits: Optional[Tensor], write_grads: bool) -> tuple[Tensor, Tensor]:
    """Gradient buffers like the logits (strides kept), or distinct empty tensors when not written."""
    gl = torch.empty_like(logits) if write_grads else logits.new_empty((0,))
    gc = torch.empty_like(contour_logits) if write_grads and contour_logits is not None else logits.new_empty((0,))
    return gl, gc


def _contour_base(alpha: float) -> float:
    """Factor of the one-pass contour gradient: alpha (gradient of the total), 1 when alpha is 0."""
    return alpha if alpha != 0.0 else 1.0


# ----------------------------------------------------------------------------------------------- passes
def _forward(logits: Tensor, labels: Tensor, weight: Optional[Tensor], contour_logits: Optional[Tensor],
             contour_target: Optional[Tensor], class_weight: Optional[Tensor], alpha: float,
             ignore_index: Optional[int], reduction: str, write_grads: bool, check_values: bool,
             ) -> tuple[Tensor, Tensor, Tensor]:
    """``(out, grad_logits, grad_contour)``. ``out``: float32 ``[L, L_s, L_r, divisor]`` (mean / sum) or the
    per-voxel map (none). With ``write_grads`` (one-pass) the gradients of ``L`` (for the contour logits,
    of ``L_r`` when alpha is 0), else empty tensors."""
    divisor, norm = _divisor(logits, labels, contour_logits, ignore_index, reduction, check_values)
    gl, gc = _grad_buffers(logits, contour_logits, write_grads)
    args = (logits, labels, weight, contour_logits, contour_target, class_weight, ignore_index, alpha)
    if reduction == "none":
        out = torch.empty(labels.shape, dtype=torch.float32, device=logits.device)
        _launch(*args, loss=2, out=out)
        return out, gl, gc
    out = torch.empty(4, dtype=torch.float32, device=logits.device)
    grads = (gl, gc if contour_logits is not None else None) if write_grads else None
    _launch(*args, loss=1, out=out, grads=grads, divisor=divisor, norm=norm, ctr_coef=_contour_base(alpha))
    return out, gl, gc


def _backward_two_pass(grad_out: Tensor, out: Tensor, logits: Tensor, labels: Tensor, weight: Optional[Tensor],
                       contour_logits: Optional[Tensor], contour_target: Optional[Tensor],
                       class_weight: Optional[Tensor], alpha: float, ignore_index: Optional[int], reduction: str,
                       ) -> tuple[Tensor, Tensor]:
    """Gradients of ``sum(grad_out * out[:3])`` (mean / sum; ``out[3]`` holds the divisor) or of
    ``sum(grad_out * map)`` (none) w.r.t. logits and contour logits, recomputed from the inputs."""
    gl, gc = _grad_buffers(logits, contour_logits, True)
    grads = (gl, gc if contour_logits is not None else None)
    args = (logits, labels, weight, contour_logits, contour_target, class_weight, ignore_index, alpha)
    if reduction == "none":
        _launch(*args, loss=0, grads=grads, gout=grad_out.contiguous(), ctr_coef=alpha)
    else:
        _launch(*args, loss=0, grads=grads, norm=out[3:], gscale=grad_out.contiguous())
    return gl, gc


def _rescale(gl: Tensor, gc: Tensor, g_total: Optional[Tensor], g_seg: Optional[Tensor],
             g_ctr: Optional[Tensor], alpha: float) -> None:
    """One-pass backward: scale the forward's gradients of ``L`` in place to the upstream gradients."""
    base = _contour_base(alpha)  # d/dc of L = alpha d/dc L_r; the buffer holds base d/dc L_r
    programs = max(1, min(cdiv(max(gl.numel(), gc.numel()), STATS_BLOCK), RESCALE_PROGRAMS))
    dummy = gl
    _RESCALE_KERNEL(
        (programs,), gl, gl.numel(), gc, gc.numel(), dummy if g_total is None else g_total,
        dummy if g_seg is None else g_seg,
        dummy if g_ctr is None else g_ctr, alpha / base, 1.0 / base,
        HAS_G0=g_total is not None, HAS_G1=g_seg is not None, HAS_G2=g_ctr is not None, BLOCK=STATS_BLOCK,
    )


# ----------------------------------------------------------------------------------------------- eager autograd
class _FusedLoss(torch.autograd.Function):
    """Eager path (lowest host overhead): the passes above under a plain autograd.Function."""

    @staticmethod
    def forward(ctx, logits, labels, weight, contour_logits, contour_target, class_weight, alpha, ignore_index,
                reduction, write_grads, check_values, return_parts):
        out, gl, gc = _forward(logits, labels, weight, contour_logits, contour_target, class_weight, alpha,
                               ignore_index, reduction, write_grads, check_values)
        ctx.set_materialize_grads(False)
        ctx.write_grads, ctx.options = write_grads, (alpha, ignore_index, reduction)
        ctx.has_contour, ctx.used = contour_logits is not None, False
        if write_grads:
            ctx.save_for_backward(gl, gc)
        else:
            ctx.save_for_backward(out, logits, labels, weight, contour_logits, contour_target, class_weight)
        if reduction == "none":
            return out
        return (out[0], out[1], out[2]) if return_parts else out[0]  # one output: less autograd work

    @staticmethod
    def backward(ctx, *grads):
        if all(g is None for g in grads):
            return (None,) * 12
        grads = grads + (None,) * (3 - len(grads))  # upstream gradients of (L, L_s, L_r)
        alpha, ignore_index, reduction = ctx.options
        if ctx.write_grads:
            if ctx.used:
                raise RuntimeError("the one-pass fused loss cannot be backpropagated twice (its gradients are "
                                   "rescaled in place); use one_pass=False with retain_graph")
            ctx.used = True
            gl, gc = ctx.saved_tensors
            _rescale(gl, gc, *grads, alpha)
        else:
            out, *inputs = ctx.saved_tensors
            if reduction == "none":
                grad_out = grads[0]
            else:
                grad_out = torch.stack([torch.zeros_like(out[0]) if g is None else g.float() for g in grads])
            gl, gc = _backward_two_pass(grad_out, out, *inputs, alpha, ignore_index, reduction)
        return (gl, None, None, gc if ctx.has_contour else None) + (None,) * 8


# ----------------------------------------------------------------------------------------------- custom ops
@torch.library.custom_op("hmedn_fast::difficulty_guided_loss", mutates_args=())
def _loss_op(
    logits: Tensor, labels: Tensor, weight: Optional[Tensor], contour_logits: Optional[Tensor],
    contour_target: Optional[Tensor], class_weight: Optional[Tensor], alpha: float, ignore_index: Optional[int],
    reduction: str, write_grads: bool, check_values: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Forward as a custom op for ``torch.compile``; see :func:`_forward`."""
    return _forward(logits, labels, weight, contour_logits, contour_target, class_weight, alpha, ignore_index,
                    reduction, write_grads, check_values)


@_loss_op.register_fake
def _loss_op_fake(logits, labels, weight, contour_logits, contour_target, class_weight, alpha, ignore_index,
                  reduction, write_grads, check_values):
    shape = labels.shape if reduction == "none" else (4,)
    return (logits.new_empty(shape, dtype=torch.float32), *_grad_buffers(logits, contour_logits, write_grads))


@torch.library.custom_op("hmedn_fast::difficulty_guided_loss_backward", mutates_args=())
def _loss_backward_op(
    grad_out: Tensor, out: Tensor, logits: Tensor, labels: Tensor, weight: Optional[Tensor],
    contour_logits: Optional[Tensor], contour_target: Optional[Tensor], class_weight: Optional[Tensor],
    alpha: float, ignore_index: Optional[int], reduction: str,
) -> tuple[Tensor, Tensor]:
    """Two-pass backward as a custom op; see :func:`_backward_two_pass`."""
    return _backward_two_pass(grad_out, out, logits, labels, weight, contour_logits, contour_target, class_weight,
                              alpha, ignore_index, reduction)


@_loss_backward_op.register_fake
def _loss_backward_op_fake(grad_out, out, logits, labels, weight, contour_logits, contour_target, class_weight,
                           alpha, ignore_index, reduction):
    return _grad_buffers(logits, contour_logits, True)


@torch.library.custom_op("hmedn_fast::difficulty_guided_loss_scale_", mutates_args=("grad_logits", "grad_contour"))
def _scale_op(grad_logits: Tensor, grad_contour: Tensor, grad_out: Tensor, alpha: float) -> None:
    """One-pass backward as a custom op: :func:`_rescale` by the gradient of ``[L, L_s, L_r, divisor]``."""
    g = grad_out.float().contiguous()
    _rescale(grad_logits, grad_contour, g, g[1:], g[2:], alpha)


@_scale_op.register_fake
def _scale_op_fake(grad_logits, grad_contour, grad_out, alpha):
    return None


def _setup_context(ctx, inputs, output) -> None:
    logits, labels, weight, contour_logits, contour_target, class_weight, alpha, ignore_index, reduction, \
        write_grads, _ = inputs
    out, gl, gc = output
    ctx.mark_non_differentiable(gl, gc)
    ctx.set_materialize_grads(False)
    ctx.write_grads = write_grads
    ctx.has_contour = contour_logits is not None
    ctx.options = (alpha, ignore_index, reduction)
    if write_grads:
        ctx.save_for_backward(gl, gc)
    else:
        ctx.save_for_backward(out, logits, labels, weight, contour_logits, contour_target, class_weight)


def _backward(ctx, grad_out, *_):
    if grad_out is None:
        return (None,) * 11
    if ctx.write_grads:
        gl, gc = ctx.saved_tensors  # unpacking a second time (retain_graph) fails: they were scaled in place
        torch.ops.hmedn_fast.difficulty_guided_loss_scale_(gl, gc, grad_out, ctx.options[0])
    else:
        out, logits, labels, weight, contour_logits, contour_target, class_weight = ctx.saved_tensors
        gl, gc = torch.ops.hmedn_fast.difficulty_guided_loss_backward(
            grad_out, out, logits, labels, weight, contour_logits, contour_target, class_weight, *ctx.options)
    return (gl, None, None, gc if ctx.has_contour else None) + (None,) * 7


_loss_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------- C++ fast path
def _launch_for_cpp(kind: int, args: tuple, constexprs: dict, grid: int) -> tuple[int, int, int, str]:
    """Callback of ``csrc/fused_loss.cpp`` for a kernel specialisation it has not launched yet: launch it through
    Triton (compiling it once) and describe the compiled kernel for the direct launches that follow."""
    kernel = (_loss_kernel, _rescale_kernel)[kind][(grid,)](*args, **constexprs)
    return native_launch_info(kernel)


def setup_fast_path(ext) -> None:
    """Hand this module's launch constants and :func:`_launch_for_cpp` to the compiled fast path."""
    ext.fused_loss_setup(_launch_for_cpp, BLOCK, NUM_WARPS, PROGRAMS_PER_SM, STATS_BLOCK, RESCALE_PROGRAMS)


# ----------------------------------------------------------------------------------------------- entry point
def _as_map(t: Tensor, full: torch.Size) -> Tensor:
    """A per-voxel map as contiguous (N, *spatial) (it may come as (N, 1, *spatial))."""
    return (t if t.shape == full else t.reshape(full)).contiguous()


def _kernel_layout(t: Tensor, first: int) -> Tensor:
    return t if flat_spatial_stride(t, first) is not None else t.contiguous()


def difficulty_guided_loss(
    logits: Tensor, labels: Tensor, weight: Optional[Tensor], contour_logits: Optional[Tensor],
    contour_target: Optional[Tensor], alpha: float, class_weight: Optional[Tensor], ignore_index: Optional[int],
    reduction: str, *, return_parts: bool = False, check_values: bool = True, one_pass: Optional[bool] = None,
    custom_op: Optional[bool] = None,
) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """Triton backend of :func:`hmedn_fast.ops.difficulty_guided_loss` (inputs already checked there).

    ``one_pass``: None (automatic: the forward writes the gradients when grad mode is on, a logit
    requires grad and the reduction is mean / sum), or force it on / off (benchmarks; ignored for none).
    ``custom_op``: None (automatic: the torch custom op while ``torch.compile`` traces, so the graph does
    not break; the lighter autograd.Function in eager mode), or force either (tests).
    """
    full = labels.shape
    logits = _kernel_layout(logits, 2)
    labels = labels.contiguous()
    weight = None if weight is None else _as_map(weight, full)
    contour_target = None if contour_target is None else _as_map(contour_target, full)
    if contour_logits is not None:
        contour_logits = _kernel_layout(contour_logits, contour_logits.ndim - logits.ndim + 2)
    class_weight = None if class_weight is None else class_weight.contiguous()
    needs_grad = torch.is_grad_enabled() and (
        logits.requires_grad or (contour_logits is not None and contour_logits.requires_grad))
    write_grads = reduction != "none" and (needs_grad if one_pass is None else one_pass)
    args = (logits, labels, weight, contour_logits, contour_target, class_weight, alpha, ignore_index, reduction,
            write_grads, check_values)
    if custom_op if custom_op is not None else torch.compiler.is_compiling():
        out = _loss_op(*args)[0]
        if reduction == "none":
            return out
        return (out[0], out[1], out[2]) if return_parts else out[0]
    return _FusedLoss.apply(*args, return_parts)
