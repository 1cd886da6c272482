"""Bidirectional Mamba block (VideoMamba / Vim "v2" layout) and the selective scan behind it.

The selective scan (Mamba's S6) runs per channel ``d`` and state ``n``::

    delta_t = softplus(delta_t + delta_bias)
    h_t     = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t        (h_{-1} = 0)
    y_t     = <C_t, h_t> + D * u_t,   then  y_t *= silu(z_t)

Two implementations compute it, chosen per call (``impl``: "auto" | "reference" | "fused"):

- ``selective_scan_reference``: pure PyTorch, used on CPU and as the numerical reference, in
  one of two ways by device:
  - on the CPU, step by step (``_scan_steps``): time is cut into blocks of ``STEP_BLOCK`` steps;
    a block's decays and drives, (STEP_BLOCK, b, n, d), stay in cache, the state is carried with
    one fused multiply-add per step, and the block's outputs are contracted with C at once.
    The CPU is memory-bound here: the parallel scan below makes log2(chunk) passes over
    (b, d, n, L) tensors of hundreds of MB (at MVQA-tiny size, 154 MB per clip each, so every
    pass page-faults fresh memory), 9.5 s per scan and clip against 0.3 s step by step (one core, 2026-12-03).
  - elsewhere (an accelerator without mamba-ssm), in parallel (``_scan_parallel``): the linear
    recurrence ``h_t = a_t h_{t-1} + b_t`` is a scan under the associative operator
    ``(a1, b1) o (a2, b2) = (a1 a2, a2 b1 + b2)``. The sequence is cut into chunks of ``chunk``
    steps; inside every chunk a Hillis-Steele scan (log2(chunk) vectorised passes) gives the
    local states and the cumulative decay from the chunk start; the states at the chunk ends are
    scanned the same way across chunks (log2(L / chunk) passes on a tensor ``chunk`` times
    smaller) and carried into each chunk with one multiply-add; no Python loop over time.
  Every factor is a decay in [0, 1], so nothing overflows and fp32/fp64 accuracy is kept.
- mamba-ssm's fused CUDA kernel ``selective_scan_fn`` (and causal-conv1d's ``causal_conv1d_fn``
  for the short convolution when installed), used automatically for CUDA tensors when the
  packages import. Neither package is needed to import or run qscore.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IMPLS = ("auto", "reference", "fused")


# ---- fused kernels (optional) --------------------------------------------------------------
@dataclass(frozen=True)
class FusedKernels:
    """What the optional CUDA packages provide; ``reason`` says why a kernel is missing."""

    selective_scan: Callable | None
    causal_conv1d: Callable | None
    reason: str


@functools.cache
def fused_kernels() -> FusedKernels:
    """Import mamba-ssm / causal-conv1d once. Any failure (not installed, built for another GPU
    or CUDA) leaves the pure PyTorch path in charge."""
    scan = conv = None
    reasons = []
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as scan
    except Exception as exc:  # noqa: BLE001 - an optional compiled extension may fail in many ways
        reasons.append(f"mamba-ssm: {type(exc).__name__}: {exc}")
    try:
        from causal_conv1d import causal_conv1d_fn as conv
    except Exception as exc:  # noqa: BLE001
        reasons.append(f"causal-conv1d: {type(exc).__name__}: {exc}")
    return FusedKernels(scan, conv, "; ".join(reasons))


def scan_path(device: torch.device | str, impl: str = "auto") -> str:
    """Which kernels ``impl`` runs on ``device``: "reference", "fused" or "fused+causal-conv1d"."""
    if not _use_fused(torch.device(device), impl):
        return "reference"
    return "fused+causal-conv1d" if fused_kernels().causal_conv1d else "fused"


def _use_fused(device: torch.device, impl: str) -> bool:
    if impl not in IMPLS:
        raise ValueError(f"scan impl must be one of {IMPLS}, got {impl!r}")
    if impl == "reference":
        return False
    available = device.type == "cuda" and fused_kernels().selective_scan is not None
    if impl == "fused" and not available:
        raise RuntimeError(f"fused selective scan unavailable on {device}: {fused_kernels().reason or 'not CUDA'}")
    return available


# ---- the scan --------------------------------------------------------------------------------
def _hillis_steele(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Inclusive scan of ``h_t = a_t h_{t-1} + b_t`` along the last dim (h_{-1} = 0).
    Returns (cumulative decay prod a_{0..t}, h_t), both shaped like ``a``."""
    step = 1
    while step < a.shape[-1]:
        b = b + a * F.pad(b[..., :-step], (step, 0))
        a = a * F.pad(a[..., :-step], (step, 0), value=1.0)
        step *= 2
    return a, b


