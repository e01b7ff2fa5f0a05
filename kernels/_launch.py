"""What every launcher shares: argument checks (one wording, one place) and kernel keyword arguments.

Errors are ``ValueError`` in FlashInfer's style, naming the argument, what was expected and what
came: ``Invalid shape of q: expected [T, 4, 64], got [10, 2, 64]``. A shape is given per dim as an
int (that size), ``AtLeast(n)`` (n or more) or a str (any size; the dim's name, for the message).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
from triton.compiler import CompiledKernel
from triton.runtime.jit import JITFunction

from .params import PrismParams
from .plan import PrefillPlan

__all__ = [
    "launch",
    "launch_call",
    "recording",
    "LaunchReplay",
    "DirectLaunch",
    "strides",
    "AtLeast",
    "check",
    "check_tensor",
    "check_params",
    "check_plan",
    "check_gqa",
    "check_block_table",
    "check_selection_buffers",
]


@dataclass(frozen=True)
class AtLeast:
    """A dim of ``n`` or more (buffers sized for the largest launch)."""

    n: int

    def __str__(self) -> str:
        return f">= {self.n}"


Dim = Union[int, AtLeast, str]


def strides(t: Optional[torch.Tensor], *names: str) -> dict[str, int]:
    """``stride_<name>`` keyword arguments of a kernel for the leading dims of ``t`` (0 for an
    absent optional tensor), e.g. ``strides(q, "qt", "qh")`` -> {stride_qt: q.stride(0), ...}."""
    return {f"stride_{n}": (0 if t is None else t.stride(i)) for i, n in enumerate(names)}
DTypes = Union[torch.dtype, Sequence[torch.dtype]]


# ----------------------------------------------------------------------------------------------
# launches, recorded for replay
# ----------------------------------------------------------------------------------------------
#: One recorded launch: (kernel, grid, kwargs, compiled), ``compiled`` the kernel Triton ran for
#: that call (``triton.compiler.CompiledKernel``; None for a non-Triton call, e.g. FA3, or under
#: the Triton interpreter, which compiles nothing).
Recorded = tuple[Any, Optional[tuple[int, ...]], dict[str, Any], Any]
_RECORDERS: list[list[Recorded]] = []


def launch(kernel: Any, grid: tuple[int, ...], **kwargs: Any) -> None:
    """``kernel[grid](**kwargs)``, recorded when a ``recording()`` is open (so a caller can replay
    the launches of a checked call). The estimation's launchers (pooling, selection) start their
    kernels only this way and do no other device work, which is what makes their calls replayable."""
    ran = kernel[grid](**kwargs)  # a JITFunction returns the CompiledKernel it launched
    compiled = ran if _relaunchable(kernel, ran) else None
    for calls in _RECORDERS:  # every open recording: an outer one replays the inner ones' launches too
        calls.append((kernel, grid, kwargs, compiled))


def launch_call(fn: Callable[..., Any], **kwargs: Any) -> None:
    """``fn(**kwargs)`` for a launch that is not a Triton kernel (e.g. an FA3 call), recorded like
    ``launch`` (replayed as ``fn(**kwargs)`` with the inputs swapped in)."""
    fn(**kwargs)
    for calls in _RECORDERS:
        calls.append((fn, None, kwargs, None))


def _relaunchable(kernel: Any, ran: Any) -> bool:
    """``ran`` is the CompiledKernel of a bare ``@triton.jit`` kernel without pre-run hooks: what
    ``DirectLaunch`` may relaunch (an autotuner or heuristics wrapper picks its configuration and
    runs its hooks per call; the interpreter compiles nothing)."""
    return isinstance(ran, CompiledKernel) and type(kernel) is JITFunction and not kernel.pre_run_hooks


@contextlib.contextmanager
def recording() -> Iterator[list[Recorded]]:
    """Collect the (kernel, grid, kwargs, compiled) of every ``launch`` made inside the block."""
    calls: list[Recorded] = []
    _RECORDERS.append(calls)
    try:
        yield calls
    finally:
        # by identity (list == would compare the recorded tensors); nested blocks close innermost first
        assert _RECORDERS and _RECORDERS[-1] is calls, "recording() blocks must close innermost first"
        _RECORDERS.pop()


#: Byte alignment Triton specialises tensor arguments on (``tt.divisibility``): a replayed
#: launch passes a swapped tensor straight to the compiled kernel only when it falls in the same
#: class as the recorded one.
_ALIGN = 16


class DirectLaunch:
    """A recorded Triton launch relaunched through the kernel Triton compiled for it.

    Why: ``kernel[grid](**kwargs)`` binds and specialises every argument and builds a cache key
    from all of them on each call: tens of microseconds per launch on the host, several times the
    GPU time of an 8K estimation's launches. A replay's launches differ from the recorded ones only
    in the swapped tensors, so they can run the recorded binary (``CompiledKernel[grid](*args)``,
    the arguments in the kernel's parameter order) once each swapped tensor is what the binary was
    specialised for: the same dtype and the same 16-byte alignment class. Anything else returns
    False and the caller launches the normal way (which compiles or picks the right variant).
    Only bare ``@triton.jit`` kernels without pre-run hooks are relaunched this way (``launch``);
    like any ``CompiledKernel`` launch it reads the current stream and runs Triton's launch
    hooks, but not JITFunction.run's per-call checks (changed globals, the debug knob).
    """

    __slots__ = ("compiled", "grid", "args", "swap")

    def __init__(self, kernel: Any, grid: tuple[int, ...], kwargs: dict[str, Any], compiled: Any,
                 swap: Sequence[tuple[str, int]]) -> None:
        names = [p.name for p in kernel.params]
        pos = {n: i for i, n in enumerate(names)}
        # kwargs that are not parameters (num_warps, num_stages, ...) are compile options: the
        # binary already has them
        self.args = [kwargs[p.name] if p.name in kwargs else p.default for p in kernel.params]
        self.swap = []
        for name, slot in swap:
            t = kwargs[name]
            self.swap.append((pos[name], slot, t.dtype, t.data_ptr() % _ALIGN == 0))
            self.args[pos[name]] = None  # hold no input
        self.compiled = compiled
        self.grid = tuple(grid) + (1,) * (3 - len(grid))

    def __call__(self, inputs: Sequence[Optional[torch.Tensor]]) -> bool:
        args = self.args.copy()
        for p, slot, dtype, aligned in self.swap:
            t = inputs[slot]
            if t is None or t.dtype != dtype or (t.data_ptr() % _ALIGN == 0) != aligned:
                return False
            args[p] = t
        self.compiled[self.grid](*args)
        return True


class LaunchReplay:
    """The kernel launches of one checked launcher call, replayed for a later call whose
    arguments differ only in the values of some tensors (``inputs``) of the same layout.

    Why: the launchers validate every argument and derive every kernel argument on the host,
    ~0.1 ms per launch in Python; a forward repeats the same launch (same plan, workspace, shapes)
    in every layer with only the layer's q and cache tensors changed. Built from a ``recording()``
    of the checked call and the tensors of that call that later calls replace (by identity: an
    input tensor's kwargs are those holding that very object), it relaunches the same kernels
    with those kwargs swapped and nothing else recomputed. A Triton launch reruns the binary of
    the recorded call (``DirectLaunch``) when the swapped tensors fit its specialisation, else
    goes through ``kernel[grid]`` as a fresh call would (``direct`` counts the launches that can).

    The caller guarantees the rest is unchanged: hold it only under a key of everything else
    the launches read (see ``prefill.prism_estimate``). The recorded kwargs keep no input: those
    slots hold None until a call fills them, so a stored replay does not keep a layer's
    activations alive.
    """

    __slots__ = ("calls", "keep")

    def __init__(self, calls: Sequence[Recorded], inputs: Sequence[Optional[torch.Tensor]], keep: Any = None) -> None:
        self.keep = keep  # what the caller's key names by id() (kept alive, so the id stays its own)
        slot = {id(t): i for i, t in enumerate(inputs) if t is not None}
        self.calls = []
        for kernel, grid, kwargs, compiled in calls:
            swap = [(k, slot[id(v)]) for k, v in kwargs.items() if id(v) in slot]
            direct = None if compiled is None else DirectLaunch(kernel, grid, kwargs, compiled, swap)
            self.calls.append((kernel, grid, {k: (None if id(v) in slot else v) for k, v in kwargs.items()}, swap,
                               direct))

    @property
    def direct(self) -> int:
        """Launches that can rerun their recorded binary (``DirectLaunch``)."""
        return sum(c[4] is not None for c in self.calls)

    def __call__(self, *inputs: Optional[torch.Tensor]) -> None:
        for kernel, grid, kwargs, swap, direct in self.calls:
            if direct is not None and direct(inputs):
                continue
            if swap:
                kwargs = dict(kwargs)
                for k, i in swap:
                    kwargs[k] = inputs[i]
            if grid is None:  # launch_call
                kernel(**kwargs)
            else:
                kernel[grid](**kwargs)


def check(cond: bool, msg: str) -> None:
    """``ValueError(msg)`` unless ``cond``: for what a caller can get wrong (not an assert)."""
    if not cond:
        raise ValueError(msg)


def _dim_ok(want: Dim, got: int) -> bool:
    if isinstance(want, AtLeast):
        return got >= want.n
    if isinstance(want, str):
        return True
    return got == want


def _dtype_names(dts: Sequence[torch.dtype]) -> str:
    names = [str(d).removeprefix("torch.") for d in dts]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def check_tensor(
    name: str,
    t: torch.Tensor,
    *,
    shape: Optional[Sequence[Dim]] = None,
    dtype: Optional[DTypes] = None,
    device: Optional[torch.device] = None,
    last_stride_1: bool = False,
    contiguous: bool = False,
) -> None:
    """Check a tensor argument; raise ValueError naming ``name`` and the first property that is off.

    Args:
        name: the argument's name, as the caller wrote it.
        shape: one entry per dim: int (exact), AtLeast(n) or str (any size, named in the message).
        dtype: the dtype, or a sequence of accepted dtypes.
        device: the device the tensor must be on (usually the launch's first tensor's).
        last_stride_1: the last dim must be contiguous (stride 1), what the kernels index with.
        contiguous: the whole tensor must be contiguous.
    """
    # Every launch runs these checks (the attend step once per layer): conditions first, messages
    # only for a failure (an f-string passed to check() would be formatted on every call).
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"Invalid {name}: expected a torch.Tensor, got {type(t).__name__}")
    if shape is not None and not (t.dim() == len(shape) and all(_dim_ok(w, g) for w, g in zip(shape, t.shape))):
        want = ", ".join(str(w) for w in shape)
        raise ValueError(f"Invalid shape of {name}: expected [{want}], got {list(t.shape)}")
    if dtype is not None and not (t.dtype == dtype if isinstance(dtype, torch.dtype) else t.dtype in dtype):
        dts = (dtype,) if isinstance(dtype, torch.dtype) else tuple(dtype)
        raise ValueError(f"Invalid dtype of {name}: expected {_dtype_names(dts)}, got {t.dtype}")
    if device is not None and t.device != device and t.device != torch.device(device):
        raise ValueError(f"Invalid device of {name}: expected {device} (the launch's device), got {t.device}; move "
                         f"it with .to({str(device)!r})")
    if last_stride_1 and t.dim() != 0 and t.stride(-1) != 1:
        raise ValueError(f"{name} must have a contiguous last dim (stride 1), got strides {t.stride()}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {t.stride()} for shape {list(t.shape)}")


def check_plan(plan: PrefillPlan, device: torch.device, *, num_q_heads: Optional[int] = None,
               num_rows: Optional[int] = None, rows_of: str = "q") -> None:
    """The plan matches the launch: its device, its q head count, and ``num_rows`` rows of
    ``rows_of`` cover its tokens."""
    if plan.qb_abs.device != device and plan.qb_abs.device != torch.device(device):
        raise ValueError(f"plan is on {plan.qb_abs.device}, the launch on {device}; use plan.to(device)")
    if num_q_heads is not None and plan.num_q_heads != num_q_heads:
        raise ValueError(f"plan was built for {plan.num_q_heads} q heads, {rows_of} has {num_q_heads}")
    if num_rows is not None and num_rows < plan.num_tokens:
        raise ValueError(f"{rows_of} has {num_rows} rows, the plan covers {plan.num_tokens}")


def check_params(params: PrismParams, head_dim: int, device: torch.device, *, head_dim_of: str) -> None:
    """The layer's PrismParams (validated when built) fit the launch: band masks of the head dim,
    on the launch's device."""
    check(isinstance(params, PrismParams), f"params must be the layer's PrismParams, got {type(params).__name__}")
    check(params.head_dim == head_dim,
          f"params has band masks of {params.head_dim} dims, {head_dim_of}'s head dim is {head_dim}")
    check_tensor("params.band_high", params.band_high, device=device)


def check_gqa(num_q_heads: int, num_kv_heads: int) -> None:
    """Grouped-query attention: every kv head serves G = HQ // HKV q heads."""
    if not (num_kv_heads >= 1 and num_q_heads % num_kv_heads == 0):
        raise ValueError(f"HQ={num_q_heads} q heads is not a multiple of HKV={num_kv_heads} kv heads")


def check_block_table(block_table: torch.Tensor, plan: PrefillPlan, device: torch.device) -> None:
    """int32 [>= R, max_pages] page table, row-contiguous, on the launch's device."""
    check_tensor("block_table", block_table, shape=(AtLeast(plan.num_reqs), "max_pages"), dtype=torch.int32,
                 device=device, last_stride_1=True)


def check_selection_buffers(sel_idx: torch.Tensor, sel_cnt: torch.Tensor, plan: PrefillPlan,
                            device: torch.device) -> None:
    """The BSR buffers of a plan's selection (kernels/plan.py: BlockSelection's indices / counts)."""
    check_tensor("sel_idx", sel_idx, shape=(AtLeast(plan.sel_capacity),), dtype=torch.int16, device=device,
                 last_stride_1=True)
    check_tensor("sel_cnt", sel_cnt, shape=(AtLeast(plan.num_q_blocks * plan.num_q_heads),), dtype=torch.int32,
                 device=device, last_stride_1=True)
