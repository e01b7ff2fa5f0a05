"""`PrismConfig`: the one typed configuration of the Prism backend.

Read once from vLLM's ``--additional-config '{"prism": {...}}'`` (which vLLM hashes into its
compile-cache key), validated at startup. Every field has a docstring; a bad value raises
``ValueError`` naming the field, the value, the allowed range and how to fix it.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, fields
from typing import Any, Mapping, Optional, Union

__all__ = ["PrismConfig", "ADDITIONAL_CONFIG_KEY", "AUTO_FALLBACK_MIN_CONTEXT_LEN", "PRESETS", "DEFAULT_PRESET",
           "ATTEND_LAYOUTS", "AUTO_ATTEND_LAYOUTS"]

#: Key under vLLM's ``additional_config`` that holds Prism's settings.
ADDITIONAL_CONFIG_KEY = "prism"

#: Block sizes the kernels are built for.
SUPPORTED_BLOCK_SIZES = (128,)

#: min_context_len when "auto" has no measurement (no CUDA GPU, or the measurement failed): the
#: end-to-end break-even measured through vLLM on an H200 (SmolLM2-135M with the FA3 attend step at
#: the 'quality' preset's selection, Prism forced on every chunk, 2026-12-02, commit 3699195,
#: benchmarks/results/speed-3699195.json: 47,080 tokens; 52,037 in speed-repeat-3699195.json), the
#: larger of the two (never slower than dense is the point), rounded up to whole blocks. Earlier runs
#: (aae5b7f) read 44,205 and 40,652; a later one with one-band estimation (705db1d, speed-705db1d.json) 40,377.
AUTO_FALLBACK_MIN_CONTEXT_LEN = 52096

#: Named settings of the fields that trade quality for speed. A preset fills only the fields the
#: user did not set (explicit values win); ``PrismConfig.preset``'s docstring gives the
#: measurements behind each.
PRESETS: dict[str, dict[str, Any]] = {
    "quality": {"rule": "meanpool", "high_threshold": 0.998, "low_threshold": 0.998, "block_budget": None},
    "fast": {"rule": "paper", "high_threshold": 0.95, "low_threshold": 0.95, "block_budget": None},
}
#: Block-scoring rules (PrismConfig.rule).
RULES = ("paper", "meanpool")
#: Sequence layouts of the FA3 attend step (PrismConfig.attend_layout; ``kernels/attend_fa3.py``).
ATTEND_LAYOUTS = ("head", "group", "head_views", "group_views", "head_halves")
#: The layouts "auto" chooses between: both attend exactly the selected blocks (and so does
#: "head_halves", added at head sizes up to 64: ``attention_backend.backend.auto_layouts``).
AUTO_ATTEND_LAYOUTS = ("head", "head_views")

#: The preset of a config that names none.
DEFAULT_PRESET = "quality"


class _FromPreset:
    """Default of a preset-controlled field: replaced in ``__post_init__`` by the preset's value,
    so a constructed PrismConfig never holds it (``cfg.high_threshold`` is always a float)."""

    def __repr__(self) -> str:
        return "<from preset>"


_FROM_PRESET: Any = _FromPreset()


@dataclass(frozen=True)
class PrismConfig:
    """Settings of Prism block-sparse prefill (paper: arXiv 2602.08426).

    Block importance is estimated from mean-pooled 128-token blocks of queries and keys,
    scored in a high- and a low-frequency RoPE band, calibrated, selected by top-p per band,
    united, and attention is computed exactly on the selected blocks only.
    """

    block_size: int = 128
    """Tokens per Prism block (query and key side). Blocks are absolute: block j covers
    positions [j*block_size, (j+1)*block_size) of a request, whatever the chunking. Not
    tunable: only 128 is accepted (the kernels are built for 128-token blocks)."""

    high_band_dims: Optional[int] = None
    """Head dimensions in the high-frequency band (the fastest-rotating RoPE pairs).
    None: half of the rotary dims (64 at rotary dim 128, as in the paper). Even, >= 2. Only the
    'paper' rule has bands (the default 'meanpool' scores every head dim)."""

    low_band_dims: Optional[int] = None
    """Rotary head dimensions in the low-frequency band (the slowest-rotating RoPE pairs);
    unrotated dims of partial-rotary models are always added to this band (zero frequency).
    None: three quarters of the rotary dims (96 at rotary dim 128). Even, >= 2. Only the 'paper'
    rule has bands."""

    rule: str = _FROM_PRESET
    """How blocks are scored. 'paper': the paper's two RoPE bands (high_band_dims, low_band_dims),
    energy-calibrated, top-p per band, union. 'meanpool': one band of every head dim, no
    calibration, top-p at max(high_threshold, low_threshold) (plain mean pooling). Default: from
    ``preset`` ('meanpool' in 'quality', 'paper' in 'fast').

    Through vLLM on an H200 (SmolLM2-135M, two corpora, benchmarks/results/quality-candidates.json,
    one run) at 8K / 16K / 32K, both rules within 1% of dense perplexity: 'meanpool' at top-p 0.995
    selects 0.55 / 0.48 / 0.41 of the blocks (fortunes +0.47 / +0.68 / +0.88%, Austen +0.28 / +0.32
    / +0.29%) and at 0.998 0.64 / 0.56 / 0.49 (+0.19 / +0.35 / +0.80%, +0.16 / +0.21 / +0.43%),
    where the paper's rule needs 0.998 and 0.67 / 0.60 / 0.52 (+0.13 / +0.36 / +0.87%, +0.14 / +0.18
    / +0.38%); at 0.99 the paper's rule costs +1.44% on fortunes at 32K (quality.json)."""

    preset: str = DEFAULT_PRESET
    """Named defaults for the fields that trade quality for speed (rule, high_threshold,
    low_threshold, block_budget); a field you set yourself overrides the preset's value.
    'quality' (default): the 'meanpool' rule at top-p 0.998, no block budget, within 1% of dense
    perplexity on the model measured. 'fast': the paper's rule at top-p 0.95, about half the
    blocks of 'quality' and +3.6..+5.7% perplexity there.

    'quality' through vLLM on an H200 (benchmarks/results/quality-candidates.json, commit d3f61a3:
    SmolLM2-135M-Instruct, four documents each of Debian's fortunes and of Jane Austen's novels,
    Debian r-cran-janeaustenr) perplexity +0.19% / +0.16% (fortunes / Austen) at 8K, +0.35% / +0.21%
    at 16K and +0.80% / +0.43% at 32K (YaRN), worst single document +1.06%, at density 0.64 / 0.56 /
    0.49; passkeys 30, 13, 12 of 50 against FLASH_ATTN's 30, 15, 14 (the paper's rule at 0.99 and at
    0.998 finds the same 30, 13, 12, sparser settings 14 at 32K in quality.json: these counts do not
    follow the density). Chosen over 'meanpool' at 0.995 (within 1% too, 14-17% fewer blocks) for
    its margin on texts and models not measured here: its worst document was +1.17%. Dense enough
    that Prism pays from about 40-52K tokens on SmolLM2 (speed-3699195.json /
    speed-repeat-3699195.json: 1.16x / 1.12x TTFT at 64K, 1.91x / 1.89x at 128K with Prism forced
    on; speed-705db1d.json, one-band estimation: 1.22x / 1.93x); min_context_len="auto" decides
    where, per model. 'fast': the paper's rule and setting, top-p 0.95 in both bands, no block
    budget: perplexity +3.6..+5.7% at 8K-32K (quality.json, density 0.22-0.32); prefill 1.79x faster
    than FLASH_ATTN at 64K and 2.76x at 128K on SmolLM2 (H200, commit 8f43227:
    benchmarks/results/speed.json as committed in b3a8be6)."""

    high_threshold: float = _FROM_PRESET
    """Top-p mass kept per query block in the high band, in (0, 1]. 1.0 keeps every block.
    With the 'meanpool' rule (one band) the top-p is max(high_threshold, low_threshold): set
    both. Default: from ``preset``."""

    low_threshold: float = _FROM_PRESET
    """Top-p mass kept per query block in the low band, in (0, 1]. 1.0 keeps every block.
    Default: from ``preset``."""

    calibrate: bool = True
    """Energy calibration: divide each band's logits by
    t = sqrt(d_band/d) * rms(q_band)/rms(q) * rms(k_band)/rms(k), restoring the energy that
    mean pooling removed from the high band; the query ratio is taken per query block and the
    key ratio over the key blocks causally visible to it, so selections do not depend on where
    chunked prefill cut the prompt. False: temperature 1 for both bands. Only the 'paper' rule
    calibrates (the default 'meanpool' has one band)."""

    block_budget: Optional[float] = _FROM_PRESET
    """Cap on the blocks kept per (query block, q head), as a share of its causal key blocks,
    in (0, 1]: of the blocks top-p selected, at most ceil(block_budget * (I + 1)) stay (I + 1
    causal blocks), those with the highest max(p_high, p_low) (equal values: the most recent
    blocks first); the sink and diagonal blocks always stay and count toward the cap. None: no cap (top-p
    alone decides). Bounds the work when attention is near-uniform (e.g. dummy weights).
    Default: from ``preset``."""

    keep_sink: bool = True
    """Always attend to key block 0 (the attention sink)."""

    keep_diagonal: bool = True
    """Always attend to the query block's own (diagonal, causally masked) key block."""

    local_blocks: int = 1
    """Key blocks always kept that end on the diagonal: 1 keeps the diagonal block alone
    (``keep_diagonal``), 2 also the block before it, so every query sees at least the 128 tokens
    before it, whatever the pooled scores say (mean pooling is blind to local structure, and a
    query near the start of its block otherwise sees only its block's first tokens). Needs
    keep_diagonal. Costs up to local_blocks - 1 blocks per row.

    Measured through vLLM on an H200 (benchmarks/results/quality-local-blocks.json, commit 705db1d,
    SmolLM2-135M, 8K-32K): at the 'quality' selection 2 changed nothing (the same passkeys, the same
    density to three decimals, perplexity within 0.01 points): the block before the diagonal was
    nearly always selected anyway. 1 stays the default; 2 is for models whose pooled scores miss
    local context."""

    dense_tail: bool = True
    """The rows of a chunk's last query block, when that block is partial (the chunk ends
    mid-block, as a prompt's end almost always does), attend to every causal block, as the
    decode rows after them do. Costs at most one block row per chunk. False: the paper's
    selection for every row.

    The answer to a long prompt is read from these rows; Prism's pooled estimate of a partial block
    that mixes the question with earlier text misses needles on small models (SmolLM2-135M passkeys
    on the H200: 2/10 without, 9/10 with the dense tail, FLASH_ATTN 9/10;
    benchmarks/results/gpu-tests.txt, passkey-tail-cpu.txt). Chunks cut at block boundaries end on a
    full block, so selections stay independent of block-aligned chunking."""

    min_context_len: Union[int, str] = "auto"
    """Smallest sequence length (context + this chunk, tokens) at which a prefill chunk is
    served by Prism; shorter ones go to FlashAttention. "auto" (default): decided per layer shape
    from timings on the serving GPU at startup (startup log and /prism/stats say what was decided),
    52096 without them. An integer fixes the length (0 sends every prefill chunk through Prism).

    "auto": when the model loads, dense FlashAttention and Prism (estimation + attend step at block
    densities 0.1-1.0) are timed on synthetic chunks of 4K-128K tokens (a few seconds, once per
    shape and process; a longer max_model_len also runs once untimed, up to 256K tokens, so that the
    kernels compile at startup), and Prism serves from the shortest length where it takes at most
    0.9 of dense's time at the density it has been selecting at each length (sampled launches; 0.5
    before any). A chunk at a length where Prism could pay but FlashAttention serves gets a shadow
    step: FlashAttention's output unchanged, Prism's estimation beside it to count the blocks it
    would select there (once per length, again every 64 such steps). The decision, its timings and
    densities are in the startup log and /prism/stats. Without a measurement (no CUDA, or the timing
    failed) it is 52096, the larger end-to-end break-even of two runs through vLLM on an H200
    (SmolLM2-135M at the 'quality' preset's selection, 2026-12-02,
    benchmarks/results/speed-3699195.json and speed-repeat-3699195.json). With an integer, the same
    synthetic calls run once, untimed, at the lengths Prism will serve, so that its kernels compile
    at startup rather than on the first long requests."""

    attend_layout: str = "auto"
    """How the FA3 attend step (Hopper) lays out its virtual varlen sequences (ignored where
    Prism's Triton kernel attends). "auto" (default): the fastest of "head" and "head_views" (and
    "head_halves" at head sizes up to 64) for the layer shape, timed on the serving GPU when the
    model loads (once per shape and process; the choice and its timings are in the startup log and
    /prism/stats); without a measurement, "head"; "head_views" for layers with learned sinks (only
    the view layouts carry one sink per q head). Or one of "head", "head_views", "group", "group_views", "head_halves".

    "head" and "head_views" attend exactly the selected blocks: "head" runs one FA3 call over one
    sequence per (query block, q head), on a head-major copy of q whose output is scattered back;
    "head_views" runs one FA3 call per q head on views of q and the output (no copies, HQ calls).
    "group" / "group_views": one sequence per (query block, kv head) carrying the group's q heads
    over the union of their selections, for small head sizes where one-head sequences run FA3 below
    its per-block speed. They attend more blocks than selected (a group's union is 1.25-1.5x one
    head's selection on SmolLM2-135M, benchmarks/results/gqa-union-cpu.json), so whether they pay
    depends on the model: "auto" never chooses them. "head_halves": "head" with each (query block,
    q head) cut into two sequences of half a block's rows, for head size 64, where FA3's tile holds
    192 query rows (a one-head 128-row sequence fills 2/3 of it) but switches to a 64-row tile for
    calls whose sequences have at most 64 rows (head sizes 64 and 128 only)."""

    min_query_len: int = 16
    """Smallest prefill chunk (query tokens) served by Prism. Decode and speculative-decode
    rows are always served by FlashAttention (and keep its CUDA graphs)."""

    def __post_init__(self) -> None:
        self._apply_preset()
        self._check_types()
        if self.block_size not in SUPPORTED_BLOCK_SIZES:
            raise ValueError(
                f"prism.block_size={self.block_size!r} is not supported; the kernels are built for "
                f"{SUPPORTED_BLOCK_SIZES}. Remove the field or set it to 128."
            )
        if self.rule not in RULES:
            raise ValueError(
                f"prism.rule={self.rule!r} is not a selection rule; valid rules: "
                f"{', '.join(repr(r) for r in RULES)} (default {PRESETS[self.preset]['rule']!r} in preset "
                f"{self.preset!r})."
            )
        for name in ("high_band_dims", "low_band_dims"):
            v = getattr(self, name)
            if v is not None and (v < 2 or v % 2):
                raise ValueError(
                    f"prism.{name}={v!r} is invalid: it must be an even number >= 2 (RoPE rotates "
                    f"dimensions in pairs) and at most the model's rotary dimension. Remove it to use "
                    f"the default."
                )
        for name in ("high_threshold", "low_threshold"):
            v = getattr(self, name)
            if not (math.isfinite(v) and 0.0 < v <= 1.0):
                raise ValueError(
                    f"prism.{name}={v!r} is out of range: it is a top-p probability mass in (0, 1] "
                    f"(default {PRESETS[self.preset][name]} in preset {self.preset!r}; 1.0 selects every block)."
                )
        if self.block_budget is not None and not (math.isfinite(self.block_budget) and 0.0 < self.block_budget <= 1.0):
            raise ValueError(
                f"prism.block_budget={self.block_budget!r} is out of range: it is a share of the causal "
                f"key blocks in (0, 1] (e.g. 0.1 keeps at most 10% of them), or null for no cap."
            )
        if self.min_context_len != "auto" and (isinstance(self.min_context_len, str) or self.min_context_len < 0):
            what = "is not valid" if isinstance(self.min_context_len, str) else "is out of range"
            raise ValueError(
                f"prism.min_context_len={self.min_context_len!r} {what}: use \"auto\" (the default: "
                f"measured per layer shape on the GPU) or a token count >= 0 (0 sends every prefill chunk "
                f"through Prism)."
            )
        if self.attend_layout not in ("auto",) + ATTEND_LAYOUTS:
            raise ValueError(
                f"prism.attend_layout={self.attend_layout!r} is not an attend layout; use \"auto\" (the default) "
                f"or one of {', '.join(repr(x) for x in ATTEND_LAYOUTS)}."
            )
        if self.local_blocks < 1:
            raise ValueError(
                f"prism.local_blocks={self.local_blocks!r} is out of range: use an integer >= 1 (1: the "
                f"diagonal block alone; 2: also the block before it)."
            )
        if self.local_blocks > 1 and not self.keep_diagonal:
            raise ValueError(
                f"prism.local_blocks={self.local_blocks!r} needs keep_diagonal=true (the local blocks are "
                f"the ones before the kept diagonal): set keep_diagonal=true or local_blocks=1."
            )
        if self.min_query_len < 2:
            raise ValueError(
                f"prism.min_query_len={self.min_query_len!r} is out of range: use an integer >= 2 "
                f"(single-token decode rows always stay on FlashAttention)."
            )

    @property
    def fixed_min_context_len(self) -> int:
        """min_context_len as a number: "auto" without a measurement is AUTO_FALLBACK_MIN_CONTEXT_LEN."""
        return AUTO_FALLBACK_MIN_CONTEXT_LEN if self.min_context_len == "auto" else int(self.min_context_len)

    def _apply_preset(self) -> None:
        """Fill every field still at its preset default from ``PRESETS[self.preset]``.

        Resolved values count as explicit from then on, so ``dataclasses.replace(cfg, preset=p)``
        keeps cfg's thresholds; build ``PrismConfig(preset=p, ...)`` to switch presets."""
        if not isinstance(self.preset, str) or self.preset not in PRESETS:
            valid = ", ".join(repr(n) for n in PRESETS)
            raise ValueError(
                f"prism.preset={self.preset!r} is not a preset; valid presets: {valid} "
                f"(default {DEFAULT_PRESET!r}). Set individual fields (e.g. high_threshold) to tune further."
            )
        for name, value in PRESETS[self.preset].items():
            if getattr(self, name) is _FROM_PRESET:
                object.__setattr__(self, name, value)

    @property
    def calibrated(self) -> bool:
        """Energy calibration in effect (the 'meanpool' rule has one band: nothing to calibrate)."""
        return self.calibrate and self.rule == "paper"

    def _check_types(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            v = getattr(self, f.name)
            want = hints[f.name]
            union = typing.get_origin(want) is typing.Union
            optional = union and type(None) in typing.get_args(want)
            bases = [a for a in typing.get_args(want) if a is not type(None)] if union else [want]
            base = bases[0]
            if v is None and optional:
                continue
            ok = any(isinstance(v, b) and not (b in (int, float) and isinstance(v, bool)) for b in bases)
            if base is float and isinstance(v, int) and not isinstance(v, bool):
                object.__setattr__(self, f.name, float(v))
                ok = True
            if not ok:
                default = f"from the preset, {PRESETS[self.preset][f.name]!r} in {self.preset!r}" if (
                    f.default is _FROM_PRESET) else repr(f.default)
                raise ValueError(
                    f"prism.{f.name}={v!r} has the wrong type: expected {' or '.join(b.__name__ for b in bases)}"
                    f"{' or null' if optional else ''} (default {default})."
                )

    # -- band sizes resolved against a model's rotary dimension -----------------------------
    def band_dims(self, rotary_dim: int) -> tuple[int, int]:
        """(high, low) band sizes in rotary dims for a model with ``rotary_dim`` rotated dims."""
        hi = self.high_band_dims if self.high_band_dims is not None else max(2, (rotary_dim // 2) // 2 * 2)
        lo = self.low_band_dims if self.low_band_dims is not None else max(2, (rotary_dim * 3 // 4) // 2 * 2)
        for name, v in (("high_band_dims", hi), ("low_band_dims", lo)):
            if v > rotary_dim:
                raise ValueError(
                    f"prism.{name}={v} exceeds the model's rotary dimension {rotary_dim}; use an even "
                    f"value <= {rotary_dim} or remove it to use the default."
                )
        return hi, lo

    # -- parsing -----------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Optional[Mapping[str, Any]]) -> "PrismConfig":
        """Build from a plain dict (the value of ``additional_config["prism"]``)."""
        if d is None:
            return cls()
        if isinstance(d, PrismConfig):
            return d
        if not isinstance(d, Mapping):
            raise ValueError(
                f'--additional-config "prism" must be a JSON object, got {type(d).__name__}: {d!r}. '
                f'Example: --additional-config \'{{"prism": {{"high_threshold": 0.9}}}}\''
            )
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(
                f"unknown prism setting(s) {unknown} in --additional-config; valid fields: "
                f"{sorted(known)}"
            )
        return cls(**dict(d))

    @classmethod
    def from_vllm_config(cls, vllm_config: Any) -> "PrismConfig":
        """Read ``vllm_config.additional_config["prism"]`` (absent: defaults)."""
        extra = getattr(vllm_config, "additional_config", None) or {}
        return cls.from_dict(extra.get(ADDITIONAL_CONFIG_KEY))

    def to_dict(self) -> dict[str, Any]:
        """Every field with its effective value (the preset's name included), so
        ``from_dict(cfg.to_dict()) == cfg``."""
        return dataclasses.asdict(self)

    def preset_overrides(self) -> dict[str, Any]:
        """The preset-controlled fields whose effective value differs from the preset's."""
        return {k: getattr(self, k) for k, v in PRESETS[self.preset].items() if getattr(self, k) != v}

    @classmethod
    def markdown_table(cls) -> str:
        """The README's configuration table: every field, its default and its docstring."""
        defaults = cls()
        rows = ["| field | default | meaning |", "|---|---|---|"]
        for name, doc in cls.field_docs().items():
            rows.append(f"| `{name}` | `{getattr(defaults, name)!r}` | {doc} |")
        return "\n".join(rows)

    @classmethod
    def field_docs(cls, summary: bool = False) -> dict[str, str]:
        """Field name -> docstring, whitespace collapsed (for README tables); ``summary``: its
        first paragraph only (for ``--help``: the evidence behind a default stays in the README)."""
        import ast
        import inspect
        import textwrap

        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
        body = tree.body[0].body  # type: ignore[attr-defined]
        docs: dict[str, str] = {}
        for a, b in zip(body, body[1:]):
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
                text = textwrap.dedent(str(b.value.value)).strip()  # type: ignore[attr-defined]
                if summary:
                    text = text.split("\n\n", 1)[0]
                docs[a.target.id] = " ".join(text.split())  # type: ignore[attr-defined]
        return docs