def linear_scan(a: Tensor, b: Tensor, chunk: int = 16) -> Tensor:
    """``h_t = a_t h_{t-1} + b_t`` along the last dim, chunked (see the module docstring).
    a, b: (..., L) -> h: (..., L)."""
    length = a.shape[-1]
    pad = -length % chunk
    a = F.pad(a, (0, pad), value=1.0).unflatten(-1, (-1, chunk))  # (..., n_chunks, chunk)
    b = F.pad(b, (0, pad)).unflatten(-1, (-1, chunk))
    decay, h = _hillis_steele(a, b)  # local: as if each chunk started from h = 0
    if h.shape[-2] > 1:
        _, ends = _hillis_steele(decay[..., -1], h[..., -1])  # true state at each chunk end
        carry = F.pad(ends[..., :-1], (1, 0))  # state entering each chunk
        h = h + decay * carry.unsqueeze(-1)
    return h.flatten(-2)[..., :length]


def selective_scan_reference(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = True,
    chunk: int = 16,
    steps: bool | None = None,
) -> Tensor:
    """Pure PyTorch selective scan with mamba-ssm's signature, computed in fp32 (fp64 if ``u``
    is fp64). u, delta, z: (b, d, L); A: (d, n); B, C: (b, n, L); D, delta_bias: (d,). A, D and
    delta_bias may also hold one set per sample, (b, d, n) and (b, d): BiMamba runs its two
    directions as one scan.
    ``steps``: step by step (default on the CPU) or the parallel scan with ``chunk``.
    Returns y: (b, d, L) in ``u``'s dtype."""
    out_dtype = u.dtype
    dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
    u, delta, A, B, C = (t.to(dtype) for t in (u, delta, A, B, C))
    with torch.autocast(u.device.type, enabled=False):  # the reference stays in `dtype`
        if delta_bias is not None:
            delta = delta + delta_bias.to(dtype)[..., None]
        if delta_softplus:
            delta = F.softplus(delta)
        if steps is None:
            steps = u.device.type == "cpu"
        y = _scan_steps(delta, delta * u, A, B, C) if steps else _scan_parallel(delta, delta * u, A, B, C, chunk)
        if D is not None:
            y = y + u * D.to(dtype)[..., None]
        if z is not None:
            y = y * F.silu(z.to(dtype))
    return y.to(out_dtype)


STEP_BLOCK = 16  # time steps per block of the CPU scan: (16, b, n, d) stays in the caches


def _scan_steps(delta: Tensor, du: Tensor, A: Tensor, B: Tensor, C: Tensor) -> Tensor:
    """sum_n C_t h_t for h_t = exp(delta_t A) h_{t-1} + du_t B_t, one step at a time in blocks
    of ``STEP_BLOCK`` steps, time-major with channels innermost, so each step reads contiguous
    (b, n, d) slices and the broadcasts run along d. Every step is elementwise, so a file's
    states do not depend on its batch beyond fp32 rounding (a kernel's vector tail can move the
    last bit; MVQA scans each clip on its own on the CPU). (b, d, L) -> (b, d, L)."""
    delta, du = (t.permute(2, 0, 1).contiguous() for t in (delta, du))  # (L, b, d)
    B = B.permute(2, 0, 1).unsqueeze(-1).contiguous()  # (L, b, n, 1)
    C = C.permute(2, 0, 1).unsqueeze(-2).contiguous()  # (L, b, 1, n)
    A2 = A.transpose(-1, -2) * math.log2(math.e)  # ([b,] n, d): exp(x A) = exp2(x A2), a third faster
    h = delta.new_zeros(delta.shape[1], A.shape[-1], delta.shape[2])  # (b, n, d)
    ys = []
    for start in range(0, delta.shape[0], STEP_BLOCK):
        block = slice(start, start + STEP_BLOCK)
        decay = (delta[block, :, None] * A2).exp2_()  # (K, b, n, d)
        states = du[block, :, None] * B[block]  # the drives, replaced by the states step by step
        if torch.is_grad_enabled():  # autograd forbids writing into unbind's views
            states = torch.stack([h := torch.addcmul(b, a, h) for a, b in zip(decay.unbind(0), states.unbind(0))])
        else:
            for a, b in zip(decay.unbind(0), states.unbind(0)):
                h = b.addcmul_(a, h)
        ys.append(torch.matmul(C[block], states))  # (K, b, 1, d)
    return torch.cat(ys).squeeze(2).permute(1, 2, 0)


def _scan_parallel(delta: Tensor, du: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk: int) -> Tensor:
    """The same sum with ``linear_scan`` over the whole sequence at once. (b, d, L) -> (b, d, L)."""
    decay = torch.exp(delta.unsqueeze(2) * A[..., None])  # (b, d, n, L)
    drive = du.unsqueeze(2) * B.unsqueeze(1)  # (b, d, n, L)
    return torch.einsum("bdnl,bnl->bdl", linear_scan(decay, drive, chunk), C)


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor,
    z: Tensor,
    delta_bias: Tensor,
    impl: str = "auto",
) -> Tensor:
    """The scan with softplus on ``delta + delta_bias``: fused kernel or reference, by ``impl``."""
    if _use_fused(u.device, impl):
        return fused_kernels().selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus=True)
    return selective_scan_reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus=True)


def causal_conv_silu(x: Tensor, conv: nn.Conv1d, impl: str = "auto") -> Tensor:
    """silu(depthwise causal conv1d(x)); x: (b, d, L). causal-conv1d's kernel when fused."""
    kernel = fused_kernels().causal_conv1d if _use_fused(x.device, impl) else None
    if kernel is not None:
        weight = conv.weight.squeeze(1).to(x.dtype)  # (d, width)
        return kernel(x.contiguous(), weight, conv.bias.to(x.dtype), activation="silu")
    return F.silu(conv(x)[..., : x.shape[-1]])


# ---- the block ---------------------------------------------------------------------------------
class BiMamba(nn.Module):
    """Bidirectional Mamba mixer: in_proj and out_proj shared, each direction with its own conv,
    x_proj, dt_proj, A, D (the backward set ends in ``_b``, as in VideoMamba checkpoints).
    out = out_proj(ssm(x) + flip(ssm_b(flip(x)))). (b, L, d_model) -> (b, L, d_model)."""

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, impl: str = "auto"):
        super().__init__()
        self.impl = impl
        self.d_state = d_state
        self.dt_rank = math.ceil(d_model / 16)
        d_inner = expand * d_model
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)
        for suffix in ("", "_b"):
            conv = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1)
            dt_proj = nn.Linear(self.dt_rank, d_inner)
            _init_dt_proj(dt_proj)
            setattr(self, f"conv1d{suffix}", conv)
            setattr(self, f"x_proj{suffix}", nn.Linear(d_inner, self.dt_rank + 2 * d_state, bias=False))
            setattr(self, f"dt_proj{suffix}", dt_proj)
            # S4D-real initialisation: A = -(1..n) per channel, kept as log in fp32.
            a_log = torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1)
            setattr(self, f"A{suffix}_log", nn.Parameter(a_log))
            setattr(self, f"D{suffix}", nn.Parameter(torch.ones(d_inner)))

    def forward(self, hidden: Tensor) -> Tensor:
        x, z = self.in_proj(hidden).transpose(1, 2).chunk(2, dim=1)  # (b, d_inner, L) each
        fwd, bwd = self._scan_args(x, z, ""), self._scan_args(x.flip(-1), z.flip(-1), "_b")
        if _use_fused(x.device, self.impl):
            forward, backward = (selective_scan(**args, impl=self.impl) for args in (fwd, bwd))
        else:  # both directions in one scan: half the steps of the CPU's step-by-step loop
            b = x.shape[0]
            both = {k: torch.cat([a[k].expand(b, *a[k].shape) if k in PARAMS else a[k] for a in (fwd, bwd)]) for k in fwd}
            forward, backward = selective_scan_reference(**both).chunk(2)
        return self.out_proj((forward + backward.flip(-1)).transpose(1, 2))

    def _scan_args(self, x: Tensor, z: Tensor, suffix: str) -> dict[str, Tensor]:
        """One direction, causal along L: conv + silu, then the input-dependent (delta, B, C) and
        the direction's parameters, as ``selective_scan``'s keyword arguments."""
        x = causal_conv_silu(x, getattr(self, f"conv1d{suffix}"), self.impl)
        x_proj, dt_proj = getattr(self, f"x_proj{suffix}"), getattr(self, f"dt_proj{suffix}")
        dt, B, C = x_proj(x.transpose(1, 2)).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        return dict(
            u=x,
            delta=F.linear(dt, dt_proj.weight).transpose(1, 2),  # bias goes in as delta_bias
            A=-torch.exp(getattr(self, f"A{suffix}_log").float()),
            B=B.transpose(1, 2).contiguous(),
            C=C.transpose(1, 2).contiguous(),
            D=getattr(self, f"D{suffix}").float(),
            z=z,
            delta_bias=dt_proj.bias.float(),
        )


PARAMS = ("A", "D", "delta_bias")  # a direction's own parameters, one set for its whole batch


def _init_dt_proj(dt_proj: nn.Linear, dt_min: float = 1e-3, dt_max: float = 0.1) -> None:
    """Mamba's initialisation: small random weights, and a bias giving softplus(bias) = dt
    log-uniform in [dt_min, dt_max], so each channel starts with its own time scale."""
    std = dt_proj.in_features**-0.5
    nn.init.uniform_(dt_proj.weight, -std, std)
    dt = torch.exp(torch.rand(dt_proj.out_features) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=1e-4)
    with torch.no_grad():
        dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus


class DropPath(nn.Module):
    """Stochastic depth per sample, as timm's ``DropPath`` (same draws), without importing timm:
    that alone takes over 3 s, most of an MVQA run's start-up."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - self.p)
        return x * (keep / (1 - self.p) if self.p < 1 else keep)


class MambaBlock(nn.Module):
    """Pre-norm residual block ``x + drop_path(mixer(rmsnorm(x)))`` on an fp32 residual stream.
    Equal to VideoMamba's add-then-norm Block; keys ``norm.weight`` and ``mixer.*``."""

    def __init__(self, d_model: int, drop_path: float = 0.0, **mixer: int | str):
        super().__init__()
        self.norm = nn.RMSNorm(d_model, eps=1e-5)
        self.mixer = BiMamba(d_model, **mixer)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return x + self.drop_path(self.mixer(self.norm(x))).float()
